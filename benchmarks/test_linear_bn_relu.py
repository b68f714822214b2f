"""pytest-benchmark cases: `pytest benchmarks` (per-impl statistics, forward + backward; the
interleaved comparison, eval mode included, is `python -m benchmarks.bench_linear_bn_relu`)."""

import pytest

from benchmarks.bench_linear_bn_relu import CASES, IMPLS, gemm_floor, make_inputs, make_modules, make_step


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
@pytest.mark.parametrize("impl", IMPLS + ("floor",))
def test_linear_bn_relu_forward_backward(benchmark, impl, case):
    x, grad = make_inputs(*case)
    modules = make_modules(*case[1:])
    if impl == "floor":
        step = gemm_floor(x, modules["eager"].linear.weight, modules["eager"].linear.bias, grad, "train")
    else:
        step = make_step(modules[impl], x, grad, "train")
    step()  # warm-up (and, for compile, the compilation)
    benchmark.group = f"linear_bn_relu train {case[0]}x{case[1]}-{case[2]}"
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)
