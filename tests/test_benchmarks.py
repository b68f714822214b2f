"""The benchmark suite, run once on tiny shapes so it cannot rot. No timing is asserted here."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import (  # noqa: E402
    bench_cross_entropy,
    bench_gemm,
    bench_linear_bn_relu,
    bench_overhead,
    bench_training_epoch,
    suite,
)
from benchmarks import (  # noqa: E402
    peers as peers_module,
)


def test_cross_entropy_benchmark_quick(capsys):
    results, allocators = bench_cross_entropy.main(["--quick"])
    ((shape, medians, saved),) = results
    assert shape == bench_cross_entropy.QUICK_SHAPES[0]
    assert set(medians) == {"eager", "compile", "fused"} and all(m > 0 for m in medians.values())
    rows, classes = shape
    # eager keeps the (rows, classes) log-probabilities; the fused op keeps one float64 per row.
    assert saved["eager"] >= rows * classes * 4
    assert saved["fused"] == rows * 8
    assert set(allocators) == set(bench_cross_entropy.ALLOCATORS)
    for orders in allocators.values():
        assert set(orders) == {"fused first", "eager first"}
        assert all(t > 0 for m in orders.values() for t in m.values())
    out = capsys.readouterr().out
    assert "| (64, 10) |" in out and "| THP_MEM_ALLOC_ENABLE=1 | eager first |" in out


def test_gemm_benchmark_quick(capsys):
    rows = bench_gemm.main(["--quick"])
    assert [(batch, k, n) for batch, k, n, _ in rows] == [(64, k, n) for k, n in bench_gemm.SHAPES]
    for *_, gflops in rows:
        assert set(gflops) == {"owned forward", "torch forward", "owned backward", "torch backward"}
        assert all(g > 0 for g in gflops.values())
    assert "| 64 | 784-512 |" in capsys.readouterr().out


def test_overhead_benchmark_once(capsys):
    # This tree against itself: the before/after machinery, one round.
    medians = bench_overhead.main(["--before", ROOT, "--rounds", "1"])
    assert set(medians) == {"cross_entropy", "layer"} and all(b > 0 and a > 0 for b, a in medians.values())
    against = bench_overhead.main(["--rounds", "1"])
    assert set(against) == {"hvp_cross_entropy", "gradient_penalty_layer", "per_sample_grads_cross_entropy"}
    assert all(f > 0 and s > 0 for f, s in against.values())
    out = capsys.readouterr().out
    assert "| cross_entropy |" in out and "| per_sample_grads_cross_entropy |" in out


def test_training_epoch_benchmark_on_a_subset(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("FUSED_MLP_DATA", data_dir)
    medians = bench_training_epoch.main(["--epochs", "1", "--limit", "1024"])
    assert set(medians) == {"trainstep", "fused", "baseline", "compile"} and all(m > 0 for m in medians.values())
    out = capsys.readouterr().out
    assert "| trainstep |" in out and "| fused |" in out and "us per step" in out and "baseline / trainstep" in out


def test_linear_bn_relu_benchmark_quick(capsys):
    results = bench_linear_bn_relu.main(["--quick"])
    assert [(mode, shape) for mode, shape, _, _ in results] == [
        (mode, bench_linear_bn_relu.QUICK_CASES[0]) for mode in bench_linear_bn_relu.MODES
    ]
    for mode, _shape, medians, saved in results:
        assert set(medians) == {"eager", "compile", "fused", "floor"} and all(m > 0 for m in medians.values())
        if mode == "train":
            # eager keeps the Linear and BatchNorm outputs, the ReLU output and the dropout mask.
            assert 0 < saved["fused"] < saved["eager"] and saved["ratio"] == saved["fused"] / saved["eager"]
        else:
            assert saved is None
    out = capsys.readouterr().out
    assert out.count("| (64, 32, 16) |") == 2 and "fused / floor" in out


def test_suite_quick(capsys, tmp_path):
    results = suite.main(["--quick"])
    assert [(r["case"], r["batch"]) for r in results] == [(c, b) for c in suite.CASES for b in suite.QUICK_BATCHES]
    by_case = {r["case"]: r for r in results}
    for r in results:
        assert set(r["ms"]) == set(suite.IMPLS) and all(v > 0 for v in r["ms"].values())
    assert set(by_case["mlp_train_step"]["floor_ms"]) == {"gemm", "adam"}
    assert set(by_case["mlp_eval"]["floor_ms"]) == {"gemm"} and not by_case["cross_entropy"]["floor_ms"]
    # The fused ops keep less for backward than the stock modules, for every case that has a backward.
    for case in ("cross_entropy", "linear_bn_relu", "mlp_train_step"):
        saved = by_case[case]["saved"]
        assert 0 < saved["fused"] < saved["baseline"], case
    assert not by_case["mlp_eval"]["saved"]
    out = capsys.readouterr().out
    assert "| mlp_train_step | 16 |" in out and "fused / floor" in out
    # The chart: a PNG with one panel per case.
    png = tmp_path / "cpu.png"
    suite.plot(results, str(png), suite.torch.device("cpu"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peers_quick(capsys, tmp_path):
    """One quick round of the peer comparison: the PyTorch side always, JAX and ONNX Runtime when
    installed (each in its own process); otherwise the report names what is missing."""
    medians, peers = peers_module.main(["--quick"])
    batch = peers_module.QUICK_BATCHES[0]
    assert set(medians["train_bn"][batch]) >= {"trainstep", "fused", "eager", "floor"}
    assert set(medians["infer"][batch]) >= {"fused", "eager", "addmm chain"}
    assert set(medians["train_nobn"][batch]) >= {"trainstep", "fused", "eager", "floor"}
    assert ("JAX" in medians["train_bn"][batch]) == peers["jax"]
    assert ("ONNX Runtime" in medians["infer"][batch]) == peers["onnxruntime"]
    assert medians["gemm_gflops"] > 0
    cases = [case for name, case in medians.items() if name != "gemm_gflops"]
    assert all(v > 0 for case in cases for row in case.values() for v in row.values())
    out = capsys.readouterr().out
    assert "## Training step, class-notes MLP" in out and "## Inference" in out and "share of the limit" in out
    if not all(peers.values()):
        assert "Not installed, so not measured" in out
    png = tmp_path / "peers.png"
    peers_module.plot(medians, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_rejects_unknown_cases():
    import pytest

    with pytest.raises(SystemExit):
        suite.main(["--quick", "--cases", "nonsense"])


def test_pytest_benchmark_cases_quick():
    """The pytest-benchmark cases, each run once on a small batch (benchmarking disabled)."""
    env = dict(os.environ, FUSED_MLP_BENCH_QUICK="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-disable",
            os.path.join(ROOT, "benchmarks", "test_suite.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(suite.CASES) * len(suite.IMPLS) + 4} passed" in result.stdout
