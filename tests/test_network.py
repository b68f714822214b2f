"""The whole network as one op per pass: the mlp_* ops of every backend against fused_mlp.reference,
and fused_mlp.nn.FusedMLP (and MLP(impl="fused"), which runs through it) against the stock modules."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_extension

from fused_mlp import autograd, functional, reference
from fused_mlp.models import MLP
from fused_mlp.nn import FusedMLP

pytestmark = pytest.mark.timeout(900)

TOL = {torch.float32: (3e-5, 3e-5), torch.float64: (1e-10, 1e-10), torch.bfloat16: (5e-2, 5e-2)}
SEED_OFFSET = torch.tensor([987654321, 17])
WIDTHS = (12, 33, 16, 7, 5)


def network_args(dtype, batch_norm, mode, dropout, rows=24, bias=True, affine=True, widths=WIDTHS):
    """mlp_forward's arguments for a small network with every awkward width (not a multiple of 4 or 8)."""
    g = torch.Generator().manual_seed(rows + 7 * len(widths) + int(batch_norm))
    x = torch.randn(rows, widths[0], generator=g, dtype=torch.float64).to(dtype)
    weights = [
        (torch.randn(b, a, generator=g, dtype=torch.float64) / a**0.5).to(dtype) for a, b in zip(widths, widths[1:])
    ]
    biases = [(torch.randn(b, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None for b in widths[1:]]
    hidden = widths[1:-1]
    if not batch_norm:
        return (x, weights, biases, [], [], [], [], False, False, 1e-5, dropout, SEED_OFFSET)
    gammas = [torch.rand(c, generator=g) + 0.5 for c in hidden] if affine else []
    betas = [torch.randn(c, generator=g) * 0.1 for c in hidden] if affine else []
    running = mode == "running"
    means = [torch.randn(c, generator=g) * 0.1 for c in hidden] if running else []
    variances = [torch.rand(c, generator=g) + 0.5 for c in hidden] if running else []
    return (x, weights, biases, gammas, betas, means, variances, True, not running, 1e-5, dropout, SEED_OFFSET)


def to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def assert_nested_close(got, want, rtol, atol):
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got.to(want.dtype), want, rtol=rtol, atol=atol)
        return
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert_nested_close(a, b, rtol, atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "batch_norm,mode",
    [(True, "batch"), (True, "running"), (False, None)],
)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_network_ops_match_reference(backend, dtype, batch_norm, mode, dropout):
    args = network_args(dtype, batch_norm, mode, dropout)
    rtol, atol = TOL[dtype]
    got = to_cpu(backend.mlp_forward(*backend.to(args)))
    want = reference.mlp_forward(*args)
    assert_nested_close(got, want, rtol, atol)

    out, hidden, pre_bn, mean, invstd, _ = want
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    x, weights, biases, gammas, betas = args[:5]
    tail = (args[7], args[8], args[10], args[11])
    for need_input, needs in ((True, [True] * 4), (False, [True] * 4), (False, [False, True, False, True])):
        bargs = (g, x, weights, biases, gammas, betas, hidden, pre_bn, mean, invstd, *tail, need_input, needs)
        got_grads = to_cpu(backend.mlp_backward(*backend.to(bargs)))
        want_grads = reference.mlp_backward(*bargs)
        assert_nested_close(got_grads, want_grads, rtol, atol)
        if batch_norm and mode == "batch":  # the hidden outputs left out: recomputed from pre_bn
            without = bargs[:6] + ([],) + bargs[7:]
            assert_nested_close(to_cpu(backend.mlp_backward(*backend.to(without))), want_grads, rtol, atol)
            assert_nested_close(reference.mlp_backward(*without), want_grads, rtol, atol)
        assert (got_grads[0].numel() > 0) == need_input
        for flag, grad in zip(needs, got_grads[1]):
            assert (grad.numel() > 0) == flag  # a layer that needs no gradient gets none, and no GEMM

    # Inference takes weights with BatchNorm already folded in; any weights serve to compare.
    got_inference = to_cpu(backend.mlp_inference(*backend.to((x, weights, biases))))
    torch.testing.assert_close(got_inference, reference.mlp_inference(x, weights, biases), rtol=rtol, atol=atol)


def test_layers_get_independent_masks_from_one_draw(backend):
    x, weights, biases, *rest = network_args(torch.float32, False, None, 0.5, widths=(8, 64, 64, 3))
    _, hidden, *_ = to_cpu(backend.mlp_forward(*backend.to((x, weights, biases, *rest))))
    same_inputs = [torch.ones(24, 64), torch.ones(24, 64)]
    masks = [
        reference.dropout_mask(reference.layer_seed_offset(SEED_OFFSET, i, 0.5), t.numel(), 0.5).reshape(t.shape)
        for i, t in enumerate(same_inputs)
    ]
    assert not torch.equal(masks[0], masks[1])
    for h, m in zip(hidden, masks):
        assert not h[~m].any()  # every dropped unit is zero


# --- the module against stock PyTorch ------------------------------------------------------------


def stock_twin(model):
    """The stock nn.Sequential of the same parameters (deep copies)."""
    layers = []
    for layer in model.hidden:
        layers.append(copy.deepcopy(layer.linear))
        if model.batch_norm:
            layers.append(copy.deepcopy(layer.bn))
        layers += [torch.nn.ReLU(), torch.nn.Dropout(model.dropout)]
    layers.append(copy.deepcopy(model.out))
    return torch.nn.Sequential(*layers)


def fused_parameters(model):
    """The fused model's parameters and buffers in the stock twin's order."""
    tensors = []
    for layer in model.hidden:
        tensors += [layer.linear.weight, layer.linear.bias]
        if model.batch_norm:
            bn = layer.bn
            tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked]
    return tensors + [model.out.weight, model.out.bias]


