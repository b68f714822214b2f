"""The fused Linear -> BatchNorm1d -> ReLU -> Dropout layer against the stock modules and
fused_mlp.reference."""

import itertools
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from conftest import needs_extension

from fused_mlp import reference
from fused_mlp.functional import linear_bn_relu
from fused_mlp.nn import LinearBNReLU

CONFIGS = list(itertools.product([True, False], [True, False], [True, False], [0.1, None]))
CONFIG_IDS = [f"bias{b}-affine{a}-track{t}-mom{m}" for b, a, t, m in CONFIGS]


def stock_twin(layer):
    """nn.Sequential(linear, bn, relu) with the fused layer's parameters and buffers (copies)."""
    lin, bn = layer.linear, layer.bn
    stock = nn.Sequential(
        OrderedDict(
            linear=nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None),
            bn=nn.BatchNorm1d(
                bn.num_features,
                eps=bn.eps,
                momentum=bn.momentum,
                affine=bn.affine,
                track_running_stats=bn.track_running_stats,
            ),
            relu=nn.ReLU(),
        )
    )
    stock = stock.to(lin.weight.dtype)
    stock.load_state_dict(layer.state_dict())
    return stock


def make_layer(bias, affine, track, momentum, dtype=torch.float32, seed=0, in_f=20, out_f=33):
    torch.manual_seed(seed)
    layer = LinearBNReLU(in_f, out_f, bias=bias, affine=affine, track_running_stats=track, momentum=momentum).to(dtype)
    if affine:
        with torch.no_grad():
            layer.bn.weight.uniform_(0.5, 1.5)
            layer.bn.bias.uniform_(-0.5, 0.5)
    return layer


def compare_step(layer, stock, x, tol):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = layer(xa), stock(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for (name, p), (_, q) in zip(layer.named_parameters(), stock.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"grad of {name}: {m}")
        p.grad = q.grad = None
    for (name, b), (_, c) in zip(layer.named_buffers(), stock.named_buffers()):
        torch.testing.assert_close(b, c, **tol, msg=lambda m: f"buffer {name}: {m}")


@pytest.mark.cpu_parity
@pytest.mark.parametrize("bias,affine,track,momentum", CONFIGS, ids=CONFIG_IDS)
def test_parity_with_stock_modules(bias, affine, track, momentum):
    layer = make_layer(bias, affine, track, momentum)
    stock = stock_twin(layer)
    tol = dict(rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):  # several training steps: running statistics accumulate
        compare_step(layer.train(), stock.train(), torch.randn(37, 20, generator=g) * 2 + 0.5, tol)
    if track:
        assert int(layer.bn.num_batches_tracked) == 4
    for _ in range(2):  # eval: outputs and the gradients of fine-tuning with frozen BN
        compare_step(layer.eval(), stock.eval(), torch.randn(29, 20, generator=g), tol)


@pytest.mark.parametrize("bias,affine,track", list(itertools.product([True, False], repeat=3)))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_gradcheck(bias, affine, track, training, dropout):
    torch.manual_seed(0)
    N, K, C = 7, 5, 6
    x = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True) if bias else None
    gamma = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    beta = torch.randn(C, dtype=torch.float64, requires_grad=True) if affine else None
    rm = torch.randn(C, dtype=torch.float64) if track else None
    rv = torch.rand(C, dtype=torch.float64) + 0.5 if track else None
    use_batch = training or not track

    def f(x, w, *params):
        params = list(params)
        bb = params.pop(0) if bias else None
        gm, bt = (params.pop(0), params.pop(0)) if affine else (None, None)
        gen = torch.Generator().manual_seed(123)  # the same mask on every call
        rms = None if rm is None or use_batch else rm
        rvs = None if rv is None or use_batch else rv
        return linear_bn_relu(
            x,
            w,
            bb,
            bn_weight=gm,
            bn_bias=bt,
            running_mean=rms,
            running_var=rvs,
            training=use_batch,
            dropout=dropout,
            generator=gen,
        )

    inputs = [x, w] + ([b] if bias else []) + ([gamma, beta] if affine else [])
    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.cpu_parity
