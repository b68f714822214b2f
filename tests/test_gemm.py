"""The CPU kernels' own GEMMs (csrc/cpu/gemm.cpp), reached through the network op with no hidden
layer, whose forward is one product x W^T + b and whose backward is g^T x and g W: against
torch.mm at every kind of edge (rows, columns and depths that no vector or tile divides), with NaN
and inf, at any thread count, and under FUSED_MLP_GEMM=aten. Under each instruction set the CPU
supports (marker cpu_parity): the micro-kernels of AVX2 and AVX-512, ATen's GEMM for DEFAULT."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import needs_extension

pytestmark = [needs_extension, pytest.mark.cpu_parity]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_SEED = torch.zeros(2, dtype=torch.int64)
SHAPES = [  # (rows M, depth K, columns N)
    (1, 1, 1),
    (2, 3, 5),
    (5, 17, 3),
    (6, 16, 32),
    (7, 33, 65),
    (13, 64, 10),
    (9, 90, 20),  # last column blocks of 26 (g^T x and g W): a two-vector tile
    (3, 60, 50),  # last column blocks of 60 (g^T x, g W) and 50 (x W^T, packed): four vectors, one partial
    (64, 784, 512),
    (64, 128, 64),
    (130, 100, 130),
]


def products(x, w, b, g):
    """(x w^T + b, g^T x, g w) from the ops."""
    logits = torch.ops.fused_mlp.mlp_forward(x, [w], [b], [], [], [], [], False, False, 1e-5, 0.0, NO_SEED)[0]
    grad_x, grad_w, _, _, _ = torch.ops.fused_mlp.mlp_backward(
        g, x, [w], [b], [], [], [], [], [], [], False, False, 0.0, NO_SEED, True, [True]
    )
    return logits, grad_w[0], grad_x


def operands(M, K, N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(M, K, generator=gen),
        torch.randn(N, K, generator=gen),
        torch.randn(N, generator=gen),
        torch.randn(M, N, generator=gen),
    )


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_products_match_torch_mm(M, K, N):
    x, w, b, g = operands(M, K, N)
    got = products(x, w, b, g)
    xd, wd, bd, gd = (t.double() for t in (x, w, b, g))
    want = (xd @ wd.T + bd, gd.T @ xd, gd @ wd)
    for a, e, depth in zip(got, want, (K, M, N)):
        assert a.dtype == torch.float32 and a.shape == e.shape
        # float32 products summed over `depth` terms of magnitude ~1: errors of a few ulp * sqrt(depth)
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6 * depth**0.5 * 8)


def test_an_empty_reduction_gives_zeros():
    """A layer without output features: g W sums over nothing, and is zero (not left unwritten)."""
    x, w, b, g = torch.randn(4, 3), torch.randn(0, 3), torch.randn(0), torch.randn(4, 0)
    logits, grad_w, grad_x = products(x, w, b, g)
    assert logits.shape == (4, 0) and grad_w.shape == (0, 3)
    assert torch.equal(grad_x, torch.zeros(4, 3))


def test_non_finite_values_propagate_as_in_torch_mm():
    x, w, b, g = operands(9, 37, 21)
    x[2, 5], x[4, 0], w[3, 7], g[1, 2] = float("nan"), float("inf"), -float("inf"), float("nan")
    got = products(x, w, b, g)
    want = (torch.addmm(b, x, w.T), g.T @ x, g @ w)
    for a, e in zip(got, want):
        assert not torch.isfinite(e).all()
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("M,K,N", [(64, 784, 130), (1030, 200, 130)])
def test_the_same_bits_at_any_thread_count(M, K, N):
    x, w, b, g = operands(M, K, N)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = products(x, w, b, g)
        torch.set_num_threads(max(2, threads))
        many = products(x, w, b, g)
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, many):
        assert torch.equal(a, c)


@pytest.mark.parametrize("M,K,N", [(64, 784, 512), (300, 100, 70), (33, 130, 64)])
def test_weight_gradient_columns_past_the_last_whole_block_are_the_bits_of_a_whole_block(M, K, N):
    """g^T x where x's columns end in a part of a block of 64 (784 = 12 x 64 + 16): with AVX-512 that
    part is computed transposed (its own whole tiles) and transposed into place, summing in the same
    order, so its columns are bit for bit those of the same product with x padded by zero columns to
    whole blocks; NaN and inf there as well. ATen's GEMM (the DEFAULT build) to float32 rounding."""
    x, w, b, g = operands(M, K, N, seed=3)
    x[3, K - 2], x[5, K - 1], x[1, 2] = float("nan"), float("inf"), -float("inf")
    pad = -K % 64
    padded = products(torch.cat([x, torch.zeros(M, pad)], 1), torch.cat([w, torch.zeros(N, pad)], 1), b, g)[1]
    got = products(x, w, b, g)[1]
    assert got[:, K - 2].isnan().all() and not torch.isfinite(got[:, K - 1]).any()
    from fused_mlp import _C

    exact = _C.cpu_capability() != "DEFAULT"
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, padded[:, :K], equal_nan=True, **tol)


