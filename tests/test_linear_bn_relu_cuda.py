"""The Linear -> BatchNorm1d -> ReLU -> Dropout CUDA kernels (csrc/cuda/linear_bn_relu.cuh), executed
on the CPU through the CUDA simulation with the real host sequence and launch configurations,
against fused_mlp.reference and the CPU kernels; and on a GPU, when there is one."""

import itertools

import pytest
import simulated
import torch
from torch import nn

from fused_mlp import reference
from fused_mlp.nn import LinearBNReLU

pytestmark = pytest.mark.timeout(900)

TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}
SEED_OFFSET = torch.tensor([0x5DEECE66D, 12345])
OUTPUTS = ("out", "pre_bn", "mean", "invstd", "batch_var")
GRADS = ("grad_input", "grad_weight", "grad_bias", "grad_bn_weight", "grad_bn_bias")


@pytest.fixture(scope="module")
def sim():
    module = simulated.load("linear_bn_relu")
    module.set_barrier_timeout_ms(5000)
    yield module
    module.set_sm_count(132)


def layer_args(
    rows,
    in_features,
    features,
    dtype,
    *,
    bias=True,
    affine=True,
    running=True,
    use_batch_stats=True,
    dropout=0.0,
    seed=0,
):
    """The forward op's arguments; BN parameters in float32 for the reduced dtypes (as a
    bfloat16 model keeps them under autocast)."""
    g = torch.Generator().manual_seed(seed + 31 * rows + features)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = torch.randn(rows, in_features, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(features, in_features, generator=g, dtype=torch.float64) / in_features**0.5).to(dtype)
    b = torch.randn(features, generator=g, dtype=torch.float64).to(dtype) if bias else None
    gamma = (torch.rand(features, generator=g, dtype=torch.float64) + 0.5).to(param_dtype) if affine else None
    beta = (torch.randn(features, generator=g, dtype=torch.float64) * 0.3).to(param_dtype) if affine else None
    rm = (torch.randn(features, generator=g, dtype=torch.float64) * 0.2).to(param_dtype) if running else None
    rv = (torch.rand(features, generator=g, dtype=torch.float64) + 0.5).to(param_dtype) if running else None
    return (x, w, b, gamma, beta, rm, rv, use_batch_stats, 1e-5, dropout, SEED_OFFSET)


def grad_for(out, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)


def backward_args(args, outputs, grad):
    x, w, b, gamma, beta, _, _, use_batch_stats, _, dropout, seed_offset = args
    out, pre_bn, mean, invstd, _ = outputs
    saved = pre_bn if use_batch_stats else out
    return (grad, x, w, b, gamma, beta, saved, mean, invstd, use_batch_stats, dropout, seed_offset)


