"""The fused cross-entropy against torch.nn.functional.cross_entropy and fused_mlp.reference."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fused_mlp
from fused_mlp import nn as fnn
from fused_mlp.functional import cross_entropy

REDUCTIONS = ["none", "mean", "sum"]
TOLERANCES = {  # (rtol, atol) against the stock op computed in float64
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def make_case(shape, target_kind, dtype, weighted, ignore, seed=0, scale=3.0):
    """Logits of `shape` (classes along dim 1, or dim 0 for 1-D), a target, optional weights."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    class_dim = 1 if len(shape) >= 2 else 0
    classes = shape[class_dim]
    if target_kind == "index":
        tshape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
        target = torch.randint(0, classes, tshape, generator=g)
        if ignore and target.numel() > 1:
            target.view(-1)[::3] = -100
    else:
        target = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), class_dim).to(dtype)
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    return x, target, weight


def stock(x, target, weight, **kw):
    """F.cross_entropy in float64 and its gradient."""
    xd = x.detach().double().requires_grad_()
    td = target.double() if target.is_floating_point() else target
    wd = weight.double() if weight is not None else None
    loss = F.cross_entropy(xd, td, wd, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, xd, g)
    return loss, grad, g


def fused(x, target, weight, g, **kw):
    xf = x.detach().clone().requires_grad_()
    loss = cross_entropy(xf, target, weight, **kw)
    (grad,) = torch.autograd.grad(loss, xf, g.to(loss.dtype))
    return loss, grad


GRID = list(
    itertools.product(
        [(37,), (16, 5), (9, 1000), (3, 4, 5), (2, 7, 3, 2)],  # 1-D, 2-D, k-dimensional
        ["index", "prob"],
        [False, True],  # weight
        [0.0, 0.2],  # label smoothing
        REDUCTIONS,
    )
)


@pytest.mark.cpu_parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,target_kind,weighted,smoothing,reduction", GRID)
def test_parity_with_stock(dtype, shape, target_kind, weighted, smoothing, reduction):
    x, target, weight = make_case(shape, target_kind, dtype, weighted, ignore=True)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    want_loss, want_grad, g = stock(x, target, weight, **kw)
    loss, grad = fused(x, target, weight, g, **kw)
    rtol, atol = TOLERANCES[dtype]
    assert loss.dtype == dtype and loss.shape == want_loss.shape
    assert grad.dtype == dtype and grad.shape == x.shape
    torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=atol * max(1.0, want_loss.abs().max().item()))
    torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(6, 4), (5,), (2, 3, 4)])
@pytest.mark.parametrize("target_kind,ignore", [("index", False), ("index", True), ("prob", False)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(shape, target_kind, ignore, weighted, smoothing, reduction):
    x, target, weight = make_case(shape, target_kind, torch.float64, weighted, ignore=ignore)
    x.requires_grad_()

    def f(inp):
        return cross_entropy(inp, target, weight, reduction=reduction, label_smoothing=smoothing)

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.cpu_parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_large_vocabulary(dtype, target_kind):
    # C = 50,000 spans 13 kernel tiles: exercises the merge of per-tile softmax states.
    x, target, weight = make_case((3, 50_000), target_kind, dtype, weighted=True, ignore=False)
    for smoothing in (0.0, 0.1):
        want_loss, want_grad, g = stock(x, target, weight, label_smoothing=smoothing)
        loss, grad = fused(x, target, weight, g, label_smoothing=smoothing)
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=atol)
        torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=atol)


@pytest.mark.cpu_parity
@pytest.mark.parametrize("classes", [10, 50_000])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_extreme_logits(classes, target_kind):
    # +-1e4: exp overflows float32 without max-subtraction.
    x, target, weight = make_case((4, classes), target_kind, torch.float32, weighted=False, ignore=False, scale=1.0)
    x = torch.where(x > 0, torch.full_like(x, 1e4), torch.full_like(x, -1e4)) + x
    for smoothing in (0.0, 0.1):
        want_loss, want_grad, g = stock(x, target, None, reduction="none", label_smoothing=smoothing)
        loss, grad = fused(x, target, None, g, reduction="none", label_smoothing=smoothing)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-2)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.cpu_parity