@pytest.mark.parametrize("M,K,N", [(1030, 100, 70), (700, 784, 130)])
def test_weight_gradient_over_more_than_512_rows_is_one_sum_in_row_order(M, K, N):
    """With AVX-512, g^T x over more than 512 rows is taken 512 rows at a time, each block's sums
    resumed from the previous block's as stored: the same sums in the same order as one pass. So with
    g zero from row 512 on, it is bit for bit the product of the first 512 rows alone (NaN and inf
    there included); with g zero before row 512, that of the rows from 512 on alone. Against
    float64 too, to float32 rounding. ATen's GEMM (the DEFAULT build) to float32 rounding."""
    from fused_mlp import _C

    exact = _C.cpu_capability() != "DEFAULT"
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-4)
    x, w, b, g = operands(M, K, N, seed=5)
    want = g.double().T @ x.double()
    torch.testing.assert_close(products(x, w, b, g)[1].double(), want, rtol=1e-5, atol=1e-6 * M**0.5 * 8)

    head = g.clone()
    head[512:] = 0
    x_head = x.clone()
    x_head[3, 5], x_head[7, K - 1] = float("nan"), float("inf")
    got = products(x_head, w, b, head)[1]
    assert got[:, 5].isnan().all() and not torch.isfinite(got[:, K - 1]).any()
    torch.testing.assert_close(got, products(x_head[:512], w, b, head[:512])[1], equal_nan=True, **tol)

    tail = g.clone()
    tail[:512] = 0
    torch.testing.assert_close(products(x, w, b, tail)[1], products(x[512:], w, b, tail[512:])[1], **tol)


def test_aten_override_agrees_to_float32_rounding():
    """FUSED_MLP_GEMM=aten (a fresh process: the variable is read once) against the default."""
    program = (
        "import torch, sys; sys.path.insert(0, 'tests'); import test_gemm as t; "
        "torch.save(t.products(*t.operands(64, 784, 130)), sys.argv[1])"
    )
    path = os.path.join(ROOT, "build", "gemm_aten.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    env = dict(os.environ, FUSED_MLP_GEMM="aten")
    result = subprocess.run([sys.executable, "-c", program, path], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    aten = torch.load(path, weights_only=True)
    for a, c in zip(products(*operands(64, 784, 130)), aten):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-4)


def test_float64_and_bfloat16_take_atens_gemm():
    for dtype, tol in ((torch.float64, 1e-12), (torch.bfloat16, 2e-2)):
        x, w, b, g = (t.to(dtype) for t in operands(16, 40, 24))
        got = products(x, w, b, g)
        want = (torch.addmm(b, x, w.T), g.T @ x, g @ w)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)


# --- the forward on a weight held column by column (the inference caches' packed layout) ---------


def packed(w):
    """w with the same values, held column by column: w.t() is contiguous."""
    return w.t().contiguous().t()


def inference(x, weights, biases):
    return torch.ops.fused_mlp.mlp_inference(x, weights, biases)


PACKED_SHAPES = [*SHAPES, (97, 50, 16), (200, 30, 17), (13, 64, 33), (300, 20, 130), (1024, 64, 10)]


@pytest.mark.parametrize("M,K,N", PACKED_SHAPES)
def test_column_held_weight_matches_torch_mm(M, K, N):
    x, w, b, _ = operands(M, K, N)
    wp = packed(w)
    assert not wp.is_contiguous() and wp.t().is_contiguous() or min(N, K) == 1
    want = x.double() @ w.double().T + b.double()
    for bias in (b, None):
        got = inference(x, [wp], [bias])
        expected = want if bias is not None else want - b.double()
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * K**0.5 * 8)
    # and agrees with the row-major weight's kernel to float32 rounding (the sums run in other orders)
    torch.testing.assert_close(inference(x, [wp], [b]), inference(x, [w], [b]), rtol=1e-5, atol=1e-5 * K**0.5)


@pytest.mark.parametrize("M,K,H,N", [(7, 33, 65, 10), (64, 784, 512, 256), (130, 100, 17, 3)])
def test_column_held_hidden_layer_takes_relu_in_its_epilogue(M, K, H, N):
    x, w1, b1, _ = operands(M, K, H, seed=1)
    _, w2, b2, _ = operands(M, H, N, seed=2)
    got = inference(x, [packed(w1), packed(w2)], [b1, b2])
    hidden = torch.relu(x.double() @ w1.double().T + b1.double())
    want = hidden @ w2.double().T + b2.double()
    assert (x.double() @ w1.double().T + b1.double() < 0).any()  # the ReLU has work to do
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * (K * H) ** 0.5 * 8)


