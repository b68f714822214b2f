"""fused_mlp.reference on every device: each op keeps its tensors on its input's device (meta
included, where no value can be read on the host), and its dropout mask, Philox4x32-10 in torch
ops, is bit for bit the C++ generator's."""

import struct

import pytest
import torch
from conftest import needs_extension
from test_linear_bn_relu import PHILOX_KNOWN_ANSWERS

from fused_mlp import reference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CPU, META = torch.device("cpu"), torch.device("meta")
ROWS, IN, OUT, CLASSES = 6, 5, 7, 4
# A seed with the top bit set (a negative int64) and an offset past 2^32: every word matters.
SEED_OFFSET = torch.tensor([-(2**63) + 0x123456789, 2**40 + 7])
M32 = 0xFFFFFFFF


# --- one case per reference op: inputs made on the CPU, moved to `device`, outputs by name -------


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def cross_entropy_case(target_kind, reduction, weighted, label_smoothing):
    def run(device, dtype):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(ROWS, CLASSES, generator=g).to(dtype)
        if target_kind == "class":
            target = torch.randint(0, CLASSES, (ROWS,), generator=g)
            target[1] = -100
        else:
            target = torch.rand(ROWS, CLASSES, generator=g).softmax(dim=1).to(dtype)
        weight = (torch.rand(CLASSES, generator=g) + 0.5).to(dtype) if weighted else None
        x, target = x.to(device), target.to(device)
        weight = weight.to(device) if weighted else None
        loss, lse = reference.cross_entropy_forward(x, target, weight, reduction, -100, label_smoothing)
        grad_loss = torch.rand(loss.shape, generator=g).to(dtype).to(device)
        grad = reference.cross_entropy_backward(grad_loss, x, target, weight, lse, reduction, -100, label_smoothing)
        return {"loss": loss, "logsumexp": lse, "grad_input": grad}

    run.id = f"cross_entropy-{target_kind}-reduction{reduction}-weight{weighted}-smoothing{label_smoothing}"
    return run


def _layer_inputs(device, dtype):
    g = torch.Generator().manual_seed(1)
    stat = _stat_dtype(dtype)
    x = torch.randn(ROWS, IN, generator=g).to(dtype)
    w = (torch.randn(OUT, IN, generator=g) * 0.5).to(dtype)
    b = torch.randn(OUT, generator=g).to(dtype)
    gamma, beta = (torch.rand(OUT, generator=g) + 0.5).to(stat), torch.randn(OUT, generator=g).to(stat)
    rm, rv = (torch.randn(OUT, generator=g) * 0.1).to(stat), (torch.rand(OUT, generator=g) + 0.5).to(stat)
    grad_out = torch.randn(ROWS, OUT, generator=g).to(dtype)
    return [t.to(device) for t in (x, w, b, gamma, beta, rm, rv, grad_out, SEED_OFFSET)]


def linear_bn_relu_case(use_batch_stats, dropout, need_grad_input=True):
    def run(device, dtype):
        x, w, b, gamma, beta, rm, rv, grad_out, so = _layer_inputs(device, dtype)
        out, pre_bn, mean, invstd, var = reference.linear_bn_relu_forward(
            x, w, b, gamma, beta, rm, rv, use_batch_stats, 1e-5, dropout, so
        )
        # As functional.py saves: the pre-BN activation with batch statistics, else the output.
        saved = pre_bn if use_batch_stats else out
        grads = reference.linear_bn_relu_backward(
            grad_out, x, w, b, gamma, beta, saved, mean, invstd, use_batch_stats, dropout, so, need_grad_input
        )
        names = ("grad_input", "grad_weight", "grad_bias", "grad_bn_weight", "grad_bn_bias")
        return dict(out=out, pre_bn=pre_bn, mean=mean, invstd=invstd, var=var, **dict(zip(names, grads)))

    stats = "batch" if use_batch_stats else "running"
    run.id = f"linear_bn_relu-{stats}-dropout{dropout}-grad_input{need_grad_input}"
    return run


