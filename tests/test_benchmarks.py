"""The benchmark suite, run once on tiny shapes so it cannot rot. No timing is asserted here."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bench_cross_entropy  # noqa: E402


def test_cross_entropy_benchmark_quick(capsys):
    results = bench_cross_entropy.main(["--quick"])
    (shape, medians, saved), = results
    assert shape == bench_cross_entropy.QUICK_SHAPES[0]
    assert set(medians) == {"eager", "compile", "fused"} and all(m > 0 for m in medians.values())
    rows, classes = shape
    # eager keeps the (rows, classes) log-probabilities; the fused op keeps one float64 per row.
    assert saved["eager"] >= rows * classes * 4
    assert saved["fused"] == rows * 8
    assert "| (64, 10) |" in capsys.readouterr().out
