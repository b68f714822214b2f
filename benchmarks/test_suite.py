"""pytest-benchmark cases of the suite (benchmarks/suite.py): `pytest benchmarks/test_suite.py`
gives per-impl statistics for every case, impl and batch, the floors included. The interleaved
comparison and the report are `make bench`.

FUSED_MLP_BENCH_QUICK=1 runs one small batch (the test suite does, with --benchmark-disable, so
the cases cannot rot)."""

import os

import pytest
import torch

from benchmarks import suite

QUICK = os.environ.get("FUSED_MLP_BENCH_QUICK") == "1"
BATCHES = suite.QUICK_BATCHES if QUICK else suite.BATCHES
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_built = {}


def case_calls(case, batch, device):
    """{impl or floor part: call}, built once per (case, batch, device)."""
    key = (case, batch, device)
    if key not in _built:
        dev = torch.device(device)
        steps, floor, _, _ = suite.BUILDERS[case](batch, dev)
        calls = dict(steps)
        calls.update({f"floor-{part}": fn for part, fn in floor.items()})
        if dev.type == "cuda":  # pytest-benchmark times by the host clock: wait for the GPU's work
            calls = {name: _synchronized(fn) for name, fn in calls.items()}
        _built.clear()  # one case's models alive at a time
        _built[key] = calls
    return _built[key]


def _synchronized(fn):
    def call():
        fn()
        torch.cuda.synchronize()

    return call


PARAMS = [(case, impl) for case in suite.CASES for impl in suite.IMPLS] + [
    ("linear_bn_relu", "floor-gemm"),
    ("mlp_train_step", "floor-gemm"),
    ("mlp_train_step", "floor-adam"),
    ("mlp_eval", "floor-gemm"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case,impl", PARAMS)
def test_case(benchmark, case, impl, batch, device):
    call = case_calls(case, batch, device)[impl]
    call()  # warm-up (and, for compile, the compilation)
    benchmark.group = f"{case} batch {batch} {device}"
    benchmark.pedantic(call, rounds=1 if QUICK else 15, warmup_rounds=0 if QUICK else 2)
