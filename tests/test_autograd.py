"""Autograd on the ops (fused_mlp.autograd): direct torch.ops calls, double backward, target and
weight gradients, PyTorch's own OpInfo samples for cross-entropy, and opcheck on every op."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPUTE_OPS
from torch.testing._internal.common_methods_invocations import op_db

import fused_mlp
from fused_mlp import autograd, functional, ops

fused = torch.ops.fused_mlp
f64 = dict(dtype=torch.float64)


def test_schemas_are_those_of_the_ops():
    for name, schema in ops.SCHEMAS.items():
        # Compared as parsed: the printed form of an optional mutable list ("Tensor?(a!)[]") is not
        # the form the parser takes ("Tensor(a!)?[]").
        assert str(getattr(fused, name).default._schema) == str(torch._C.parse_schema(f"fused_mlp::{schema}")), name


def test_every_compute_op_has_autograd_and_a_vmap_rule():
    for name in COMPUTE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_mlp::{name}", "Autograd"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_mlp::{name}", "FuncTorchBatched"), name


# --- direct calls of the ops --------------------------------------------------------------------


def test_direct_cross_entropy_op_call_is_differentiable():
    x = torch.randn(6, 5, **f64, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    loss, _ = fused.cross_entropy_forward(x, target, None, 1, -100, 0.1)
    (got,) = torch.autograd.grad(loss, x)
    (want,) = torch.autograd.grad(F.cross_entropy(x, target, label_smoothing=0.1), x)
    torch.testing.assert_close(got, want)


def test_direct_layer_op_call_is_differentiable():
    torch.manual_seed(0)
    x, w, b = torch.randn(8, 4, **f64), torch.randn(3, 4, **f64), torch.randn(3, **f64)
    gamma, beta = torch.rand(3, **f64) + 0.5, torch.randn(3, **f64)
    params = [t.requires_grad_() for t in (x, w, b, gamma, beta)]
    out = fused.linear_bn_relu_forward(
        x, w, b, gamma, beta, None, None, True, 1e-5, 0.0, torch.zeros(2, dtype=torch.long)
    )[0]
    want = F.relu(F.batch_norm(F.linear(x, w, b), None, None, gamma, beta, training=True))
    g = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, e)


def test_logsumexp_output_is_differentiable():
    x = torch.randn(4, 6, **f64, requires_grad=True)
    _, lse = fused.cross_entropy_forward(x, torch.randint(0, 6, (4,)), None, 1, -100, 0.0)
    torch.testing.assert_close(torch.autograd.grad(lse.sum(), x)[0], torch.softmax(x, 1))


def test_direct_calls_outside_grad_mode_take_no_autograd_path():
    x = torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        loss, _ = autograd.CROSS_ENTROPY(x, torch.randint(0, 6, (4,)), None, 1, -100, 0.0)
    assert loss.grad_fn is None and not loss.requires_grad


# --- double backward ----------------------------------------------------------------------------


def ce_cases():
    for target_kind, weighted, reduction, smoothing in itertools.product(
        ("index", "index_ignored", "prob"), (False, True), ("none", "mean", "sum"), (0.0, 0.2)
    ):
        yield pytest.param(
            target_kind, weighted, reduction, smoothing, id=f"{target_kind}-w{int(weighted)}-{reduction}-ls{smoothing}"
        )


def ce_inputs(target_kind, weighted, rows=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=g, **f64, requires_grad=True)
    if target_kind == "prob":
        target = torch.softmax(torch.randn(rows, classes, generator=g, **f64), 1).requires_grad_()
    else:
        target = torch.randint(0, classes, (rows,), generator=g)
        if target_kind == "index_ignored":
            target[1] = 2
    weight = torch.rand(classes, generator=g, **f64) + 0.5 if weighted else None
    if weight is not None and target_kind == "prob":
        weight.requires_grad_()
    return x, target, weight


@pytest.mark.parametrize("target_kind, weighted, reduction, smoothing", list(ce_cases()))
def test_cross_entropy_gradgradcheck(target_kind, weighted, reduction, smoothing):
    x, target, weight = ce_inputs(target_kind, weighted)
    ignore_index = 2 if target_kind == "index_ignored" else -100
    inputs = [t for t in (x, target, weight) if t is not None and t.requires_grad]

    def loss(*args):
        it = iter(args)
        xx = next(it)
        tt = next(it) if target.requires_grad else target
        ww = next(it) if weight is not None and weight.requires_grad else weight
        return functional.cross_entropy(
            xx, tt, ww, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing
        )

    assert torch.autograd.gradcheck(loss, inputs)
    assert torch.autograd.gradgradcheck(loss, inputs)


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias, affine", [(True, True), (False, False)])
def test_layer_gradgradcheck(training, dropout, bias, affine):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g, **f64)
    w = torch.randn(3, 4, generator=g, **f64)
    b = torch.randn(3, generator=g, **f64) if bias else None
    gamma = torch.rand(3, generator=g, **f64) + 0.5 if affine else None
    beta = torch.randn(3, generator=g, **f64) if affine else None
    rm, rv = torch.randn(3, generator=g, **f64), torch.rand(3, generator=g, **f64) + 0.5
    inputs = [t.requires_grad_() for t in (x, w, b, gamma, beta) if t is not None]

    def layer(*args):
        it = iter(args)
        xx, ww = next(it), next(it)
        bb = next(it) if bias else None
        gg, be = (next(it), next(it)) if affine else (None, None)
        return functional.linear_bn_relu(
            xx,
            ww,
            bb,
            bn_weight=gg,
            bn_bias=be,
            running_mean=None if training else rm,
            running_var=None if training else rv,
            training=training,
            dropout=dropout,
            generator=torch.Generator().manual_seed(5),  # the same mask on every call
        )

    assert torch.autograd.gradcheck(layer, inputs)
    assert torch.autograd.gradgradcheck(layer, inputs)


def test_gradient_penalty_through_the_layer_equals_stock():
    torch.manual_seed(0)
    stock = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU()).double()
    layer = fused_mlp.nn.LinearBNReLU.from_modules(stock[0], stock[1])
    x = torch.randn(7, 5, **f64, requires_grad=True)
    penalties = []
    for model in (stock, layer):
        (gx,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
        penalty = gx.pow(2).sum()
        penalties.append(torch.autograd.grad(penalty, [x, *stock.parameters()]))
    for a, b in zip(*penalties):
        torch.testing.assert_close(a, b)


def test_third_derivative_of_cross_entropy():
    x = torch.randn(3, 4, **f64, requires_grad=True)
    t = torch.tensor([0, 3, 1])
    results = []
    for fn in (functional.cross_entropy, F.cross_entropy):
        (g1,) = torch.autograd.grad(fn(x, t), x, create_graph=True)
        (g2,) = torch.autograd.grad(g1.pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(g2.sum(), x)[0])
    torch.testing.assert_close(results[0], results[1])


# --- target and weight gradients -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_probability_target_and_weight_gradients_equal_stock(dtype, reduction, smoothing):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g, dtype=dtype)
    target = torch.softmax(torch.randn(6, 5, generator=g, dtype=dtype), 1)
    weight = torch.rand(5, generator=g, dtype=dtype) + 0.5
    grads = []
    for fn in (functional.cross_entropy, F.cross_entropy):
        leaves = [t.clone().requires_grad_() for t in (x, target, weight)]
        loss = fn(leaves[0], leaves[1], leaves[2], reduction=reduction, label_smoothing=smoothing)
        grads.append(torch.autograd.grad(loss.sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_weight_requiring_grad_with_class_targets_is_refused_as_stock_does():
    x = torch.randn(4, 3, requires_grad=True)
    weight = torch.rand(3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 1])
    with pytest.raises(RuntimeError, match="weight"):
        F.cross_entropy(x, target, weight)
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        functional.cross_entropy(x, target, weight)
    with torch.no_grad():  # nothing is differentiated: fine
        functional.cross_entropy(x, target, weight)
    loss, _ = fused.cross_entropy_forward(x, target, weight, 1, -100, 0.0)  # the op itself: at backward
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        loss.backward()


# --- PyTorch's OpInfo samples -------------------------------------------------------------------

CROSS_ENTROPY_OPINFO = next(o for o in op_db if o.name == "nn.functional.cross_entropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opinfo_samples_of_cross_entropy(dtype):
    samples = list(CROSS_ENTROPY_OPINFO.sample_inputs("cpu", dtype, requires_grad=True))
    assert len(samples) >= 20
    for sample in samples:
        results = []
        for fn in (functional.cross_entropy, F.cross_entropy):
            leaves = [
                t.detach().clone().requires_grad_(t.requires_grad)
                for t in (sample.input, *sample.args, *sample.kwargs.values())
                if isinstance(t, torch.Tensor)
            ]
            it = iter(leaves)
            x = next(it)
            args = [next(it) if isinstance(a, torch.Tensor) else a for a in sample.args]
            kwargs = {k: next(it) if isinstance(v, torch.Tensor) else v for k, v in sample.kwargs.items()}
            loss = fn(x, *args, **kwargs)
            wrt = [t for t in leaves if t.requires_grad]
            cotangent = torch.ones_like(loss)
            results.append((loss, torch.autograd.grad(loss, wrt, cotangent)))
        (loss, grads), (want_loss, want_grads) = results
        torch.testing.assert_close(loss, want_loss, msg=lambda m: f"{sample}: {m}")
        assert len(grads) == len(want_grads) >= 1
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, msg=lambda m: f"{sample}: {m}")


# --- opcheck on every op ------------------------------------------------------------------------


def _seed_offset():
    return torch.tensor([1234, 8], dtype=torch.int64)


def opcheck_samples():
    """(op name, args, whether some input requires grad) for every op."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    samples = []
    for grad in (False, True):
        x, t = rand(6, 5, grad=grad), torch.randint(0, 5, (6,), generator=g)
        prob = torch.softmax(rand(6, 5), 1).requires_grad_(grad)
        w = torch.rand(5, generator=g) + 0.5
        for reduction in (0, 1, 2):
            samples.append(("cross_entropy_forward", (x, t, w, reduction, -100, 0.1), grad))
            samples.append(("cross_entropy_forward", (x, prob, None, reduction, -100, 0.0), grad))
            loss, lse = fused.cross_entropy_forward(x.detach(), t, w, reduction, -100, 0.1)
            samples.append(
                (
                    "cross_entropy_backward",
                    (torch.ones_like(loss).requires_grad_(grad), x, t, w, lse, reduction, -100, 0.1),
                    grad,
                )
            )
        inp, weight, bias = rand(8, 4, grad=grad), rand(3, 4, grad=grad), rand(3, grad=grad)
        gamma, beta = (torch.rand(3, generator=g) + 0.5).requires_grad_(grad), rand(3, grad=grad)
        rm, rv = torch.zeros(3), torch.ones(3)
        for use_batch_stats, p in ((True, 0.0), (True, 0.3), (False, 0.3)):
            args = (inp, weight, bias, gamma, beta, rm, rv, use_batch_stats, 1e-5, p, _seed_offset())
            samples.append(("linear_bn_relu_forward", args, grad))
            out, pre_bn, mean, invstd, _ = fused.linear_bn_relu_forward(
                *(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            )
            saved = pre_bn if use_batch_stats else out
            bargs = (
                rand(8, 3, grad=grad),
                inp,
                weight,
                bias,
                gamma,
                beta,
                saved,
                mean,
                invstd,
                use_batch_stats,
                p,
                _seed_offset(),
                True,
            )
            samples.append(("linear_bn_relu_backward", bargs, grad))
        z = rand(8, 3, grad=grad)
        samples.append(("bn_batch_stats", (z, 1e-5), grad))
        mean, invstd, _ = fused.bn_batch_stats(z.detach(), 1e-5)
        samples.append(("bn_relu_dropout", (z, mean, invstd, gamma, beta, 0.3, _seed_offset()), grad))
        samples.append(("linear_relu_dropout_forward", (inp, weight, bias, 0.3, _seed_offset()), grad))
        samples.append(
            ("bn_update_running_stats_", (torch.zeros(3), torch.ones(3), rand(3, grad=grad), rand(3).abs(), 0.1), grad)
        )
        samples.append(("philox_seed_offset", (rand(3, grad=grad), torch.Generator().manual_seed(3)), grad))
    samples.append(("philox4x32_10", (torch.randint(0, 2**32, (5, 4), generator=g), torch.tensor([7, 9])), False))
    samples.append(("dropout_mask", (_seed_offset(), 37, 0.3, 5), False))
    return samples


def test_philox_seed_offset_draws_what_torch_randint_draws():
    generator = torch.Generator().manual_seed(11)
    got = fused.philox_seed_offset(torch.empty(3), generator)
    want = torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=torch.Generator().manual_seed(11))
    assert torch.equal(got, want)
    torch.manual_seed(4)
    first = fused.philox_seed_offset(torch.empty(3))
    torch.manual_seed(4)
    assert torch.equal(fused.philox_seed_offset(torch.empty(3)), first)


def _opcheck_id(sample):
    return f"{sample[0]}-{'grad' if sample[2] else 'nograd'}"


@pytest.mark.parametrize("sample", opcheck_samples(), ids=_opcheck_id)
def test_opcheck(sample):
    name, args, _ = sample
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if name not in ("philox_seed_offset", "bn_update_running_stats_"):
        tests += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(getattr(fused, name).default, args, test_utils=tests)
