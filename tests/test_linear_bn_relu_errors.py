"""Bad input to the fused layer: a clear error naming the argument, and the layer's state intact."""

import copy
import math

import pytest
import torch
from conftest import needs_extension

from fused_mlp.functional import linear_bn_relu
from fused_mlp.nn import LinearBNReLU


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return LinearBNReLU(8, 4, dropout=0.1).train()


def snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_untouched(layer, before):
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(5, 8, 1), "input must have shape \\(batch, in_features\\)"),
        (torch.randn(8), "input must have shape \\(batch, in_features\\)"),
        (torch.randn(5, 7), "input has 7 features but the layer expects in_features=8"),
        (
            torch.randn(5, 8, dtype=torch.float64),
            "input dtype torch.float64 does not match the Linear weight dtype torch.float32",
        ),
        (torch.ones(5, 8, dtype=torch.long), "input must be a floating-point tensor"),
    ],
)
def test_bad_input(layer, x, match):
    before = snapshot(layer)
    with pytest.raises((ValueError, TypeError), match=match):
        layer(x)
    assert_untouched(layer, before)


def test_batch_of_one_in_training_raises_as_pytorch(layer):
    before = snapshot(layer)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(1, 8))
    assert_untouched(layer, before)  # num_batches_tracked included
    layer.eval()
    assert layer(torch.randn(1, 8)).shape == (1, 4)  # eval takes a single sample


def test_device_mismatch(layer):
    with pytest.raises(ValueError, match="weight is on cpu but input is on meta"):
        layer(torch.randn(5, 8, device="meta"))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.3"])
def test_dropout_out_of_range(p):
    with pytest.raises(ValueError, match="dropout must be a probability in \\[0, 1\\)"):
        LinearBNReLU(8, 4, dropout=p)
    with pytest.raises(ValueError, match="dropout must be a probability in \\[0, 1\\)"):
        linear_bn_relu(torch.randn(5, 8), torch.randn(4, 8), dropout=p)


def test_functional_eval_needs_running_stats():
    with pytest.raises(ValueError, match="running_mean and running_var are required when training=False"):
        linear_bn_relu(torch.randn(5, 8), torch.randn(4, 8), training=False)
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        linear_bn_relu(torch.randn(5, 8), torch.randn(4, 8), running_mean=torch.zeros(4))


def test_parameter_shapes_are_checked():
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="bias must have shape \\(4,\\)"):
        linear_bn_relu(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="bn_weight must have shape \\(4,\\)"):
        linear_bn_relu(x, w, bn_weight=torch.randn(5))


@needs_extension
def test_ops_check_their_own_arguments():
    op = torch.ops.fused_mlp.linear_bn_relu_forward
    x, w, so = torch.randn(5, 8), torch.randn(4, 8), torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="weight must have shape \\(out_features, 8\\)"):
        op(x, torch.randn(4, 7), None, None, None, None, None, True, 1e-5, 0.0, so)
    with pytest.raises(RuntimeError, match="dropout_p must be in \\[0, 1\\)"):
        op(x, w, None, None, None, None, None, True, 1e-5, 1.0, so)
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel when training"):
        op(x[:1], w, None, None, None, None, None, True, 1e-5, 0.0, so)
    with pytest.raises(RuntimeError, match="running_mean and running_var are required"):
        op(x, w, None, None, None, None, None, False, 1e-5, 0.0, so)
    with pytest.raises(RuntimeError, match="seed_offset must be a CPU int64 tensor"):
        op(x, w, None, None, None, None, None, True, 1e-5, 0.5, torch.tensor([1.0, 2.0]))


