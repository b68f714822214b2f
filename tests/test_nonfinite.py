"""NaN and +-inf propagate as stock PyTorch propagates them, on every path: every op on every backend
(the CPU kernels of the running instruction set, the CUDA kernels in the simulation and on a GPU),
the modules and the whole-network op, in training and eval, with and without BatchNorm and dropout.

Stock's rules: torch.relu keeps NaN, +inf and -0; its backward (threshold_backward) stops the
gradient only where relu's output is <= 0, so it passes where the output is NaN; dropout multiplies,
so a dropped NaN or inf becomes NaN. The fused dropout masks are not nn.Dropout's: with dropout the
ops and modules are compared with fused_mlp.reference under the same masks, whose own rules are
checked against stock's here; without dropout, with stock itself. The CPU tests (marker cpu_parity)
also run under every instruction set the CPU supports (test_cpu_dispatch.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_network import network_args, to_cpu

from fused_mlp import reference
from fused_mlp.models import MLP
from fused_mlp.nn import CrossEntropyLoss, LinearBNReLU

NAN, INF = float("nan"), float("inf")
NONFINITE = {"nan": NAN, "+inf": INF, "-inf": -INF}
TOL = {torch.float32: (3e-5, 3e-5), torch.float64: (1e-10, 1e-10), torch.bfloat16: (5e-2, 5e-2)}
SEED_OFFSET = torch.tensor([987654321, 17])


def assert_same(got, want, rtol=1e-5, atol=1e-6):
    """NaN exactly where want has NaN, +-inf where want has them, the finite values close."""
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_same(a, b, rtol, atol)
        return
    torch.testing.assert_close(got.to(want.dtype), want, rtol=rtol, atol=atol, equal_nan=True)


def assert_identical(got, want):
    """The same values bit for bit, up to the payload of NaN: NaN at the same places, and the same
    sign on every zero."""
    assert got.dtype == want.dtype
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], want[~nan])
    assert torch.equal(got[~nan].signbit(), want[~nan].signbit())


def specials(rows, cols, dtype):
    """(rows, cols) cycling through NaN, +inf, -inf, -0, +0 and finite values of both signs; cols
    not a multiple of any vector width, so every vector tail sees them."""
    values = torch.tensor([NAN, INF, -INF, -0.0, 0.0, 1.5, -1.5], dtype=torch.float64)
    return values.repeat(rows * cols // len(values) + 1)[: rows * cols].reshape(rows, cols).to(dtype)


def planted(x, value, row=2, col=5):
    """x with one element set to value."""
    x = x.clone()
    x[row, col] = value
    return x


# --- the ops on every backend ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_relu_keeps_nan_inf_and_negative_zero(backend, dtype, dropout):
    """bn_relu_dropout with the identity normalization (beta = -0, so that z * 1 + beta is z, -0
    included) is relu(z) * mask: torch.relu's values to the bit, NaN and -0 kept."""
    z = specials(9, 37, dtype)
    C = z.shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, invstd = torch.zeros(C, dtype=acc), torch.ones(C, dtype=acc)
    gamma, beta = torch.ones(C, dtype=acc), torch.full((C,), -0.0, dtype=acc)
    args = (z, mean, invstd, gamma, beta, dropout, SEED_OFFSET)
    got = to_cpu(backend.bn_relu_dropout(*backend.to(args)))
    want = reference.bn_relu_dropout(*args)
    assert_identical(got, want)
    if dropout == 0.0:
        assert_identical(want, torch.relu(z))
    else:  # the reference is stock's relu times the mask: a dropped inf is NaN
        keep = reference.dropout_mask(SEED_OFFSET, z.numel(), dropout).reshape(z.shape)
        assert_identical(want, (torch.relu(z.to(acc)) * (keep.to(acc) / (1 - dropout))).to(dtype))
        assert want[~keep & (z == INF)].isnan().all()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_reference_relu_backward_is_stocks(dropout):
    """The oracle's gradient through ReLU and dropout, read off the saved output, is stock's chain:
    dropout's backward (a product with the mask) and then threshold_backward at relu's output."""
    relu_out = torch.relu(specials(9, 37, torch.float32))
    g = torch.randn(relu_out.shape, generator=torch.Generator().manual_seed(0))
    keep = reference.dropout_mask(SEED_OFFSET, relu_out.numel(), dropout).reshape(relu_out.shape)
    mult = keep.float() / (1 - dropout)
    got = reference._grad_through_output(g, relu_out * mult, dropout, SEED_OFFSET)
    want = torch.ops.aten.threshold_backward(g * mult, relu_out, 0)
    assert_same(got, want, rtol=0, atol=0)  # equal values (a zero gradient's sign aside)
    assert torch.equal(got[relu_out.isnan() & keep], (g * mult)[relu_out.isnan() & keep])  # passed, not 0
    assert not got.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_layer_backward_lets_the_gradient_through_nan_outputs(backend, dtype, dropout):
    """With running statistics the backward reads dropout and ReLU off the saved output: where that
    is NaN the gradient passes (scaled by the unit's mask), where it is <= 0 it stops."""
    gen = torch.Generator().manual_seed(3)
    N, K, C = 9, 11, 37
    x = torch.randn(N, K, generator=gen, dtype=dtype)
    weight, bias = torch.randn(C, K, generator=gen, dtype=dtype), torch.randn(C, generator=gen, dtype=dtype)
    gamma, beta = torch.rand(C, generator=gen, dtype=dtype) + 0.5, torch.randn(C, generator=gen, dtype=dtype)
    mean, invstd = torch.randn(C, generator=gen, dtype=dtype), torch.rand(C, generator=gen, dtype=dtype) + 0.5
    relu_out = specials(N, C, dtype).abs()  # relu's output: NaN, +inf, +0 and positive values
    relu_out[0, :4] = -0.0
    keep = reference.dropout_mask(SEED_OFFSET, N * C, dropout).reshape(N, C)
    saved = relu_out * (keep.to(dtype) / (1 - dropout))  # the layer's output: a dropped inf is NaN
    g = torch.randn(N, C, generator=gen, dtype=dtype)
    args = (g, x, weight, bias, gamma, beta, saved, mean, invstd, False, dropout, SEED_OFFSET)
    got = to_cpu(backend.linear_bn_relu_backward(*backend.to(args)))
    want = reference.linear_bn_relu_backward(*args)
    assert_same(got, want, *TOL[dtype])
    assert torch.isfinite(want[0]).all() and torch.isfinite(want[1]).all()  # the gradient passed NaN finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("where", ["pre_bn", "grad"])
