"""Bad input to the fused cross-entropy: a clear error that names the argument, and no harm done."""

import pytest
import torch
from conftest import needs_extension

from fused_mlp import nn as fnn
from fused_mlp.functional import cross_entropy


@pytest.fixture
def x():
    return torch.randn(4, 5)


@pytest.fixture
def target():
    return torch.tensor([0, 1, 4, 2])


def test_non_floating_input(target):
    with pytest.raises(TypeError, match="input must be a floating-point"):
        cross_entropy(torch.ones(4, 5, dtype=torch.long), target)


def test_scalar_input():
    with pytest.raises(ValueError, match="input must have shape"):
        cross_entropy(torch.tensor(1.0), torch.tensor(0))


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int16])
def test_target_of_wrong_dtype(x, target, dtype):
    with pytest.raises(TypeError, match="target must hold class indices as int64"):
        cross_entropy(x, target.to(dtype))


@pytest.mark.parametrize("bad", [torch.tensor([0, 1, 2]), torch.zeros(4, 1, dtype=torch.long), torch.tensor(1)])
def test_index_target_of_wrong_shape(x, bad):
    with pytest.raises(ValueError, match="class-index target .* must have shape \\(4,\\)"):
        cross_entropy(x, bad)


def test_probability_target_of_wrong_shape(x):
    with pytest.raises(ValueError, match="probability target must have the input's shape"):
        cross_entropy(x, torch.rand(4, 6))


@pytest.mark.parametrize("bad", [5, -1, 100])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_class_index_out_of_range(x, target, bad, reduction):
    target[2] = bad
    with pytest.raises(IndexError, match=f"target\\[2\\] = {bad} is out of bounds.*\\[0, 5\\)"):
        cross_entropy(x, target, reduction=reduction)


def test_ignore_index_outside_range_is_fine(x, target):
    target[1] = 7
    loss = cross_entropy(x, target, ignore_index=7)
    assert torch.isfinite(loss)


def test_weight_of_wrong_length(x, target):
    with pytest.raises(ValueError, match="weight must have one entry per class, shape \\(5,\\)"):
        cross_entropy(x, target, torch.ones(4))


def test_weight_of_wrong_dtype(x, target):
    with pytest.raises(TypeError, match="weight must have the input's dtype torch.float32"):
        cross_entropy(x, target, torch.ones(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        cross_entropy(x, target, torch.ones(5, dtype=torch.long))


@pytest.mark.parametrize("reduction", ["avg", "elementwise_mean", None, "MEAN"])
def test_unknown_reduction(x, target, reduction):
    with pytest.raises(ValueError, match="reduction must be 'none', 'mean' or 'sum'"):
        cross_entropy(x, target, reduction=reduction)
    with pytest.raises(ValueError, match="reduction must be"):
        fnn.CrossEntropyLoss(reduction=reduction)


@pytest.mark.parametrize("smoothing", [-0.1, 1.5, float("nan"), "0.1"])
def test_label_smoothing_out_of_range(x, target, smoothing):
    with pytest.raises(ValueError, match="label_smoothing must be a number in \\[0, 1\\]"):
        cross_entropy(x, target, label_smoothing=smoothing)


def test_tensors_on_different_devices(x, target):
    meta_target = target.to("meta")
    with pytest.raises(ValueError, match="target is on meta but input is on cpu"):
        cross_entropy(x, meta_target)
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        cross_entropy(x, target, torch.ones(5, device="meta"))


@needs_extension
def test_ops_check_their_own_arguments(x, target):
    op = torch.ops.fused_mlp.cross_entropy_forward
    with pytest.raises(RuntimeError, match="reduction must be 0 \\(none\\), 1 \\(mean\\) or 2 \\(sum\\)"):
        op(x, target, None, 3, -100, 0.0)
    with pytest.raises(RuntimeError, match="label_smoothing must be in \\[0, 1\\]"):
        op(x, target, None, 1, -100, 2.0)
    with pytest.raises(RuntimeError, match="expected input of shape \\(rows, classes\\)"):
        op(x[0], target, None, 1, -100, 0.0)
    with pytest.raises(RuntimeError, match="weight must be a 1-D tensor with one entry per class"):
        op(x, target, torch.ones(3), 1, -100, 0.0)
    with pytest.raises(IndexError, match="target\\[0\\] = -5 is out of bounds"):
        op(x, torch.tensor([-5, 0, 0, 0]), None, 1, -100, 0.0)
    loss, lse = op(x, target, None, 1, -100, 0.0)
    with pytest.raises(RuntimeError, match="logsumexp must be the forward's"):
        torch.ops.fused_mlp.cross_entropy_backward(torch.ones(()), x, target, None, lse.float(), 1, -100, 0.0)


def test_bad_input_leaves_everything_untouched(x, target):
    weight = torch.rand(5)
    before = (x.clone(), target.clone(), weight.clone())
    target[3] = 9
    with pytest.raises(IndexError):
        cross_entropy(x, target, weight)
    target[3] = before[1][3]
    assert torch.equal(x, before[0]) and torch.equal(target, before[1]) and torch.equal(weight, before[2])


@pytest.mark.cpu_parity
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("where", ["input", "weight"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_non_finite_values_give_what_stock_gives(target, value, where, reduction):
    """NaN or inf in the logits or the class weights is no error, in stock or here: the same loss and
    gradient, NaN for NaN."""
    x, weight = torch.randn(4, 5), torch.rand(5) + 0.5
    if where == "input":
        x[2, 1] = value
    else:
        weight[1] = value
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = cross_entropy(xa, target, weight, reduction=reduction)
    want = torch.nn.functional.cross_entropy(xb, target, weight, reduction=reduction)
    if not (where == "input" and value < 0):  # a -inf logit of a class that is no target costs nothing
        assert not torch.isfinite(want).all()
    torch.testing.assert_close(got, want, equal_nan=True)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, equal_nan=True)