def check(sim, args, scale_tol=1.0):
    """Simulated forward and backward against reference.py, output by output."""
    rtol, atol = (t * scale_tol for t in TOL[args[0].dtype])
    got = sim.forward(*args)
    want = reference.linear_bn_relu_forward(*args)
    for name, a, b in zip(OUTPUTS, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    grad = grad_for(want[0])
    bargs = backward_args(args, want, grad)
    got_grads = sim.backward(*bargs)
    want_grads = reference.linear_bn_relu_backward(*bargs)
    for name, a, b in zip(GRADS, got_grads, want_grads):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # Sums over the batch: the tolerance grows with the rows summed.
        torch.testing.assert_close(
            a, b, rtol=rtol * 4, atol=atol * 4 * max(1.0, args[0].shape[0] ** 0.5), msg=lambda m: f"{name}: {m}"
        )
    return got, got_grads


CONFIGS = list(itertools.product([True, False], [True, False], ["train", "train_untracked", "eval"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias,affine,mode", CONFIGS)
@pytest.mark.parametrize("dropout", [0.0, 0.3, 0.9])
def test_every_configuration_and_dtype(sim, dtype, bias, affine, mode, dropout):
    """bias or not, affine or not; batch statistics with and without running statistics given
    (track_running_stats), and running statistics (eval); dropout off, 0.3 and 0.9."""
    args = layer_args(
        13,
        10,
        20,
        dtype,
        bias=bias,
        affine=affine,
        running=(mode != "train_untracked"),
        use_batch_stats=(mode != "eval"),
        dropout=dropout,
    )
    check(sim, args)


EDGE_ROWS = [2, 3, 31, 33, 1025]
EDGE_FEATURES = [1, 31, 32, 33, 1023, 1025, 4097]


# Every pair but the largest, which test_largest_edge_shape runs once.
EDGE_PAIRS = [(r, f) for r in EDGE_ROWS for f in EDGE_FEATURES if r * f < 1_000_000]


@pytest.mark.parametrize("rows,features", EDGE_PAIRS)
def test_edge_shapes(sim, rows, features):
    # With two or three rows the batch-statistics gradient is a difference of nearly equal terms
    # scaled by invstd, which is large for any feature whose few values happen to be close: float32
    # rounding noise then exceeds any fixed tolerance, in both implementations. Those run in float64.
    dtype = torch.float64 if rows <= 3 else torch.float32
    for use_batch_stats, dropout in ((True, 0.3), (False, 0.9)):
        check(
            sim, layer_args(rows, 3, features, dtype, use_batch_stats=use_batch_stats, dropout=dropout), scale_tol=5.0
        )


def test_largest_edge_shape(sim):
    check(sim, layer_args(1025, 2, 4097, torch.float32, dropout=0.3), scale_tol=5.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_edge_shapes_in_other_dtypes(sim, dtype):
    for rows, features in ((2, 33), (33, 1), (31, 1025)):
        check(sim, layer_args(rows, 4, features, dtype, dropout=0.3), scale_tol=2.0)
        check(sim, layer_args(rows, 4, features, dtype, use_batch_stats=False, dropout=0.3), scale_tol=2.0)


def test_more_rows_than_one_grid_covers(sim):
    sim.set_sm_count(1)  # about four blocks in all: each row lane walks many rows of its chunk
    try:
        cfg = sim.reduce_config(1025, 33, 1)
        assert cfg["grid_x"] * cfg["grid_y"] <= 4 and cfg["rows_per_chunk"] > 8
        assert cfg["rows_per_chunk"] * cfg["chunks"] >= 1025 > cfg["rows_per_chunk"] * (cfg["chunks"] - 1)
        for use_batch_stats in (True, False):
            check(
                sim, layer_args(1025, 3, 33, torch.float32, use_batch_stats=use_batch_stats, dropout=0.3), scale_tol=5.0
            )
            check(
                sim, layer_args(300, 3, 64, torch.float32, use_batch_stats=use_batch_stats, dropout=0.3), scale_tol=5.0
            )
    finally:
        sim.set_sm_count(132)


def test_reduce_config_covers_every_row_and_feature(sim):
    for rows, features, per_thread in itertools.product([2, 9, 1025, 70000], [1, 33, 4096], [1, 4]):
        cfg = sim.reduce_config(rows, features, per_thread)
        assert cfg["block"] == 256 and cfg["grid_y"] == cfg["chunks"] <= 65535
        assert cfg["grid_x"] * 32 * per_thread >= features
        assert cfg["rows_per_chunk"] * cfg["chunks"] >= rows > cfg["rows_per_chunk"] * (cfg["chunks"] - 1)


def test_dropout_mask_equals_the_cpu_mask(sim):
    """For the same (seed, offset) the device mask is the CPU one, element for element: with a large
    beta every unit is active, so the output is zero exactly where dropout dropped it."""
    for rows, features in ((7, 33), (64, 64), (5, 1025)):
        args = list(layer_args(rows, 4, features, torch.float32, dropout=0.3))
        args[4] = torch.full((features,), 50.0)  # beta: relu never cuts
        out = sim.forward(*args)[0]
        keep = torch.ops.fused_mlp.dropout_mask(SEED_OFFSET, rows * features, 0.3).reshape(rows, features)
        assert torch.equal(out != 0, keep)
        assert torch.equal(
            keep, reference.dropout_keep_mask(*SEED_OFFSET.tolist(), rows * features, 0.3).reshape(rows, features)
        )
        cpu_out = torch.ops.fused_mlp.linear_bn_relu_forward(*args)[0]
        torch.testing.assert_close(out, cpu_out, rtol=1e-5, atol=1e-5)
        assert torch.equal(out != 0, cpu_out != 0)


def test_against_the_cpu_kernels(sim):
    for use_batch_stats in (True, False):
        args = layer_args(40, 12, 36, torch.float32, use_batch_stats=use_batch_stats, dropout=0.3)
        got = sim.forward(*args)
        cpu = torch.ops.fused_mlp.linear_bn_relu_forward(*args)
        for name, a, b in zip(OUTPUTS, got, cpu):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        bargs = backward_args(args, cpu, grad_for(cpu[0]))
        for name, a, b in zip(GRADS, sim.backward(*bargs), torch.ops.fused_mlp.linear_bn_relu_backward(*bargs)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_unaligned_and_non_contiguous_tensors(sim):
    """A storage offset of one element takes the unpacked loads; a transposed input is copied."""
    args = list(layer_args(17, 6, 32, torch.float32, dropout=0.3))
    ref_out = reference.linear_bn_relu_forward(*args)
    shifted = torch.empty(17 * 6 + 1)[1:].view(17, 6).copy_(args[0])
    assert shifted.data_ptr() % 16 != 0
    args[0] = shifted
    out = sim.forward(*args)
    torch.testing.assert_close(out[0], ref_out[0], rtol=1e-5, atol=1e-5)
    grad = grad_for(ref_out[0])
    grad_shifted = torch.empty(17 * 32 + 1)[1:].view(17, 32).copy_(grad)
    bargs = backward_args(args, out, grad_shifted)
    want = reference.linear_bn_relu_backward(*backward_args(args, ref_out, grad))
    for name, a, b in zip(GRADS, sim.backward(*bargs), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    args[0] = args[0].t().contiguous().t()  # column-major
    torch.testing.assert_close(sim.forward(*args)[0], ref_out[0], rtol=1e-5, atol=1e-5)


def test_folded_inference(sim):
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, *_ = layer_args(21, 8, 33, dtype)
        for bias in (b, None):
            for dropout in (0.0, 0.3):
                got = sim.linear_relu_dropout_forward(x, w, bias, dropout, SEED_OFFSET)
                want = reference.linear_relu_dropout_forward(x, w, bias, dropout, SEED_OFFSET)
                torch.testing.assert_close(got, want, rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_results_are_deterministic(sim):
    args = layer_args(600, 5, 130, torch.float32, dropout=0.3)
    first, second = sim.forward(*args), sim.forward(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    bargs = backward_args(args, first, grad_for(first[0]))
    assert all(torch.equal(a, b) for a, b in zip(sim.backward(*bargs), sim.backward(*bargs)))


def test_seed_offset_as_the_device_writes_it(sim):
    """Outside a CUDA graph: the generator's values; under capture: what the graph's pointers hold
    at the launch, plus the offset within the graph."""
    assert sim.write_seed_offset(False, 2**40 + 3, 24, torch.zeros(2, dtype=torch.long), 0).tolist() == [2**40 + 3, 24]
    graph_state = torch.tensor([77, 1000])
    assert sim.write_seed_offset(True, 0, 0, graph_state, 8).tolist() == [77, 1008]
    graph_state[1] = 2000  # the next replay
    assert sim.write_seed_offset(True, 0, 0, graph_state, 8).tolist() == [77, 2008]


def test_bad_input_is_refused_by_the_device_host_sequence(sim):
    args = list(layer_args(5, 4, 6, torch.float32, dropout=0.3))
    with pytest.raises(RuntimeError, match="dropout_p must be in \\[0, 1\\)"):
        sim.forward(*args[:9], 1.0, SEED_OFFSET)
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel"):
        sim.forward(args[0][:1], *args[1:])
    with pytest.raises(RuntimeError, match="seed_offset must be"):
        sim.forward(*args[:10], torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="weight must have shape"):
        sim.forward(args[0], torch.randn(6, 5), *args[2:])


# --- the compiled extension ----------------------------------------------------------------------

CUDA_OPS = (
    "linear_bn_relu_forward",
    "linear_bn_relu_backward",
    "bn_batch_stats",
    "bn_relu_dropout",
    "linear_relu_dropout_forward",
    "bn_update_running_stats_",
    "philox_seed_offset",
)


def test_cuda_kernels_are_registered_when_built_with_cuda():
    import os

    from fused_mlp import _build_info

    if not _build_info.WITH_CUDA:
        if os.environ.get("CI") == "true" and torch.version.cuda:
            pytest.fail("CI has a CUDA toolkit and a CUDA build of torch: the extension must include CUDA")
        pytest.skip("the extension was built without CUDA")
    for name in CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_mlp::{name}", "CUDA"), name


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_a_gpu_against_the_stock_modules(dtype):
    from collections import OrderedDict

    torch.manual_seed(0)
    stock = nn.Sequential(OrderedDict(linear=nn.Linear(64, 96), bn=nn.BatchNorm1d(96))).cuda()
    fused = LinearBNReLU(64, 96).cuda()
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(128, 64, device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            want = torch.relu(stock(x))
            got = fused(x)
        torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype][0], atol=TOL[dtype][1])
    torch.testing.assert_close(fused.bn.running_mean, stock.bn.running_mean)
    torch.testing.assert_close(fused.bn.running_var, stock.bn.running_var)


@needs_gpu
def test_on_a_gpu_the_mask_equals_the_cpu_mask():
    args = list(layer_args(64, 16, 48, torch.float32, dropout=0.3))
    args[4] = torch.full((48,), 50.0)
    cpu = torch.ops.fused_mlp.linear_bn_relu_forward(*args)[0]
    gpu_args = [a.cuda() if isinstance(a, torch.Tensor) and a is not SEED_OFFSET else a for a in args]
    gpu = torch.ops.fused_mlp.linear_bn_relu_forward(*gpu_args)[0]
    assert torch.equal(gpu.cpu() != 0, cpu != 0)


@needs_gpu
def test_on_a_gpu_dropout_draws_from_the_cuda_generator_and_replays_in_a_graph():
    layer = LinearBNReLU(32, 64, dropout=0.5).cuda()
    x = torch.randn(16, 32, device="cuda")
    torch.cuda.manual_seed(3)
    first = layer(x)
    torch.cuda.manual_seed(3)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)  # the generator moved on
    layer.bn.eval()
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(static_x)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    graph.replay()
    a = static_out.clone()
    graph.replay()
    assert not torch.equal(static_out, a)  # a fresh mask on every replay