def test_batch_statistics_backward_stages_propagate(backend, dtype, dropout, where):
    """The two backward stages with a NaN or inf in pre_bn (which makes its feature's statistics
    NaN) or in grad_out."""
    gen = torch.Generator().manual_seed(4)
    N, K, C = 9, 11, 37
    x = torch.randn(N, K, generator=gen, dtype=dtype)
    weight = torch.randn(C, K, generator=gen, dtype=dtype)
    z = torch.randn(N, C, generator=gen, dtype=dtype)
    g = torch.randn(N, C, generator=gen, dtype=dtype)
    gamma, beta = torch.rand(C, generator=gen, dtype=dtype) + 0.5, torch.randn(C, generator=gen, dtype=dtype)
    for value in NONFINITE.values():
        zv, gv = (planted(z, value), g) if where == "pre_bn" else (z, planted(g, value))
        mean, invstd, _ = reference.bn_batch_stats(zv, 1e-5)
        stats = to_cpu(backend.bn_batch_stats(*backend.to((zv, 1e-5))))
        assert_same(stats, reference.bn_batch_stats(zv, 1e-5), *TOL[dtype])
        sums_args = (gv, zv, mean, invstd, gamma, beta, dropout, SEED_OFFSET)
        sums = to_cpu(backend.bn_backward_sums(*backend.to(sums_args)))
        want_sums = reference.bn_backward_sums(*sums_args)
        assert_same(sums, want_sums, *TOL[dtype])
        finish_args = (gv, x, weight, zv, mean, invstd, gamma, beta, *want_sums, N, dropout, SEED_OFFSET)
        got = to_cpu(backend.bn_backward_finish(*backend.to(finish_args)))
        want = reference.bn_backward_finish(*finish_args)
        assert_same(got, want, *TOL[dtype])
        if where == "pre_bn":
            assert want[1].isnan().any()  # the non-finite value reached the weight's gradient
        layer_args = (gv, x, weight, None, gamma, beta, zv, mean, invstd, True, dropout, SEED_OFFSET)
        assert_same(to_cpu(backend.linear_bn_relu_backward(*backend.to(layer_args))), want, *TOL[dtype])


