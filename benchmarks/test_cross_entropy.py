"""pytest-benchmark cases: `pytest benchmarks` (per-impl statistics; the interleaved comparison
is `python -m benchmarks.bench_cross_entropy`)."""

import pytest

from benchmarks.bench_cross_entropy import IMPLS, SHAPES, loss_functions, make_inputs, training_step

_FNS = {}


def _loss_fn(impl):
    if not _FNS:
        _FNS.update(loss_functions())
    return _FNS[impl]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_forward_backward(benchmark, impl, shape):
    x, target = make_inputs(*shape)
    step = training_step(_loss_fn(impl), x, target)
    step()  # warm-up (and, for compile, the compilation)
    benchmark.group = f"cross_entropy {shape[0]}x{shape[1]}"
    benchmark.pedantic(step, rounds=10 if shape[1] < 32000 else 3, warmup_rounds=1)