@needs_extension
def test_stage_ops_check_their_own_arguments():
    stats, epilogue = torch.ops.fused_mlp.bn_batch_stats, torch.ops.fused_mlp.bn_relu_dropout
    z, so = torch.randn(5, 4), torch.tensor([1, 2])
    mean, invstd, _ = stats(z, 1e-5)
    with pytest.raises(RuntimeError, match="expected pre_bn of shape \\(batch, features\\)"):
        stats(torch.randn(5), 1e-5)
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel when training"):
        stats(z[:1], 1e-5)
    with pytest.raises(RuntimeError, match="expected a floating-point pre_bn"):
        stats(z.long(), 1e-5)
    with pytest.raises(RuntimeError, match="mean must have shape \\(4\\) and dtype Float"):
        epilogue(z, mean[:3], invstd, None, None, 0.0, so)
    with pytest.raises(RuntimeError, match="invstd must have shape \\(4\\) and dtype Float"):
        epilogue(z, mean, invstd.double(), None, None, 0.0, so)
    with pytest.raises(RuntimeError, match="BatchNorm weight and bias must have shape \\(4\\)"):
        epilogue(z, mean, invstd, torch.ones(3), None, 0.0, so)
    with pytest.raises(RuntimeError, match="dropout_p must be in \\[0, 1\\)"):
        epilogue(z, mean, invstd, None, None, 1.5, so)
    # One row is enough to normalize with given statistics.
    assert epilogue(z[:1], mean, invstd, None, None, 0.0, so).shape == (1, 4)


# --- odd values: accepted as stock accepts them ----------------------------------------------------


@pytest.mark.cpu_parity
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("where", ["input", "weight", "bn_weight", "running_var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_finite_values_give_what_stock_gives(value, where, training):
    """NaN or inf in the input or a parameter is no error, in stock or here: the outputs, the input
    gradient and the running statistics match stock's, NaN for NaN."""
    torch.manual_seed(0)
    layer = LinearBNReLU(8, 4, dropout=0.0).train(training)
    stock = torch.nn.Sequential(copy.deepcopy(layer.linear), copy.deepcopy(layer.bn), torch.nn.ReLU()).train(training)
    x = torch.randn(6, 8)
    targets = {
        "input": (x,),
        "weight": (layer.linear.weight, stock[0].weight),
        "bn_weight": (layer.bn.weight, stock[1].weight),
        "running_var": (layer.bn.running_var, stock[1].running_var),
    }
    with torch.no_grad():
        for t in targets[where]:
            t[1] = value
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = layer(xa), stock(xb)
    if where != "running_var":  # which only eval reads, and where +inf gives invstd 0
        assert not torch.isfinite(want).all()
    torch.testing.assert_close(out, want, equal_nan=True, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    want.sum().backward()
    if where == "bn_weight" and training and math.isinf(value):
        # An infinite gamma multiplies the rounding residue of sum_n dz (zero in exact arithmetic):
        # the same elements are non-finite, their signs follow each one's rounding.
        assert torch.equal(torch.isfinite(xa.grad), torch.isfinite(xb.grad))
    else:
        torch.testing.assert_close(xa.grad, xb.grad, equal_nan=True, rtol=1e-5, atol=1e-6)
    for a, b in zip(layer.buffers(), stock.buffers()):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-6)


LAYER_WITHOUT_FEATURES = """
import torch, fused_mlp
from fused_mlp.functional import linear_bn_relu
for training in (True, False):
    for p in (0.0, 0.3):
        x = torch.randn(4, 3, requires_grad=True)
        w = torch.randn(0, 3, requires_grad=True)
        kw = dict(bn_weight=torch.ones(0, requires_grad=True), bn_bias=torch.zeros(0, requires_grad=True))
        if not training:
            kw.update(running_mean=torch.zeros(0), running_var=torch.ones(0))
        y = linear_bn_relu(x, w, torch.zeros(0, requires_grad=True), training=training, dropout=p, **kw)
        y.sum().backward()
        assert y.shape == (4, 0) and w.grad.shape == (0, 3)
        assert torch.equal(x.grad, torch.zeros(4, 3))
print("ok")
"""


@needs_extension
def test_a_layer_without_features_gives_empty_results():
    """Zero output features: empty outputs and gradients (and zero for the input's), in training and
    eval, with and without dropout. In a process of its own: this used to divide by zero."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", LAYER_WITHOUT_FEATURES], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