def test_dropout_matches_stock_statistics_and_scaling():
    layer = LinearBNReLU(64, 512, dropout=0.3).train()
    stock = stock_twin(layer)
    x = torch.randn(256, 64)
    out = layer(x)
    dense = stock(x)
    active = dense > 0
    dropped = active & (out == 0)
    frac = dropped.sum().item() / active.sum().item()
    n = active.sum().item()
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)  # five standard deviations
    kept = active & (out != 0)
    torch.testing.assert_close(out[kept], dense[kept] / 0.7, rtol=1e-5, atol=1e-6)


def test_dropout_is_reproducible_and_follows_the_generator():
    layer = LinearBNReLU(16, 32, dropout=0.5).train()
    x = torch.randn(10, 16)
    torch.manual_seed(7)
    a = layer(x)
    torch.manual_seed(7)
    b = layer(x)
    c = layer(x)
    assert torch.equal(a, b) and not torch.equal(b, c)
    ga = linear_bn_relu(
        x, layer.linear.weight, layer.linear.bias, dropout=0.5, generator=torch.Generator().manual_seed(3)
    )
    gb = linear_bn_relu(
        x, layer.linear.weight, layer.linear.bias, dropout=0.5, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(ga, gb)


def test_eval_and_dropout_flags_are_independent():
    layer = LinearBNReLU(16, 32, dropout=0.5)
    stock = stock_twin(layer)
    x = torch.randn(10, 16)
    layer.eval()
    stock.eval()
    torch.testing.assert_close(layer(x), stock(x))  # no dropout, running statistics
    layer.train()
    layer.bn.eval()  # frozen BN, live dropout
    out = layer(x)
    dense = stock(x)
    assert ((out == 0) & (dense > 0)).any()
    kept = out != 0
    torch.testing.assert_close(out[kept], dense[kept] * 2.0)
    assert int(layer.bn.num_batches_tracked) == 0


# Random123's published known-answer vectors for philox4x32_10: (counter, key, output).
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.cpu_parity
@needs_extension
def test_philox_known_answer_vectors():
    for ctr, key, want in PHILOX_KNOWN_ANSWERS:
        for philox in (torch.ops.fused_mlp.philox4x32_10, reference.philox4x32_10):
            got = philox(torch.tensor([ctr]), torch.tensor(key))
            assert tuple(got[0].tolist()) == want


@pytest.mark.cpu_parity
@needs_extension
@pytest.mark.parametrize("numel", [1, 3, 4, 5, 63, 64, 65, 1000])
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**61 + 12345, 2**40 + 7), (-5, 3)])
def test_dropout_mask_same_in_cpp_and_reference(numel, seed, offset):
    so = torch.tensor([seed, offset])
    for p in (0.1, 0.5):
        assert torch.equal(
            torch.ops.fused_mlp.dropout_mask(so, numel, p), reference.dropout_keep_mask(seed, offset, numel, p)
        )
    # Block indices crossing 2^32, where the counter's low word carries into the next.
    start = 4 * (2**32 - 10) + 3
    assert torch.equal(
        torch.ops.fused_mlp.dropout_mask(so, numel, 0.5, start),
        reference.dropout_keep_mask(seed, offset, numel, 0.5, start),
    )


@pytest.mark.cpu_parity
@needs_extension
@pytest.mark.parametrize("rows, features", [(12, 24), (700, 4), (300, 100)])
def test_layer_mask_is_the_philox_mask_and_backward_reuses_it(rows, features):
    # Identity-like setup: with p > 0, out == 0 wherever the mask drops an active unit. Narrow
    # layers take the mask of many rows from one call to the generator.
    torch.manual_seed(0)
    x = torch.randn(rows, 8)
    w = torch.randn(features, 8)
    so = torch.tensor([99, 5])
    out, pre_bn, mean, invstd, _ = torch.ops.fused_mlp.linear_bn_relu_forward(
        x, w, None, None, None, None, None, True, 1e-5, 0.25, so
    )
    keep = reference.dropout_keep_mask(99, 5, out.numel(), 0.25).reshape(out.shape)
    active = (pre_bn - mean) * invstd > 0
    assert torch.equal(out != 0, active & keep)
    g = torch.ones_like(out)
    grads = torch.ops.fused_mlp.linear_bn_relu_backward(g, x, w, None, None, None, pre_bn, mean, invstd, True, 0.25, so)
    ref = reference.linear_bn_relu_backward(g, x, w, None, None, None, pre_bn, mean, invstd, True, 0.25, so)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def in_float64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def test_state_dict_round_trips_with_stock_modules():
    layer = make_layer(True, True, True, 0.1)
    stock = nn.Sequential(OrderedDict(linear=nn.Linear(20, 33), bn=nn.BatchNorm1d(33)))
    assert list(layer.state_dict().keys()) == list(stock.state_dict().keys())
    stock.load_state_dict(layer.state_dict())
    layer.train()(torch.randn(8, 20))  # change the running statistics
    fresh = LinearBNReLU(20, 33)
    fresh.load_state_dict(layer.state_dict())
    for k, v in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    layer.load_state_dict(stock.state_dict())
    assert torch.equal(layer.bn.running_mean, stock.bn.running_mean)


