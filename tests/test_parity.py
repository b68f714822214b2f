"""The kernels of every backend against fused_mlp.reference, each test written once: the `backend`
fixture (tests/conftest.py) runs it on the CPU kernels, on the CUDA kernels in the simulation, and
on a GPU when there is one. Device-specific tests (launch configurations, edge shapes of the
CUDA grid, instruction sets) stay in the files of their backend."""

import pytest
import torch

from fused_mlp import reference

pytestmark = pytest.mark.timeout(900)

CE_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10), torch.bfloat16: (2e-2, 2e-2)}
LAYER_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}
SEED_OFFSET = torch.tensor([1234567, 89])


def cross_entropy_args(rows, classes, target_kind, dtype, weighted, reduction, smoothing):
    g = torch.Generator().manual_seed(rows * 31 + classes)
    x = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
    if target_kind == "index":
        target = torch.randint(0, classes, (rows,), generator=g)
        target[::3] = -100
    else:
        target = torch.softmax(torch.randn(rows, classes, generator=g, dtype=torch.float64), 1).to(dtype)
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    return x, target, weight, reduction, -100, smoothing


def on_cpu(values):
    return tuple(v.cpu() if isinstance(v, torch.Tensor) else v for v in values)


@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction,smoothing,weighted", [(0, 0.0, False), (1, 0.1, True), (2, 0.0, True)])
def test_cross_entropy_ops_match_reference(backend, target_kind, dtype, reduction, smoothing, weighted):
    for rows, classes in ((17, 3), (4, 9000)):
        args = cross_entropy_args(rows, classes, target_kind, dtype, weighted, reduction, smoothing)
        loss, lse = on_cpu(backend.cross_entropy_forward(*backend.to(args)))
        ref_loss, ref_lse = reference.cross_entropy_forward(*args)
        rtol, atol = CE_TOL[dtype]
        torch.testing.assert_close(lse, ref_lse, rtol=rtol, atol=atol)
        torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
        g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
        x, target, weight = args[:3]
        bargs = (g, x, target, weight, lse) + args[3:]
        (grad,) = on_cpu((backend.cross_entropy_backward(*backend.to(bargs)),))
        ref_grad = reference.cross_entropy_backward(g, x, target, weight, ref_lse, *args[3:])
        torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol)


def in_float64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def layer_args(shape, dtype, use_batch_stats, dropout, affine=True):
    n, k, c = shape
    g = torch.Generator().manual_seed(n + k + c)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(n, k, generator=g).to(dtype)
    w = (torch.randn(c, k, generator=g) * 0.3).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    gamma = (torch.rand(c, generator=g) + 0.5).to(stat) if affine else None
    beta = torch.randn(c, generator=g).to(stat) if affine else None
    rm, rv = torch.randn(c, generator=g).to(stat) * 0.1, (torch.rand(c, generator=g) + 0.5).to(stat)
    return (x, w, b, gamma, beta, rm, rv, use_batch_stats, 1e-5, dropout, SEED_OFFSET)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("use_batch_stats", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(2, 3, 1), (33, 70, 31), (300, 17, 129)])