def stock_parameters(stock):
    tensors = []
    for m in stock:
        if isinstance(m, torch.nn.Linear):
            tensors += [m.weight, m.bias]
        elif isinstance(m, torch.nn.BatchNorm1d):
            tensors += [m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked]
    return tensors


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_matches_stock_over_steps(batch_norm, momentum):
    torch.manual_seed(0)
    model = FusedMLP(20, (32, 16, 8), 5, batch_norm=batch_norm, dropout=0.0, momentum=momentum)
    stock = stock_twin(model)
    fused_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stock_opt = torch.optim.SGD(stock.parameters(), lr=0.1)
    for _ in range(4):
        x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
        fused_loss = functional.cross_entropy(model(x), y)
        stock_loss = F.cross_entropy(stock(x), y)
        torch.testing.assert_close(fused_loss, stock_loss, rtol=1e-5, atol=1e-6)
        fused_loss.backward()
        stock_loss.backward()
        for a, b in zip(fused_parameters(model), stock_parameters(stock)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            if b.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
        fused_opt.step()
        stock_opt.step()
        fused_opt.zero_grad()
        stock_opt.zero_grad()
    model.eval()
    stock.eval()
    x = torch.randn(16, 20, requires_grad=True)
    x_stock = x.detach().clone().requires_grad_()
    torch.testing.assert_close(model(x), stock(x_stock), rtol=1e-5, atol=1e-6)
    model(x).sum().backward()  # eval with gradients: running statistics, no folding
    stock(x_stock).sum().backward()
    torch.testing.assert_close(x.grad, x_stock.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # eval inference: one op on the folded weights
        torch.testing.assert_close(model(x), stock(x), rtol=1e-5, atol=1e-6)


def test_folded_weights_follow_the_parameters():
    torch.manual_seed(1)
    model = FusedMLP(10, (8, 6), 3).eval()
    stock = stock_twin(model).eval()
    x = torch.randn(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x))
        model.hidden[1].bn.running_var.mul_(3.0)  # an in-place change the cache must see
        stock[5].running_var.mul_(3.0)
        torch.testing.assert_close(model(x), stock(x))


def test_frozen_layers_get_no_gradient_and_the_rest_match():
    torch.manual_seed(2)
    model = FusedMLP(20, (32, 16), 5, dropout=0.0)
    stock = stock_twin(model)
    for p in list(model.hidden[0].parameters()) + list(stock[0].parameters()) + list(stock[1].parameters()):
        p.requires_grad_(False)
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    functional.cross_entropy(model(x), y).backward()
    F.cross_entropy(stock(x), y).backward()
    assert model.hidden[0].linear.weight.grad is None and model.hidden[0].bn.weight.grad is None
    torch.testing.assert_close(model.hidden[1].linear.weight.grad, stock[4].weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.out.weight.grad, stock[8].weight.grad, rtol=1e-5, atol=1e-6)


def test_mlp_fused_impl_runs_the_network_op_with_and_without_batch_norm():
    for batch_norm, hidden in ((True, (64, 32)), (False, (128, 64))):
        torch.manual_seed(3)
        fused = MLP(hidden=hidden, dropout=0.0, batch_norm=batch_norm, impl="fused")
        baseline = copy.deepcopy(fused)
        baseline.impl = "baseline"
        x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
        logits = fused(x)
        assert logits.grad_fn.name() == "MLPBackward"  # one autograd node for the whole network
        fused.loss(logits, y).backward()
        baseline.loss(baseline(x), y).backward()
        for (name, a), b in zip(fused.named_parameters(), baseline.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert fused.state_dict().keys() == baseline.state_dict().keys()


def test_dropout_masks_are_the_reference_masks_for_the_drawn_seed():
    model = FusedMLP(12, (33, 16), 5, batch_norm=True, dropout=0.4)
    x = torch.randn(24, 12)
    torch.manual_seed(11)
    got = model(x)
    torch.manual_seed(11)
    seed_offset = torch.randint(0, 2**62, (2,), dtype=torch.int64)  # what the module draws
    weights = [layer.linear.weight for layer in model.hidden] + [model.out.weight]
    biases = [layer.linear.bias for layer in model.hidden] + [model.out.bias]
    gammas = [layer.bn.weight for layer in model.hidden]
    betas = [layer.bn.bias for layer in model.hidden]
    want = reference.mlp_forward(x, weights, biases, gammas, betas, [], [], True, True, 1e-5, 0.4, seed_offset)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.manual_seed(11)
    torch.testing.assert_close(FusedMLP.forward(model, x), got)  # reproducible under torch.manual_seed


@pytest.mark.parametrize("batch_norm", [True, False])
def test_gradcheck_and_gradgradcheck(batch_norm):
    torch.manual_seed(4)
    args = network_args(torch.float64, batch_norm, "batch", 0.3, rows=6, widths=(4, 5, 3, 2))
    x, weights, biases, gammas, betas = args[:5]
    layers = len(weights) - 1
    config = autograd.MLPConfig(layers, batch_norm, True, 1e-5, 0.3, layers if batch_norm else 0)
    n = config.n_bn
    leaves = [t.double().requires_grad_() for t in (x, *weights, *biases, *gammas, *betas)]

    def f(*ts):
        x, rest = ts[0], ts[1:]
        tensors = (*rest, *([None] * (2 * n)), SEED_OFFSET)
        return autograd.MLP.apply(config, x, *tensors)[0]

    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@needs_extension
@pytest.mark.parametrize("batch_norm,mode", [(True, "batch"), (True, "running"), (False, None)])
def test_opcheck(batch_norm, mode):
    args = network_args(torch.float32, batch_norm, mode, 0.3, rows=8)
    args = (args[0].requires_grad_(), [w.requires_grad_() for w in args[1]], *args[2:])
    torch.library.opcheck(torch.ops.fused_mlp.mlp_forward.default, args)
    out, hidden, pre_bn, mean, invstd, _ = torch.ops.fused_mlp.mlp_forward(*args)
    x, weights, biases, gammas, betas = (a.detach() if isinstance(a, torch.Tensor) else a for a in args[:5])
    weights = [w.detach() for w in weights]
    bargs = (torch.randn_like(out), x, weights, biases, gammas, betas, hidden, pre_bn, mean, invstd)
    bargs += (args[7], args[8], args[10], args[11], True, [True] * len(weights))
    torch.library.opcheck(torch.ops.fused_mlp.mlp_backward.default, bargs)
    torch.library.opcheck(torch.ops.fused_mlp.mlp_inference.default, (x, weights, biases))


@pytest.mark.parametrize("batch_norm", [True, False])
def test_torch_compile_fullgraph(batch_norm):
    torch.manual_seed(5)
    model = FusedMLP(20, (16, 8), 4, batch_norm=batch_norm, dropout=0.0)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 20)
    out, want = compiled(x), twin(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    want.sum().backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)


def test_autocast_bfloat16_on_the_cpu():
    torch.manual_seed(6)
    model = FusedMLP(20, (32, 16), 5, dropout=0.0)
    stock = stock_twin(model)
    x = torch.randn(16, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(x), stock(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
    for layer, bn in ((model.hidden[0], stock[1]), (model.hidden[1], stock[5])):
        torch.testing.assert_close(layer.bn.running_mean, bn.running_mean, rtol=2e-2, atol=2e-2)


def test_torch_func_and_double_backward():
    torch.manual_seed(7)
    model = FusedMLP(10, (12, 8), 3, dropout=0.0, track_running_stats=False)
    stock = stock_twin(model)
    x, y = torch.randn(6, 10), torch.randint(0, 3, (6,))
    params = dict(model.named_parameters())
    stock_params = dict(stock.named_parameters())

    def loss(p, module, x):
        return F.cross_entropy(torch.func.functional_call(module, p, (x,)), y)

    got = torch.func.grad(loss)(params, model, x)  # layer by layer under the transform
    want = torch.func.grad(loss)(stock_params, stock, x)
    for a, b in zip(got.values(), want.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    x = x.double().requires_grad_()
    model.double()
    stock.double()
    x_stock = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(F.cross_entropy(model(x), y), x, create_graph=True)
    (gs,) = torch.autograd.grad(F.cross_entropy(stock(x_stock), y), x_stock, create_graph=True)
    torch.testing.assert_close(gx, gs)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)
    (ggs,) = torch.autograd.grad(gs.pow(2).sum(), x_stock)
    torch.testing.assert_close(ggx, ggs)


def test_running_statistics_update_under_a_transform_is_refused():
    model = FusedMLP(10, (12,), 3)
    params = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="running statistics"):
        torch.func.grad(lambda p: torch.func.functional_call(model, p, (torch.randn(4, 10),)).sum())(params)


def test_bad_input_is_refused_and_leaves_the_state_untouched():
    model = FusedMLP(10, (12, 8), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="expects 10"):
        model(torch.randn(4, 11))
    with pytest.raises(ValueError, match="input must have shape"):
        model(torch.randn(4))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.randn(4, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value"):
        model(torch.randn(1, 10))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="dropout"):
        FusedMLP(10, (12,), 3, dropout=1.0)


@needs_extension
def test_op_errors_name_the_argument():
    x, weights, biases, *rest = network_args(torch.float32, False, None, 0.0)
    with pytest.raises(RuntimeError, match=r"weights\[2\] must have shape"):
        torch.ops.fused_mlp.mlp_forward(x, weights[:2] + [weights[3]], biases[:3], *rest)
    with pytest.raises(RuntimeError, match="biases must have one entry"):
        torch.ops.fused_mlp.mlp_forward(x, weights, biases[:2], *rest)
    with pytest.raises(RuntimeError, match="seed_offset"):
        torch.ops.fused_mlp.mlp_forward(x, weights, biases, *rest[:-2], 0.5, torch.zeros(3, dtype=torch.long))


@needs_extension
@pytest.mark.cpu_parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["finite", "nan feature", "inf gradient"])
def test_network_backward_reads_kept_units_off_the_output_as_the_layer_regenerates_them(dtype, case):
    """With batch statistics and dropout the CPU network backward reads which units were kept off
    the hidden output (regenerating the mask only where that output is NaN); the layer op
    regenerates the whole mask. Bit for bit the same gradients, NaN and inf included."""
    fused = torch.ops.fused_mlp
    x, weights, biases, gammas, betas, *rest = network_args(dtype, True, "batch", 0.3, rows=40, widths=(12, 37, 5))
    if case == "nan feature":
        weights[0][3, 2] = float("nan")  # feature 3's statistics and outputs are NaN, kept or dropped
    out, hidden, pre_bn, mean, invstd, _ = fused.mlp_forward(x, weights, biases, gammas, betas, *rest)
    g = torch.randn_like(out)
    if case == "inf gradient":
        g[4, 1] = float("inf")  # through a dropped unit: inf * 0 = NaN, as stock's dropout backward
    assert (hidden[0] == 0).any() and (hidden[0] > 0).any()
    args = (True, True, 0.3, SEED_OFFSET, True, [True, True])
    gx, gw, gb, ggamma, gbeta = fused.mlp_backward(
        g, x, weights, biases, gammas, betas, hidden, pre_bn, mean, invstd, *args
    )
    # The same backward layer by layer: the output Linear through the network op with no hidden layer
    # (the same GEMMs), then the hidden layer through the layer op, which regenerates its mask.
    g1 = fused.mlp_backward(g, hidden[0], weights[1:], biases[1:], [], [], [], [], [], [], False, False, 0.0,
                            SEED_OFFSET, True, [True])[0]  # fmt: skip
    want = fused.linear_bn_relu_backward(
        g1, x, weights[0], biases[0], gammas[0], betas[0], pre_bn[0], mean[0], invstd[0], True, 0.3, SEED_OFFSET
    )
    for got, expected in zip((gx, gw[0], gb[0], ggamma[0], gbeta[0]), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    if case != "finite":
        assert gw[0].isnan().any()