def test_from_modules_shares_tensors():
    lin, bn = nn.Linear(6, 4), nn.BatchNorm1d(4)
    layer = LinearBNReLU.from_modules(lin, bn, dropout=0.2)
    assert layer.linear is lin and layer.bn is bn and layer.dropout == 0.2
    layer.train()(torch.randn(5, 6))
    assert int(bn.num_batches_tracked) == 1  # the stock module's buffer was updated
    with pytest.raises(ValueError, match="bn has 5 features but linear has out_features=4"):
        LinearBNReLU.from_modules(lin, nn.BatchNorm1d(5))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        LinearBNReLU.from_modules(bn, bn)


def test_forward_hooks_on_inner_modules_do_not_fire():
    layer = LinearBNReLU(4, 3)
    fired = []
    layer.linear.register_forward_hook(lambda *a: fired.append("linear"))
    layer.bn.register_forward_hook(lambda *a: fired.append("bn"))
    layer(torch.randn(5, 4))
    assert fired == []


def test_non_contiguous_input_and_nothing_modified():
    layer = make_layer(True, True, True, 0.1)
    stock = stock_twin(layer)
    x = torch.randn(20, 40)[:, ::2]  # strided
    assert not x.is_contiguous()
    params = {k: v.clone() for k, v in layer.named_parameters()}
    x_before = x.clone()
    torch.testing.assert_close(layer.train()(x), stock.train()(x), rtol=1e-4, atol=1e-5)
    assert torch.equal(x, x_before)
    for k, v in layer.named_parameters():
        assert torch.equal(v, params[k])
    layer.eval()
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    layer(x)
    for k, v in layer.named_buffers():
        assert torch.equal(v, buffers[k])  # eval never touches the running statistics


@pytest.mark.cpu_parity
def test_bfloat16_activations_with_float32_batchnorm():
    layer = make_layer(True, True, True, 0.1)
    stock = stock_twin(layer)
    layer.linear.to(torch.bfloat16)
    stock.linear.to(torch.bfloat16)
    x = torch.randn(64, 20).to(torch.bfloat16)
    for mode in (True, False):
        a, b = layer.train(mode)(x), stock.train(mode)(x)
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(layer.bn.running_mean, stock.bn.running_mean, rtol=1e-2, atol=1e-3)