def bn_stages_case(dropout):
    def run(device, dtype):
        x, w, b, gamma, beta, *_, so = _layer_inputs(device, dtype)
        pre_bn = torch.nn.functional.linear(x, w, b)
        mean, invstd, var = reference.bn_batch_stats(pre_bn, 1e-5)
        out = reference.bn_relu_dropout(pre_bn, mean, invstd, gamma, beta, dropout, so)
        return dict(mean=mean, invstd=invstd, var=var, out=out)

    run.id = f"bn_batch_stats-bn_relu_dropout-dropout{dropout}"
    return run


def linear_relu_dropout_case(dropout):
    def run(device, dtype):
        x, w, b, *_, so = _layer_inputs(device, dtype)
        return {"out": reference.linear_relu_dropout_forward(x, w, b, dropout, so)}

    run.id = f"linear_relu_dropout-dropout{dropout}"
    return run


def bn_update_running_stats_case():
    def run(device, dtype):
        stat = _stat_dtype(dtype)
        g = torch.Generator().manual_seed(2)
        rm, rv, mean, var = (torch.rand(OUT, generator=g).to(stat).to(device) for _ in range(4))
        assert reference.bn_update_running_stats_(rm, rv, mean, var, 0.1) is None
        return {"running_mean": rm, "running_var": rv}

    run.id = "bn_update_running_stats_"
    return run


def dropout_mask_case():
    def run(device, dtype):
        counter = torch.tensor([[0, 1, 2**32 - 1, 5], [M32, M32, 0, 2**31]])
        key = torch.tensor([0xA4093822, 0x299F31D0])
        return {
            "mask": reference.dropout_mask(SEED_OFFSET.to(device), 1001, 0.3, start=5),
            "keep_mask": reference.dropout_keep_mask(*SEED_OFFSET.to(device), 10, 0.5),
            "philox": reference.philox4x32_10(counter.to(device), key.to(device)),
        }

    run.id = "dropout_mask-philox4x32_10"
    return run


CASES = [
    *(
        cross_entropy_case(kind, reduction, weighted, smoothing)
        for kind in ("class", "prob")
        for reduction in (reference.REDUCTION_NONE, reference.REDUCTION_MEAN, reference.REDUCTION_SUM)
        for weighted, smoothing in ((False, 0.0), (True, 0.1))
    ),
    *(linear_bn_relu_case(batch, dropout) for batch in (True, False) for dropout in (0.0, 0.3)),
    linear_bn_relu_case(True, 0.3, need_grad_input=False),
    bn_stages_case(0.0),
    bn_stages_case(0.3),
    linear_relu_dropout_case(0.0),
    linear_relu_dropout_case(0.3),
    bn_update_running_stats_case(),
    dropout_mask_case(),
]
CASE_IDS = [case.id for case in CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_op_runs_on_meta(case, dtype):
    # The CPU run gives the shapes and dtypes; meta has no values, so nothing may be read from it.
    want = case(CPU, dtype)
    got = case(META, dtype)
    assert got.keys() == want.keys()
    for name, expected in want.items():
        assert got[name].device == META, name
        assert (got[name].shape, got[name].dtype) == (expected.shape, expected.dtype), name


def test_seed_offset_follows_the_input_to_its_device():
    # The CUDA kernels accept a (seed, offset) on the CPU and copy it to the input's device.
    x, w, b, *_ = _layer_inputs(META, torch.float32)
    out = reference.linear_relu_dropout_forward(x, w, b, 0.3, SEED_OFFSET)
    assert out.device == META and out.shape == (ROWS, OUT)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_op_on_cuda_equals_cpu(case, dtype):
    want = case(CPU, dtype)
    got = case(torch.device("cuda"), dtype)
    assert got.keys() == want.keys()
    for name, expected in want.items():
        assert got[name].device.type == "cuda", name
        if expected.is_floating_point():  # within the GEMMs' and reductions' rounding
            torch.testing.assert_close(got[name].cpu(), expected, rtol=1e-4, atol=1e-5, msg=name)
        else:  # masks and Philox words: bit for bit
            assert torch.equal(got[name].cpu(), expected), name


# --- the dropout generator ----------------------------------------------------------------------


def philox_by_definition(counter, key):
    """Philox4x32-10 in Python integers, straight from Random123, as an independent oracle."""
    c, (k0, k1) = list(counter), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M32, (p0 >> 32) ^ c[3] ^ k1, p0 & M32]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return tuple(c)


