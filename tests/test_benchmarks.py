"""The benchmark suite, run once on tiny shapes so it cannot rot. No timing is asserted here."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bench_cross_entropy, bench_linear_bn_relu  # noqa: E402


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


def test_linear_bn_relu_benchmark_quick(capsys):
    results = bench_linear_bn_relu.main(["--quick"])
    assert [(mode, shape) for mode, shape, _, _ in results] == [
        (mode, bench_linear_bn_relu.QUICK_CASES[0]) for mode in bench_linear_bn_relu.MODES]
    for mode, shape, medians, saved in results:
        assert set(medians) == {"eager", "compile", "fused", "floor"} and all(m > 0 for m in medians.values())
        if mode == "train":
            # eager keeps the Linear and BatchNorm outputs, the ReLU output and the dropout mask.
            assert 0 < saved["fused"] < saved["eager"] and saved["ratio"] == saved["fused"] / saved["eager"]
        else:
            assert saved is None
    out = capsys.readouterr().out
    assert out.count("| (64, 32, 16) |") == 2 and "fused / floor" in out