@pytest.mark.parametrize("value", NONFINITE, ids=list(NONFINITE))
@pytest.mark.parametrize("batch_norm,mode", [(True, "batch"), (True, "running"), (False, None)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_network_ops_propagate_non_finite_input(backend, value, batch_norm, mode, dropout):
    """mlp_forward, mlp_backward and mlp_inference with one non-finite input element, against the
    reference under the same masks."""
    args = network_args(torch.float32, batch_norm, mode, dropout)
    args = (planted(args[0], NONFINITE[value]), *args[1:])
    rtol, atol = TOL[torch.float32]
    got = to_cpu(backend.mlp_forward(*backend.to(args)))
    want = reference.mlp_forward(*args)
    assert_same(got, want, rtol, atol)
    out, hidden, pre_bn, mean, invstd, _ = want
    assert not torch.isfinite(out[2]).all()  # the row of the non-finite input
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    x, weights, biases, gammas, betas = args[:5]
    bargs = (g, x, weights, biases, gammas, betas, hidden, pre_bn, mean, invstd, args[7], args[8], args[10], args[11])
    bargs += (True, [True] * len(weights))
    assert_same(to_cpu(backend.mlp_backward(*backend.to(bargs))), reference.mlp_backward(*bargs), rtol, atol)
    inference = to_cpu(backend.mlp_inference(*backend.to((x, weights, biases))))
    assert_same(inference, reference.mlp_inference(x, weights, biases), rtol, atol)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_network_backward_without_batch_norm_passes_nan_hidden_outputs(backend, dropout):
    """The no-BatchNorm backward reads ReLU and dropout off the hidden outputs: NaN among them lets
    the gradient through (times the unit's mask), as stock's ReLU backward does."""
    args = network_args(torch.float32, False, None, dropout)
    x, weights, biases = args[:3]
    out, hidden, pre_bn, mean, invstd, _ = reference.mlp_forward(*args)
    hidden = [h.clone() for h in hidden]
    hidden[0][3, :] = NAN  # NaN, kept or dropped, as a NaN input leaves a row
    hidden[1][::3, 1] = NAN
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    bargs = (g, x, weights, biases, [], [], hidden, pre_bn, mean, invstd, False, False, dropout, SEED_OFFSET)
    bargs += (True, [True] * len(weights))
    got = to_cpu(backend.mlp_backward(*backend.to(bargs)))
    want = reference.mlp_backward(*bargs)
    assert_same(got, want, *TOL[torch.float32])
    assert torch.isfinite(want[1][0]).all()  # the first layer's weight gradient: finite inputs, finite gradient


@pytest.mark.parametrize("where", ["input", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_ops_propagate_as_stock(backend, where, smoothing, reduction):
    """The cross-entropy ops with a NaN or inf logit, or class weight, against F.cross_entropy.
    Without smoothing a non-finite weight reaches only the rows of its class."""
    code = {"none": 0, "mean": 1, "sum": 2}[reduction]
    gen = torch.Generator().manual_seed(7)
    target = torch.tensor([0, 1, 4, 2, 1, 36])
    for value in NONFINITE.values():
        x, weight = torch.randn(6, 37, generator=gen), torch.rand(37, generator=gen) + 0.5
        if where == "input":
            x[2, 5] = value
        else:
            weight[1] = value
        xs = x.clone().requires_grad_()
        want = F.cross_entropy(xs, target, weight, reduction=reduction, label_smoothing=smoothing)
        grad_loss = torch.ones_like(want)
        want.backward(grad_loss)
        args = (x, target, weight, code, -100, smoothing)
        loss, lse = to_cpu(backend.cross_entropy_forward(*backend.to(args)))
        grad = to_cpu(backend.cross_entropy_backward(*backend.to((grad_loss, x, target, weight, lse, *args[3:]))))
        assert_same(loss, want)
        assert_same(grad, xs.grad)
        if where == "weight" and smoothing == 0.0 and reduction != "mean":
            assert torch.isfinite(xs.grad[target != 1]).all()  # what the test guards: untouched rows


# --- the modules against stock --------------------------------------------------------------------


def run(model, x, target, loss, grad):
    """Forward (and with grad, the loss's backward): (logits, loss, input gradient, parameter gradients)."""
    x = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        logits = model(x)
        value = loss(logits, target)
    if not grad:
        return logits, value, None, []
    value.backward()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return logits, value, x.grad, grads


@pytest.mark.cpu_parity
@pytest.mark.parametrize("value", NONFINITE, ids=list(NONFINITE))
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_mlp_matches_stock(value, batch_norm, mode):
    """MLP(impl="fused") against impl="baseline" (the stock modules and losses), without dropout:
    logits, loss, the gradients and the running statistics."""
    torch.manual_seed(0)
    fused = MLP(in_features=40, hidden=(24, 12), num_classes=5, dropout=0.0, batch_norm=batch_norm, impl="fused")
    stock = copy.deepcopy(fused)
    stock.impl = "baseline"
    x = planted(torch.randn(16, 1, 5, 8), NONFINITE[value], row=3, col=0)
    target = torch.randint(0, 5, (16,))
    for model in (fused, stock):
        model.train(mode == "train")
    grad = mode != "eval-no-grad"
    got = run(fused, x, target, fused.loss, grad)
    want = run(stock, x, target, stock.loss, grad)
    assert not torch.isfinite(want[0][3]).all()
    for a, b in zip(got[:2], want[:2]):
        assert_same(a, b, 1e-4, 1e-5)
    if grad:
        assert_same(got[2], want[2], 1e-4, 1e-5)
        assert_same(got[3], want[3], 1e-4, 1e-5)
    assert_same(list(fused.buffers()), list(stock.buffers()), 1e-4, 1e-5)


@pytest.mark.cpu_parity
@pytest.mark.parametrize("value", NONFINITE, ids=list(NONFINITE))
@pytest.mark.parametrize("batch_norm", [True, False])
def test_mlp_with_dropout_matches_the_reference_under_its_masks(value, batch_norm):
    """Training with dropout: the fused network's logits and gradients are those of the reference
    (plain PyTorch, differentiated by autograd) under the masks of the seed the module draws."""
    torch.manual_seed(1)
    fused = MLP(in_features=12, hidden=(33, 16), num_classes=5, dropout=0.4, batch_norm=batch_norm).train()
    x = planted(torch.randn(24, 12), NONFINITE[value])
    torch.manual_seed(11)
    logits = fused(x)
    logits.backward(torch.ones_like(logits))
    got = [p.grad for p in fused.parameters()]
    torch.manual_seed(11)
    seed_offset = torch.randint(0, 2**62, (2,), dtype=torch.int64)  # what the module draws
    params = {name: p.detach().clone().requires_grad_() for name, p in fused.named_parameters()}
    hidden = range(len(fused.hidden))
    weights = [params[f"hidden.{i}.linear.weight"] for i in hidden] + [params["out.weight"]]
    biases = [params[f"hidden.{i}.linear.bias"] for i in hidden] + [params["out.bias"]]
    gammas = [params[f"hidden.{i}.bn.weight"] for i in hidden] if batch_norm else []
    betas = [params[f"hidden.{i}.bn.bias"] for i in hidden] if batch_norm else []
    want = reference.mlp_forward(
        x, weights, biases, gammas, betas, [], [], batch_norm, batch_norm, 1e-5, 0.4, seed_offset
    )[0]
    want.backward(torch.ones_like(want))
    assert_same(logits, want)
    assert not torch.isfinite(want[2]).all()
    assert_same(got, [p.grad for p in params.values()], 1e-4, 1e-5)


@pytest.mark.cpu_parity
@pytest.mark.parametrize("value", NONFINITE, ids=list(NONFINITE))
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_linear_bn_relu_module_matches_stock(value, mode):
    torch.manual_seed(2)
    layer = LinearBNReLU(20, 33, dropout=0.0)
    stock = torch.nn.Sequential(copy.deepcopy(layer.linear), copy.deepcopy(layer.bn), torch.nn.ReLU())
    layer.train(mode == "train")
    stock.train(mode == "train")
    x = planted(torch.randn(16, 20), NONFINITE[value])
    grad = mode != "eval-no-grad"
    sum_loss = lambda y, _: y.sum()  # noqa: E731
    got, want = run(layer, x, None, sum_loss, grad), run(stock, x, None, sum_loss, grad)
    assert not torch.isfinite(want[0][2]).all()
    assert_same(got[0], want[0])
    if grad:
        assert_same(got[2], want[2], 1e-4, 1e-5)
        assert_same(got[3], want[3], 1e-4, 1e-5)
    assert_same(list(layer.buffers()), list(stock.buffers()))


@pytest.mark.cpu_parity
def test_cross_entropy_module_matches_stock():
    x = torch.randn(6, 7)
    x[0, 1], x[1, 2], x[2, 3], x[3] = NAN, INF, -INF, -INF
    target = torch.tensor([1, 2, 0, 4, 5, 6])
    for smoothing in (0.0, 0.1):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = CrossEntropyLoss(label_smoothing=smoothing)(xa, target)
        want = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(xb, target)
        got.backward()
        want.backward()
        assert want.isnan()
        assert_same(got, want)
        assert_same(xa.grad, xb.grad)