def keep_by_definition(seed, offset, index, p):
    """The mapping of csrc/common/philox.h for one element, with 64-bit seed and offset."""
    seed, offset, block = seed & (2**64 - 1), offset & (2**64 - 1), index // 4
    counter = (block & M32, block >> 32, offset & M32, offset >> 32)
    word = philox_by_definition(counter, (seed & M32, seed >> 32))[index % 4]
    p32 = struct.unpack("f", struct.pack("f", p))[0]
    return (word >> 8) * 2.0**-24 >= p32


DEVICES = [CPU, pytest.param(torch.device("cuda"), marks=needs_cuda)]


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_known_answer_vectors(device):
    for ctr, key, want in PHILOX_KNOWN_ANSWERS:
        assert philox_by_definition(ctr, key) == want
        got = reference.philox4x32_10(torch.tensor([ctr], device=device), torch.tensor(key, device=device))
        assert got.device.type == device.type and tuple(got[0].tolist()) == want


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**61 + 12345, 2**40 + 7), (-1, 2**64 - 1), (-(2**63), 2**32)])
def test_dropout_mask_follows_the_mapping(device, seed, offset):
    def signed(v):
        return v - 2**64 if v >= 2**63 else v

    so = torch.tensor([signed(seed & (2**64 - 1)), signed(offset)], device=device)
    for start, numel, p in ((0, 37, 0.3), (4 * (2**32 - 2) + 1, 13, 0.5), (2**62 - 7, 6, 0.1)):
        want = [keep_by_definition(seed, offset, start + i, p) for i in range(numel)]
        got = reference.dropout_mask(so, numel, p, start)
        assert got.device.type == device.type and got.dtype == torch.bool
        assert got.tolist() == want


# Seeds with and without the top bit; offsets on both sides of 2^32 and 2^63.
SEEDS = [0, 1, 2**61 + 12345, 2**63 - 1, -1, -5, -(2**63), 0x9E3779B97F4A7C15 - 2**64]
OFFSETS = [0, 7, 2**32 - 1, 2**32, 2**40 + 7, 2**63 - 1, -1]
# (start, numel): whole and partial blocks, and block indices crossing 2^32 and beyond.
WINDOWS = [(0, 1), (0, 4), (3, 5), (1, 63), (2, 1000), (4 * (2**32 - 10) + 3, 77), (2**40 + 1, 33)]


@needs_extension
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("seed", SEEDS)
def test_dropout_mask_equals_the_cpp_op(seed, offset):
    so = torch.tensor([seed, offset])
    for start, numel in WINDOWS:
        # 1 - 2^-30 rounds to 1.0 in float32: nothing is kept, as in the kernels.
        for p in (0.0, 0.1, 0.3, 0.5, 0.9, 1 - 2**-30):
            want = torch.ops.fused_mlp.dropout_mask(so, numel, p, start)
            assert torch.equal(reference.dropout_mask(so, numel, p, start), want), (start, numel, p)
    assert torch.equal(
        reference.dropout_keep_mask(seed, offset, 1000, 0.3), torch.ops.fused_mlp.dropout_mask(so, 1000, 0.3)
    )


@needs_extension
def test_philox_equals_the_cpp_op():
    g = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (4096, 4), generator=g)
    counter[:4] = torch.tensor([[0, 0, 0, 0], [M32, M32, M32, M32], [M32, 0, M32, 0], [0, M32, 0, M32]])
    for key in ([0, 0], [M32, M32], torch.randint(0, 2**32, (2,), generator=g).tolist()):
        key = torch.tensor(key)
        assert torch.equal(reference.philox4x32_10(counter, key), torch.ops.fused_mlp.philox4x32_10(counter, key))


def test_dropout_keep_mask_takes_ints_or_tensors():
    want = reference.dropout_mask(SEED_OFFSET, 100, 0.3)
    seed, offset = SEED_OFFSET.tolist()
    assert torch.equal(reference.dropout_keep_mask(seed, offset, 100, 0.3), want)
    assert torch.equal(reference.dropout_keep_mask(seed + 2**64, offset, 100, 0.3), want)  # the same 64 bits
    assert torch.equal(reference.dropout_keep_mask(*SEED_OFFSET, 100, 0.3), want)
    assert reference.dropout_keep_mask(seed, offset, 100, 0.3, device=META).device == META