def test_layer_ops_match_reference(backend, dtype, use_batch_stats, dropout, shape):
    """The kernels against the reference maths in float64 on the same inputs, so that only the
    kernels' own rounding counts: the GEMM library's blocking, and whether the CPU fuses
    multiply-adds, differ between machines."""
    args = layer_args(shape, dtype, use_batch_stats, dropout)
    x, w, b, gamma, beta = args[:5]
    n, c = x.shape[0], w.shape[0]
    got = on_cpu(backend.linear_bn_relu_forward(*backend.to(args)))
    want = reference.linear_bn_relu_forward(*in_float64(args))
    if dtype == torch.bfloat16:
        # The GEMM rounds to bfloat16 (and in eval the folded weights too): allow a few bfloat16
        # roundings of the magnitude of each output's terms, |A| (|x| |W|^T + |b|) + |B|.
        a, b_shift = reference._bn_affine(gamma.double(), beta.double(), want[2], want[3])
        terms = a.abs() * (x.double().abs() @ w.double().abs().t() + b.double().abs()) + b_shift.abs()
        excess = (got[0].double() - want[0]).abs() - 2**-6 * terms
        assert excess.max() <= 0, f"{int((excess > 0).sum())} outputs off by more than 4 bfloat16 roundings"
        for a, r in zip(got[1:], want[1:]):
            torch.testing.assert_close(a.double(), r, rtol=2e-2, atol=2e-2)
    else:
        for a, r in zip(got, want):
            torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(n * c)
    grad = torch.randn(n, c, generator=g).to(dtype)
    saved = got[1] if use_batch_stats else got[0]
    if use_batch_stats:
        # Where BN's output is within rounding of zero, the kernel's ReLU mask (from a fused
        # multiply-add where the device has one) and float64's may differ: no gradient there.
        a, b_shift = reference._bn_affine(gamma.double(), beta.double(), got[2].double(), got[3].double())
        y = saved.double() * a + b_shift
        grad = torch.where(y.abs() <= 1e-4 * (1 + (saved.double() * a).abs()), 0, grad)
    bwd = (grad, x, w, b, gamma, beta, saved, got[2], got[3], use_batch_stats, dropout, SEED_OFFSET)
    want_grads = reference.linear_bn_relu_backward(*in_float64(bwd))
    tol = dict(rtol=5e-2, atol=5e-2 * (1 + grad.float().abs().max().item())) if dtype == torch.bfloat16 else {}
    for a, r in zip(on_cpu(backend.linear_bn_relu_backward(*backend.to(bwd))), want_grads):
        # Sums over the batch: the absolute tolerance grows with the rows summed.
        torch.testing.assert_close(a.double(), r, **(tol or dict(rtol=1e-4, atol=1e-5 * n**0.5)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine,dropout", [(True, 0.3), (False, 0.0)])
def test_backward_stage_ops_compose_to_the_backward_and_split_across_processes(backend, dtype, affine, dropout):
    """bn_backward_sums then bn_backward_finish over the whole batch is linear_bn_relu_backward; and
    two halves of the batch (two processes of a synchronized BatchNorm, normalized with the whole
    batch's statistics), each summing its own rows, with the sums added in between (the
    all-reduce) and the whole batch as the count, give each half's rows of the input gradient and,
    added, the weight gradient."""
    args = layer_args((46, 7, 33), dtype, True, dropout, affine)
    x, w, b, gamma, beta = args[:5]
    seed_offset = args[10]
    _, pre_bn, mean, invstd, _ = reference.linear_bn_relu_forward(*args)
    grad = torch.randn(pre_bn.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    # Where BN's output is within rounding of zero, the ReLU masks may differ: no gradient there.
    a, b_shift = reference._bn_affine(gamma, beta, mean, invstd)
    y = pre_bn.to(a.dtype) * a + b_shift
    grad = torch.where(y.abs() <= 1e-4 * (1 + (pre_bn.to(a.dtype) * a).abs()), 0, grad)
    want = reference.linear_bn_relu_backward(
        grad, x, w, b, gamma, beta, pre_bn, mean, invstd, True, dropout, seed_offset
    )
    sums = on_cpu(
        backend.bn_backward_sums(*backend.to((grad, pre_bn, mean, invstd, gamma, beta, dropout, seed_offset)))
    )
    finish = (grad, x, w, pre_bn, mean, invstd, gamma, beta, *sums, 46, dropout, seed_offset)
    got = on_cpu(backend.bn_backward_finish(*backend.to(finish)))
    rtol, atol = LAYER_TOL[dtype]
    for name, a, r in zip(("input", "weight", "bias", "bn_weight", "bn_bias"), got, want):
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol * 10, msg=name)

    # Two processes, rows [0, 23) and [23, 46), each with only its own rows. (Without dropout: a
    # process's masks come from its own (seed, offset), not from a slice of one process's.)
    want = reference.linear_bn_relu_backward(grad, x, w, b, gamma, beta, pre_bn, mean, invstd, True, 0.0, seed_offset)
    halves = [slice(0, 23), slice(23, 46)]
    part_sums = [
        on_cpu(backend.bn_backward_sums(*backend.to((grad[h], pre_bn[h], mean, invstd, gamma, beta, 0.0, seed_offset))))
        for h in halves
    ]
    reduced = [a + b for a, b in zip(*part_sums)]  # the all-reduce
    grad_input, grad_weight = [], torch.zeros_like(want[1])
    for h in halves:
        finish = (grad[h], x[h], w, pre_bn[h], mean, invstd, gamma, beta, *reduced, 46, 0.0, seed_offset)
        gi, gw, _, g_gamma, g_beta = on_cpu(backend.bn_backward_finish(*backend.to(finish)))
        grad_input.append(gi)
        grad_weight += gw
        torch.testing.assert_close(g_beta, want[4], rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(torch.cat(grad_input), want[0], rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(grad_weight, want[1], rtol=rtol, atol=atol * 10)
    with pytest.raises(RuntimeError, match="count must be"):
        backend.bn_backward_finish(*backend.to(finish[:10] + (10,) + finish[11:]))
    with pytest.raises(RuntimeError, match="sum_dy must have shape"):
        backend.bn_backward_finish(*backend.to(finish[:8] + (reduced[0][:3],) + finish[9:]))


@pytest.mark.parametrize("dtype", list(LAYER_TOL))
@pytest.mark.parametrize("affine,dropout", [(True, 0.3), (False, 0.0)])
def test_stage_ops_are_the_forward_after_its_gemm(backend, dtype, affine, dropout):
    """bn_batch_stats and bn_relu_dropout on the forward's pre-BN activation give its statistics
    and its output bit for bit, and match the reference; their argument checks hold."""
    args = backend.to(layer_args((45, 7, 33), dtype, True, dropout, affine))
    out, pre_bn, mean, invstd, var = backend.linear_bn_relu_forward(*args)
    gamma, beta, eps, seed_offset = args[3], args[4], args[8], args[10]
    stats = backend.bn_batch_stats(pre_bn, eps)
    for name, a, b in zip(("mean", "invstd", "var"), stats, (mean, invstd, var)):
        assert torch.equal(a, b), name
    assert torch.equal(backend.bn_relu_dropout(pre_bn, mean, invstd, gamma, beta, dropout, seed_offset), out)
    rtol, atol = LAYER_TOL[dtype]
    for a, b in zip(on_cpu(stats), reference.bn_batch_stats(pre_bn.cpu(), eps)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    cpu = on_cpu((pre_bn, mean, invstd, gamma, beta))
    want = reference.bn_relu_dropout(*cpu, dropout, SEED_OFFSET)
    torch.testing.assert_close(out.cpu(), want, rtol=rtol, atol=atol)
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel"):
        backend.bn_batch_stats(pre_bn[:1], eps)
    with pytest.raises(RuntimeError, match="mean must have shape"):
        backend.bn_relu_dropout(pre_bn, mean[:3], invstd, gamma, beta, dropout, seed_offset)