def test_autocast_behaves_like_linear_then_batchnorm():
    layer = make_layer(True, True, True, 0.1)
    stock = stock_twin(layer)
    x = torch.randn(64, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = layer.train()(x), stock.train()(x)
    assert a.dtype == b.dtype
    torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


def at_thread_counts(fn, counts=(1, 2, 3)):
    """fn() at each thread count (3 splits the work unevenly on any machine)."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)


@needs_extension
@pytest.mark.cpu_parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_statistics_epilogue_and_backward_sums_are_the_same_at_any_thread_count(dtype):
    """What the package computes itself, given the pre-BN activation, is bitwise the same at any
    thread count: the batch statistics (merged in a fixed order), the epilogue with its dropout
    mask, and the backward's per-feature sums (grad_bn_weight, grad_bn_bias). The GEMMs around
    them belong to MKL / oneDNN, whose rounding may change with the thread count: not compared."""
    g = torch.Generator().manual_seed(0)
    N, K, C = 1000, 64, 300
    pre_bn = (torch.randn(N, C, generator=g) * 3 + 1).to(dtype)
    x, w = torch.randn(N, K, generator=g).to(dtype), torch.randn(C, K, generator=g).to(dtype)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    gamma, beta = (torch.rand(C, generator=g) + 0.5).to(stat), torch.randn(C, generator=g).to(stat)
    grad = torch.randn(N, C, generator=g).to(dtype)
    so = torch.tensor([2**40 + 17, 3])

    def run():
        mean, invstd, var = torch.ops.fused_mlp.bn_batch_stats(pre_bn, 1e-5)
        out = torch.ops.fused_mlp.bn_relu_dropout(pre_bn, mean, invstd, gamma, beta, 0.3, so)
        grads = torch.ops.fused_mlp.linear_bn_relu_backward(
            grad, x, w, None, gamma, beta, pre_bn, mean, invstd, True, 0.3, so, False
        )
        return mean, invstd, var, out, grads[3], grads[4]

    first, *others = at_thread_counts(run)
    for other in others:
        for name, a, b in zip(("mean", "invstd", "var", "out", "grad_bn_weight", "grad_bn_bias"), first, other):
            assert torch.equal(a, b), name


@needs_extension
@pytest.mark.cpu_parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "rows, in_features, features",
    [(128, 784, 512), (1000, 64, 300), (130, 20, 33), (64, 50, 70), (64, 100, 300), (48, 50, 70), (1024, 64, 10)],
)
def test_forward_statistics_are_bn_batch_stats_of_its_pre_bn(dtype, rows, in_features, features):
    """From 64 rows up, the float32 forward takes each block's statistics in its GEMM's epilogue,
    while the block is in cache; below, and for other dtypes, in a pass over pre_bn. Either way the
    blocks and the arithmetic are bn_batch_stats': the same bits, at any thread count, with a NaN
    feature and an infinite one where they fall."""
    g = torch.Generator().manual_seed(rows + features)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    w = torch.randn(features, in_features, generator=g).to(dtype)
    b = torch.randn(features, generator=g).to(dtype)
    nan_feature, inf_feature = features // 2, features // 3
    w[nan_feature, 0] = float("nan")
    w[inf_feature, 1] = float("inf")
    so = torch.tensor([1, 2])

    def run():
        _, pre_bn, mean, invstd, var = torch.ops.fused_mlp.linear_bn_relu_forward(
            x, w, b, None, None, None, None, True, 1e-5, 0.0, so
        )
        return pre_bn, (mean, invstd, var), torch.ops.fused_mlp.bn_batch_stats(pre_bn, 1e-5)

    def same(a, c):  # bitwise, NaN included
        return torch.equal(a.isnan(), c.isnan()) and torch.equal(a.nan_to_num(), c.nan_to_num())

    results = at_thread_counts(run)
    for pre_bn, fused, separate in results:
        # ATen's GEMM (the DEFAULT build's) may round pre_bn differently at another thread count;
        # the statistics of one pre_bn may not differ.
        same_pre_bn = same(pre_bn, results[0][0])
        for name, a, c, first in zip(("mean", "invstd", "var"), fused, separate, results[0][1]):
            assert same(a, c), name
            assert same(a, first) or not same_pre_bn, name
    pre_bn, (mean, _, var) = results[0][0], results[0][1]
    assert mean[nan_feature].isnan() and not mean[inf_feature].isfinite()
    finite = torch.ones(features, dtype=torch.bool)
    finite[[nan_feature, inf_feature]] = False
    assert mean[finite].isfinite().all()
    want = pre_bn[:, finite].double()
    torch.testing.assert_close(mean[finite].double(), want.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var[finite].double(), want.var(0), rtol=1e-5, atol=1e-5)


@needs_extension
@pytest.mark.cpu_parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [64, 300, 1000])
def test_each_features_statistics_and_sums_do_not_depend_on_the_layers_width(dtype, rows):
    """The reductions over the batch split the features into blocks whose width follows the
    shapes; a feature's sums run over the rows in the same order whatever the blocks, so a
    feature's statistics, output and backward sums are bitwise the same in a layer of 300
    features and in one of the 64 of them (no dropout: its mask follows the flat index)."""
    g = torch.Generator().manual_seed(1)
    K, C = 16, 300
    pre_bn = (torch.randn(rows, C, generator=g) * 2 - 1).to(dtype)
    x, w = torch.randn(rows, K, generator=g).to(dtype), torch.randn(C, K, generator=g).to(dtype)
    gamma, beta = (torch.rand(C, generator=g) + 0.5).to(dtype), torch.randn(C, generator=g).to(dtype)
    grad = torch.randn(rows, C, generator=g).to(dtype)
    so = torch.tensor([5, 0])

    def run(cols):
        z = pre_bn[:, cols].contiguous()
        mean, invstd, var = torch.ops.fused_mlp.bn_batch_stats(z, 1e-5)
        out = torch.ops.fused_mlp.bn_relu_dropout(z, mean, invstd, gamma[cols], beta[cols], 0.0, so)
        grads = torch.ops.fused_mlp.linear_bn_relu_backward(
            grad[:, cols].contiguous(),
            x,
            w[cols].contiguous(),
            None,
            gamma[cols],
            beta[cols],
            z,
            mean,
            invstd,
            True,
            0.0,
            so,
            False,
        )
        return mean, invstd, var, out, grads[3], grads[4]

    part = slice(37, 101)
    for name, whole, alone in zip(
        ("mean", "invstd", "var", "out", "grad_bn_weight", "grad_bn_bias"), run(slice(None)), run(part)
    ):
        assert torch.equal(whole[..., part], alone), name


@needs_extension
def test_stage_ops_opcheck():
    for N in (5, 9):  # a dynamic batch
        pre_bn = torch.randn(N, 6)
        torch.library.opcheck(torch.ops.fused_mlp.bn_batch_stats.default, (pre_bn, 1e-5))
        mean, invstd, _ = torch.ops.fused_mlp.bn_batch_stats(pre_bn, 1e-5)
        for gamma, beta, p in ((torch.rand(6) + 0.5, torch.randn(6), 0.3), (None, None, 0.0)):
            args = (pre_bn, mean, invstd, gamma, beta, p, torch.tensor([3, 4]))
            torch.library.opcheck(torch.ops.fused_mlp.bn_relu_dropout.default, args)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    stack = nn.Sequential(LinearBNReLU(20, 32), LinearBNReLU(32, 16), nn.Linear(16, 4))
    twin = nn.Sequential(LinearBNReLU(20, 32), LinearBNReLU(32, 16), nn.Linear(16, 4))
    twin.load_state_dict(stack.state_dict())
    compiled = torch.compile(twin, fullgraph=True)
    for mode in (True, False):
        stack.train(mode)
        twin.train(mode)
        x = torch.randn(24, 20)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        want, got = stack(xa), compiled(xb)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        want.sum().backward()
        got.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for k, v in stack.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[k], v, rtol=1e-4, atol=1e-5)


@needs_extension
@pytest.mark.parametrize("use_batch_stats", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_opcheck(use_batch_stats, dropout):
    for N in (5, 9):  # a dynamic batch
        x, w, b = torch.randn(N, 6), torch.randn(4, 6), torch.randn(4)
        gamma, beta, rm, rv = torch.rand(4) + 0.5, torch.randn(4), torch.randn(4), torch.rand(4) + 0.5
        so = torch.tensor([11, 0])
        args = (x, w, b, gamma, beta, rm, rv, use_batch_stats, 1e-5, dropout, so)
        torch.library.opcheck(torch.ops.fused_mlp.linear_bn_relu_forward.default, args)
        out, pre_bn, mean, invstd, var = torch.ops.fused_mlp.linear_bn_relu_forward(*args)
        saved = pre_bn if use_batch_stats else out
        for need_grad_input in (True, False):
            torch.library.opcheck(
                torch.ops.fused_mlp.linear_bn_relu_backward.default,
                (
                    torch.randn(N, 4),
                    x,
                    w,
                    b,
                    gamma,
                    beta,
                    saved,
                    mean,
                    invstd,
                    use_batch_stats,
                    dropout,
                    so,
                    need_grad_input,
                ),
            )
    torch.library.opcheck(
        torch.ops.fused_mlp.bn_update_running_stats_.default,
        (torch.randn(4), torch.rand(4), torch.randn(4), torch.rand(4), 0.1),
    )
    torch.library.opcheck(torch.ops.fused_mlp.dropout_mask.default, (torch.tensor([1, 2]), 10, 0.5))


@needs_extension
@pytest.mark.parametrize("use_batch_stats", [True, False])
def test_backward_without_input_gradient_skips_it_and_keeps_the_rest(use_batch_stats):
    """A first layer's input needs no gradient: the op returns an empty grad_input and the same
    other gradients; the module asks for it only when the input requires grad."""
    x, w, b = torch.randn(7, 6), torch.randn(4, 6), torch.randn(4)
    gamma, beta, rm, rv = torch.rand(4) + 0.5, torch.randn(4), torch.randn(4), torch.rand(4) + 0.5
    so = torch.tensor([5, 6])
    out, pre_bn, mean, invstd, _ = torch.ops.fused_mlp.linear_bn_relu_forward(
        x, w, b, gamma, beta, rm, rv, use_batch_stats, 1e-5, 0.3, so
    )
    args = (
        torch.randn(7, 4),
        x,
        w,
        b,
        gamma,
        beta,
        pre_bn if use_batch_stats else out,
        mean,
        invstd,
        use_batch_stats,
        0.3,
        so,
    )
    full = torch.ops.fused_mlp.linear_bn_relu_backward(*args)
    partial = torch.ops.fused_mlp.linear_bn_relu_backward(*args, False)
    assert full[0].shape == x.shape and partial[0].shape == (0,)
    for a, b_ in zip(full[1:], partial[1:]):
        assert torch.equal(a, b_)
    ref = reference.linear_bn_relu_backward(*args, need_grad_input=False)
    assert ref[0].shape == (0,)
    layer = LinearBNReLU(6, 4, dropout=0.3)
    layer(x).sum().backward()  # x needs no gradient
    assert x.grad is None and layer.linear.weight.grad is not None


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_running_stats_update_bumps_the_version_counters(dtype):
    """The eval fold cache keys on the running statistics' versions: every update must bump them."""
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    versions = (rm._version, rv._version)
    torch.ops.fused_mlp.bn_update_running_stats_(rm, rv, torch.ones(3), torch.full((3,), 3.0), 0.5)
    assert rm._version > versions[0] and rv._version > versions[1]
    torch.testing.assert_close(rm, torch.full((3,), 0.5, dtype=dtype))
    torch.testing.assert_close(rv, torch.full((3,), 2.0, dtype=dtype))
    layer = LinearBNReLU(4, 3)
    layer.eval()
    x = torch.randn(8, 4)
    with torch.no_grad():
        before = layer(x)
        layer.train()
        layer(torch.randn(8, 4) * 5 + 3)  # moves the running statistics
        layer.eval()
        after = layer(x)
    assert not torch.equal(before, after)
    expected = torch.relu(
        torch.nn.functional.batch_norm(
            x @ layer.linear.weight.t() + layer.linear.bias,
            layer.bn.running_mean,
            layer.bn.running_var,
            layer.bn.weight,
            layer.bn.bias,
            False,
            0.0,
            layer.bn.eps,
        )
    )
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.cpu_parity
def test_eval_inference_uses_folded_weights_and_matches_the_autograd_path():
    layer = make_layer(True, True, True, 0.1)
    layer.train()(torch.randn(16, 20))  # non-trivial running statistics
    layer.eval()
    stock = stock_twin(layer).eval()
    x = torch.randn(9, 20)
    with torch.no_grad():
        fast = layer(x)
    assert layer._fold_cache is not None
    slow = layer(x)  # grad enabled: the autograd path folds inside the op
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, stock(x).detach(), rtol=1e-5, atol=1e-5)
    assert "_fold_cache" not in str(list(layer.state_dict().keys()))


def test_folded_weights_follow_parameter_updates():
    layer = make_layer(True, True, True, 0.1).eval()
    stock = stock_twin(layer).eval()
    x = torch.randn(9, 20)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    with torch.no_grad():
        before = layer(x)
    layer(x).sum().backward()
    opt.step()  # in-place updates: the cache must notice
    stock.load_state_dict(layer.state_dict())
    with torch.no_grad():
        after = layer(x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, stock(x), rtol=1e-5, atol=1e-5)
        layer.bn.running_var.mul_(4.0)  # and so must a buffer changed in place
        stock.bn.running_var.mul_(4.0)
        torch.testing.assert_close(layer(x), stock(x), rtol=1e-5, atol=1e-5)
        layer.load_state_dict(make_layer(True, True, True, 0.1, seed=5).state_dict())
        stock.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x), stock(x), rtol=1e-5, atol=1e-5)