def test_module_matches_stock_module():
    x, target, weight = make_case((12, 7), "index", torch.float32, weighted=True, ignore=True)
    ours = fnn.CrossEntropyLoss(weight, ignore_index=-100, reduction="sum", label_smoothing=0.05)
    theirs = torch.nn.CrossEntropyLoss(weight, ignore_index=-100, reduction="sum", label_smoothing=0.05)
    torch.testing.assert_close(ours(x, target), theirs(x, target))
    assert "weight" in dict(ours.named_buffers())
    assert fused_mlp.cross_entropy is cross_entropy


def test_keyword_only_options():
    x, target, _ = make_case((4, 3), "index", torch.float32, False, False)
    with pytest.raises(TypeError):
        cross_entropy(x, target, None, -100)  # the stock positional order would pass size_average here
    with pytest.raises(TypeError):
        fnn.CrossEntropyLoss(None, None)


def test_custom_ignore_index_and_uint8_target():
    x, _, _ = make_case((6, 5), "index", torch.float32, False, False)
    target = torch.tensor([0, 4, 2, 4, 1, 3])
    for t in (target, target.to(torch.uint8)):
        torch.testing.assert_close(cross_entropy(x, t, ignore_index=4), F.cross_entropy(x, t, ignore_index=4))


def test_all_targets_ignored_and_empty_batch_follow_pytorch():
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.full((3,), -100)
    assert torch.isnan(cross_entropy(x, t)) and torch.isnan(F.cross_entropy(x, t))
    assert cross_entropy(x, t, reduction="sum").item() == 0.0
    cross_entropy(x, t, reduction="sum").backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    empty = torch.randn(0, 4, requires_grad=True)
    for reduction in REDUCTIONS:
        for t in (torch.zeros(0, dtype=torch.long), torch.zeros(0, 4)):
            ours = cross_entropy(empty, t, reduction=reduction)
            theirs = F.cross_entropy(empty, t, reduction=reduction)
            torch.testing.assert_close(ours, theirs, equal_nan=True)
    cross_entropy(empty, torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    assert empty.grad.shape == (0, 4)


@pytest.mark.cpu_parity
def test_nan_and_inf_propagate_as_pytorch():
    x = torch.tensor(
        [
            [float("nan"), 1.0, 2.0],
            [float("inf"), 1.0, 0.0],
            [float("-inf"), 1.0, 0.0],
            [float("-inf")] * 3,
            [0.5, 1.0, 2.0],
        ],
        requires_grad=True,
    )
    t = torch.tensor([1, 1, 1, 1, 0])
    for smoothing in (0.0, 0.1):
        xs = x.detach().clone().requires_grad_()
        want = F.cross_entropy(xs, t, reduction="none", label_smoothing=smoothing)
        want.sum().backward()
        xo = x.detach().clone().requires_grad_()
        got = cross_entropy(xo, t, reduction="none", label_smoothing=smoothing)
        got.sum().backward()
        torch.testing.assert_close(got, want, equal_nan=True)
        torch.testing.assert_close(xo.grad, xs.grad, equal_nan=True)


@pytest.mark.cpu_parity
@pytest.mark.parametrize("classes", [100, 5000, 20_000])
@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_non_finite_logits_in_long_rows_propagate_as_pytorch(classes, position):
    """Rows of one tile and of several: a NaN, a +inf and a -inf placed first, in a later tile, or
    last, among finite logits, and a row of -inf with one finite logit. Against stock in float64:
    stock's own float32 smoothing gradient varies with the instruction set by more than ours."""
    g = torch.Generator().manual_seed(classes)
    x = torch.randn(5, classes, generator=g)
    col = {"first": 0, "middle": classes // 2 + 7, "last": classes - 1}[position]
    x[0, col], x[1, col], x[2, col] = float("nan"), float("inf"), float("-inf")
    x[3] = float("-inf")
    x[3, col] = 1.5
    t = torch.tensor([1, 2, 3, col, 0])
    for smoothing in (0.0, 0.1):
        xs, xo = x.double().requires_grad_(), x.clone().requires_grad_()
        want = F.cross_entropy(xs, t, reduction="none", label_smoothing=smoothing)
        want.sum().backward()
        got = cross_entropy(xo, t, reduction="none", label_smoothing=smoothing)
        got.sum().backward()
        torch.testing.assert_close(got.double(), want, equal_nan=True, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xo.grad.double(), xs.grad, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.cpu_parity
@pytest.mark.parametrize("classes,atol", [(100, 1e-6), (5000, 2e-6), (32000, 3e-6)])
def test_confident_rows_keep_the_precision_of_small_losses(classes, atol):
    """Rows whose target logit stands 12 above the rest: losses near 1e-4, as accurate (against
    float64) as stock's float32 ones. The loss is (max - x_t) + log(sum exp(x - max)), and any
    error in the sum near 1 shows up whole in it."""
    g = torch.Generator().manual_seed(classes)
    x = torch.randn(512, classes, generator=g)
    t = torch.randint(0, classes, (512,), generator=g)
    x[torch.arange(512), t] += 12
    want = F.cross_entropy(x.double(), t, reduction="none")
    torch.testing.assert_close(cross_entropy(x, t, reduction="none").double(), want, rtol=1e-2, atol=atol)


def test_inputs_are_not_modified():
    x, target, weight = make_case((8, 6), "prob", torch.float32, True, False)
    x.requires_grad_()
    copies = [x.detach().clone(), target.clone(), weight.clone()]
    cross_entropy(x, target, weight, label_smoothing=0.1).backward()
    for before, after in zip(copies, [x.detach(), target, weight]):
        assert torch.equal(before, after)


@pytest.mark.cpu_parity
def test_non_contiguous_input():
    x = torch.randn(7, 12).t()  # (12, 7), strided
    target = torch.randint(0, 7, (12,))
    torch.testing.assert_close(cross_entropy(x, target, reduction="none"), F.cross_entropy(x, target, reduction="none"))


@pytest.mark.cpu_parity
def test_deterministic_across_runs_and_thread_counts():
    x, target, weight = make_case((64, 20_000), "index", torch.float32, True, True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            xr = x.clone().requires_grad_()
            loss = cross_entropy(xr, target, weight, label_smoothing=0.1)
            loss.backward()
            results.append((loss.detach(), xr.grad))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_hessian_vector_product_equals_stock():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0])
    v = torch.randn(4, 3, dtype=torch.float64)
    hvps = []
    for loss_fn in (cross_entropy, F.cross_entropy):
        (grad,) = torch.autograd.grad(loss_fn(x, target), x, create_graph=True)
        hvps.append(torch.autograd.grad(grad, x, v)[0])
    torch.testing.assert_close(hvps[0], hvps[1])


# --- the ops themselves ----------------------------------------------------------------------


def op_args(rows, classes, target_kind, dtype=torch.float32, weighted=True, reduction=1, smoothing=0.1):
    x, target, weight = make_case((rows, classes), target_kind, dtype, weighted, ignore=True)
    return x, target, weight, reduction, -100, smoothing


@pytest.mark.skipif(fused_mlp.BACKEND != "extension", reason="needs the compiled extension")
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(target_kind, reduction):
    for rows in (5, 9):  # two batch sizes: the fake impls must handle a dynamic batch
        args = op_args(rows, 6, target_kind, reduction=reduction)
        torch.library.opcheck(torch.ops.fused_mlp.cross_entropy_forward.default, args)
        loss, lse = torch.ops.fused_mlp.cross_entropy_forward(*args)
        grad_loss = torch.randn_like(loss)
        x, target, weight = args[:3]
        torch.library.opcheck(
            torch.ops.fused_mlp.cross_entropy_backward.default, (grad_loss, x, target, weight, lse) + args[3:]
        )


def test_torch_compile_fullgraph_matches_eager():
    x, target, weight = make_case((32, 10), "index", torch.float32, True, True)

    def step(inp):
        logits = inp * 2.0
        return cross_entropy(logits, target, weight, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True)
    for rows in (32, 48):  # a second batch size: traced with a dynamic batch, not a recompile error
        xi, target, weight = make_case((rows, 10), "index", torch.float32, True, True, seed=rows)
        xa, xb = xi.clone().requires_grad_(), xi.clone().requires_grad_()
        want = step(xa)
        got = compiled(xb)
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(xb.grad, xa.grad)
