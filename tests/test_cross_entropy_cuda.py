"""The cross-entropy CUDA kernels (csrc/cuda/cross_entropy.cuh), executed on the CPU through the
CUDA simulation with the real launch configurations, against fused_mlp.reference; and on a GPU,
when there is one."""

import os

import pytest
import simulated
import torch
import torch.nn.functional as F

import fused_mlp
from fused_mlp import reference

pytestmark = pytest.mark.timeout(600)

TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


@pytest.fixture(scope="module")
def sim():
    module = simulated.load("cross_entropy")
    module.set_barrier_timeout_ms(5000)
    yield module
    module.set_sm_count(132)


def case(rows, classes, dtype, target_kind="index", weighted=False, ignore=False, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed + rows * 7 + classes)
    x = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    if target_kind == "index":
        target = torch.randint(0, classes, (rows,), generator=g)
        if ignore:
            target[::3] = -100
    else:
        target = torch.softmax(torch.randn(rows, classes, generator=g, dtype=torch.float64), 1).to(dtype)
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    return x, target, weight


def check(sim, x, target, weight, reduction, smoothing, ignore_index=-100):
    rtol, atol = TOL[x.dtype]
    args = (x, target, weight, reduction, ignore_index, smoothing)
    loss, lse = sim.forward(*args)
    ref_loss, ref_lse = reference.cross_entropy_forward(*args)
    torch.testing.assert_close(lse, ref_lse, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(
        loss,
        ref_loss,
        rtol=rtol,
        atol=atol * max(1.0, ref_loss.abs().max().item() if ref_loss.numel() else 1.0),
        equal_nan=True,
    )
    g = torch.randn(ref_loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(x.dtype)
    grad = sim.backward(g, x, target, weight, lse, reduction, ignore_index, smoothing)
    ref_grad = reference.cross_entropy_backward(g, x, target, weight, ref_lse, reduction, ignore_index, smoothing)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("classes", [1, 2, 10, 31, 32, 33, 100, 200, 500, 1023, 1024, 1025, 4097])
def test_class_counts_around_warp_and_block_sizes(sim, classes):
    rows = 5 if classes < 400 else 3
    for reduction, smoothing, weighted in ((0, 0.0, False), (1, 0.1, True)):
        x, target, weight = case(rows, classes, torch.float32, weighted=weighted, ignore=True)
        check(sim, x, target, weight, reduction, smoothing)
    cfg = sim.launch_config(rows, classes)
    assert cfg["warp_per_row"] == (classes <= 1024)
    if cfg["warp_per_row"]:  # the row in registers: lanes x values cover it, with less than 2x slack
        lanes, values = cfg["lanes_per_row"], cfg["values_per_lane"]
        assert lanes == min(32, 1 << (classes - 1).bit_length())
        assert classes <= lanes * values < 2 * max(classes, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_every_dtype_target_and_reduction(sim, dtype, target_kind, reduction):
    for rows, classes in ((1, 10), (13, 37), (2, 1100)):
        x, target, weight = case(rows, classes, dtype, target_kind, weighted=True, ignore=True)
        check(sim, x, target, weight, reduction, 0.2)
        check(sim, x, target, None, reduction, 0.0)


def test_more_rows_than_one_grid_covers(sim):
    sim.set_sm_count(1)  # the grid is capped at 32 blocks: 128 rows for a warp per row, 32 for a block
    try:
        assert sim.launch_config(300, 10)["grid"] == 32
        x, target, weight = case(300, 10, torch.float32, weighted=True, ignore=True)
        check(sim, x, target, weight, 1, 0.1)
        x, target, weight = case(40, 1100, torch.float32)
        check(sim, x, target, None, 0, 0.0)
    finally:
        sim.set_sm_count(132)


def test_extreme_and_non_finite_logits(sim):
    x, target, _ = case(6, 50, torch.float32, scale=1.0)
    x = torch.where(x > 0, x + 1e4, x - 1e4)
    check(sim, x, target, None, 0, 0.1)
    special = torch.tensor(
        [
            [float("nan"), 1.0, 2.0],
            [float("inf"), 1.0, 0.0],
            [float("-inf"), 1.0, 0.0],
            [float("-inf")] * 3,
            [0.5, 1.0, 2.0],
        ]
    )
    check(sim, special, torch.tensor([1, 1, 1, 1, 0]), None, 0, 0.0)


def test_all_ignored_and_empty(sim):
    x, _, _ = case(4, 6, torch.float32)
    check(sim, x, torch.full((4,), -100), None, 1, 0.0)  # mean of nothing: NaN, as PyTorch
    check(sim, x, torch.full((4,), -100), None, 2, 0.1)
    empty = torch.zeros(0, 6)
    for reduction in (0, 1, 2):
        loss, lse = sim.forward(empty, torch.zeros(0, dtype=torch.long), None, reduction, -100, 0.0)
        want = reference.cross_entropy_forward(empty, torch.zeros(0, dtype=torch.long), None, reduction, -100, 0.0)[0]
        torch.testing.assert_close(loss, want, equal_nan=True)


def test_out_of_range_target_is_a_device_side_assert(sim):
    x, target, _ = case(8, 5, torch.float32)
    target[3] = 5
    with pytest.raises(RuntimeError, match="device-side assert"):
        sim.forward(x, target, None, 0, -100, 0.0)


def test_results_are_deterministic(sim):
    x, target, weight = case(64, 700, torch.float32, weighted=True)
    first = sim.forward(x, target, weight, 1, -100, 0.1)
    second = sim.forward(x, target, weight, 1, -100, 0.1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_cuda_kernels_are_registered_when_built_with_cuda():
    from fused_mlp import _build_info

    if not _build_info.WITH_CUDA:
        if os.environ.get("CI") == "true" and torch.version.cuda:
            pytest.fail("CI has a CUDA toolkit and a CUDA build of torch: the extension must include CUDA")
        pytest.skip("the extension was built without CUDA")
    for name in ("cross_entropy_forward", "cross_entropy_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_mlp::{name}", "CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_a_gpu_against_the_cpu_kernel(dtype):
    for rows, classes in ((257, 10), (5, 5000)):
        x, target, weight = case(rows, classes, dtype, weighted=True, ignore=True)
        xc = x.clone().requires_grad_()
        xg = x.cuda().requires_grad_()
        lc = fused_mlp.cross_entropy(xc, target, weight, label_smoothing=0.1)
        lg = fused_mlp.cross_entropy(xg, target.cuda(), weight.cuda(), label_smoothing=0.1)
        lc.backward()
        lg.backward()
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(lg.cpu(), lc, rtol=rtol, atol=atol)
        torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=rtol, atol=atol)
        torch.testing.assert_close(
            lg.cpu(),
            F.cross_entropy(x.double(), target, weight.double(), label_smoothing=0.1).to(dtype),
            rtol=rtol,
            atol=atol,
        )