def test_column_held_weight_non_finite_values_as_torch():
    x, w1, b1, _ = operands(9, 37, 70, seed=3)
    _, w2, b2, _ = operands(9, 70, 21, seed=4)
    x[2, 5], x[4, 0], w1[3, 7], w2[1, 2] = float("nan"), float("inf"), -float("inf"), float("nan")
    got = inference(x, [packed(w1), packed(w2)], [b1, b2])
    hidden = torch.relu(torch.addmm(b1, x, w1.T))
    assert hidden.isnan().any() and hidden.isinf().any()  # NaN and +inf pass the epilogue's ReLU
    want = torch.addmm(b2, hidden, w2.T)
    assert not torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, equal_nan=True)


def test_column_held_weight_the_same_bits_at_any_thread_count():
    x, w1, b1, _ = operands(300, 784, 130, seed=5)
    _, w2, b2, _ = operands(300, 130, 10, seed=6)
    args = (x, [packed(w1), packed(w2)], [b1, b2])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = inference(*args)
        torch.set_num_threads(max(2, threads))
        many = inference(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("rows", [64, 200])
def test_row_major_weight_from_64_rows_takes_the_outer_product_kernel(rows):
    """From 64 rows up the forward packs each block of a row-major weight's rows into a panel and runs
    the outer-product kernel on it: the very bits of the same weight held column by column (whose
    sums run in the same order); NaN and inf as torch; any thread count."""
    x, w1, b1, _ = operands(rows, 100, 70, seed=7)
    _, w2, b2, _ = operands(rows, 70, 13, seed=8)
    x[3, 4], w1[5, 6], w2[2, 9] = float("nan"), float("inf"), -float("inf")
    got = inference(x, [w1, w2], [b1, b2])
    torch.testing.assert_close(got, inference(x, [packed(w1), packed(w2)], [b1, b2]), rtol=0, atol=0, equal_nan=True)
    want = torch.addmm(b2, torch.relu(torch.addmm(b1, x, w1.T)), w2.T)
    assert not torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, equal_nan=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = inference(x, [w1, w2], [b1, b2])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.isnan(), got.isnan()) and torch.equal(one.nan_to_num(), got.nan_to_num())


@pytest.mark.parametrize("rows", [32, 40, 48, 64])
def test_small_batch_forward_taken_transposed_is_the_bits_of_the_forward_proper(rows):
    """From 32 to 64 rows, on a weight of 512 rows or more, the forward takes its transpose (the
    weight's rows times the packed input, with AVX-512): each element the same sum in the same order
    as the forward of a larger batch holding these rows, NaN and inf included; the bias, and a
    hidden layer's ReLU, as there; the same bits at any thread count. With BatchNorm, the batch
    statistics it gathers on the way are those of a separate pass over its output."""
    from fused_mlp import _C

    exact = _C.cpu_capability() == "AVX512"  # elsewhere the small batch runs another kernel
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-4)
    x, w1, b1, _ = operands(200, 100, 520, seed=9)
    _, w2, b2, _ = operands(200, 520, 13, seed=10)
    x[3, 4], x[7, 0], w1[5, 6] = float("nan"), float("inf"), -float("inf")

    def forward(inp):  # (the hidden layer: ReLU in the epilogue, the output Linear)
        logits, hidden = torch.ops.fused_mlp.mlp_forward(
            inp, [w1, w2], [b1, b2], [], [], [], [], False, False, 1e-5, 0.0, NO_SEED
        )[:2]
        return hidden[0], inference(inp, [w1], [b1])

    whole = forward(x)
    got = forward(x[:rows])
    assert got[0].isnan().any() and got[1].isinf().any() and (got[0] == 0).any()
    for a, e in zip(got, whole):
        torch.testing.assert_close(a, e[:rows], equal_nan=True, **tol)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = forward(x[:rows])
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(got, one):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)

    xc, w, b, _ = operands(rows, 100, 520, seed=11)
    gamma, beta = torch.rand(520) + 0.5, torch.randn(520)
    out, pre_bn, mean, invstd, var = torch.ops.fused_mlp.linear_bn_relu_forward(
        xc, w, b, gamma, beta, None, None, True, 1e-5, 0.0, NO_SEED
    )
    torch.testing.assert_close(pre_bn, inference(torch.cat([xc, xc, xc]), [w], [b])[:rows], **tol)
    for a, e in zip((mean, invstd, var), torch.ops.fused_mlp.bn_batch_stats(pre_bn, 1e-5)):
        assert torch.equal(a, e)
