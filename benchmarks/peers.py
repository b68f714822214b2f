"""fused_mlp against its peers outside PyTorch: JAX (training) and ONNX Runtime (inference).

    python -m benchmarks.peers                  # writes benchmarks/results/peers_cpu.md and .png
    python -m benchmarks.peers --quick          # one small round, nothing written

Each peer runs in a process of its own (JAX's and ONNX Runtime's thread pools spin after work and
would take the cores of anything sharing the process), and so do the package's calls that face them,
TrainStep and fused_mlp's inference, whose weights and state then have the caches to themselves as
JAX's and ONNX Runtime's do; the other PyTorch implementations share one process, interleaved.
The processes of a round run in turn, the order rotating from round to round; every process reports
its medians and the table gives the median over rounds. Cases, all on the CPU:

- train_bn: one training step of the class-notes MLP (784-512-256-128-64-10, BatchNorm, ReLU,
  Dropout 0.3, cross-entropy, Adam 1e-3): TrainStep (fused_mlp.TrainStep: the whole step as one
  op), fused_mlp (MLP(impl="fused") on the standard path: model(x), loss.backward(), opt.step()),
  eager (the stock modules), compile (the stock modules under torch.compile), JAX
  (benchmarks/peer_jax.py) and the floor: the same GEMMs alone plus the Adam step alone. Every
  PyTorch impl takes the same torch.optim.Adam(fused=True) (fused_mlp.train.make_optimizer).
- infer: eval-mode inference of the same MLP under no_grad: fused_mlp, eager, compile, ONNX
  Runtime (the stock model exported with torch.onnx.export; benchmarks/peer_onnxruntime.py) and the
  network's five GEMMs chained with torch.addmm.
- train_nobn: one training step of the side notes' 784-128-64-10 ReLU net (no BatchNorm, no
  dropout, SGD 0.01 with momentum 0.9) at batch 64 and 256: TrainStep, fused_mlp, eager, JAX and the
  floor (its GEMMs plus the SGD step).

Each training table also gives TrainStep's share of the machine's limit: the step's FLOPs (those of
its GEMMs) over its time, against the rate of one big GEMM (torch.mm at 2048^3, measured in the same
process).

JAX and ONNX Runtime are optional (`make bench` installs requirements-bench.txt); without them
their columns say so and the rest is measured.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
BATCHES = (64, 256, 1024)
NOBN_BATCHES = (64, 256)
QUICK_BATCHES = (32,)


# --- the PyTorch side (one process) -----------------------------------------------------------------


def torch_child(batches, nobn_batches, reps, rounds, compile_, only_train_step=False):
    """Medians (ms) of the PyTorch implementations, interleaved within this process: with
    only_train_step TrainStep's and fused_mlp's inference (a process of their own, as each peer
    has), else all the others."""
    import functools

    import torch

    from benchmarks.harness import interleaved_medians
    from benchmarks.suite import _gemm_floor
    from fused_mlp import TrainStep
    from fused_mlp.models import MLP
    from fused_mlp.train import make_optimizer

    def timed(fn):
        def run():
            for _ in range(reps):
                fn()

        return run

    def models(impls, **kw):
        out = {}
        for impl in impls:
            torch.manual_seed(0)
            out[impl] = MLP(impl="fused" if impl in ("fused", "trainstep") else "baseline", **kw)
        return out

    def gemm_floor(model, batch, train):
        return _gemm_floor(model, batch, torch.device("cpu"), train)

    def train_calls(batch, optimizer, **kw):
        others = ("fused", "eager", "compile") if compile_ else ("fused", "eager")
        impls = ("trainstep",) if only_train_step else others
        nets = models(impls, **kw)
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
        calls = {}
        for impl, model in nets.items():
            model.train()
            opt = make_optimizer(model, *optimizer)
            if impl == "trainstep":
                calls[impl] = functools.partial(TrainStep(model, opt, strict=True), x, y)
                continue

            def loss_of(x, y, model=model):
                return model.loss(model(x), y)

            fn = torch.compile(loss_of) if impl == "compile" else loss_of

            def step(opt=opt, fn=fn):
                opt.zero_grad(set_to_none=True)
                fn(x, y).backward()
                opt.step()

            calls[impl] = step
        if only_train_step:
            return calls
        spare = models(("eager",), **kw)["eager"]
        for p in spare.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt = make_optimizer(spare, *optimizer)
        gemms = gemm_floor(spare, batch, True)

        def floor():
            gemms()
            opt.step()

        calls["floor"] = floor
        return calls

    def infer_calls(batch):
        # fused_mlp's beside TrainStep, in the process of their own; the stock ones in the shared one
        others = ("eager", "compile") if compile_ else ("eager",)
        impls = ("fused",) if only_train_step else others
        nets = models(impls)
        x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(3))
        calls = {}
        for impl, model in nets.items():
            model.eval()
            fn = torch.compile(model) if impl == "compile" else model

            def infer(fn=fn):
                with torch.no_grad():
                    fn(x)

            calls[impl] = infer
        if not only_train_step:
            calls["addmm chain"] = gemm_floor(nets["eager"], batch, False)
        return calls

    torch.set_num_threads(os.cpu_count() or 1)
    result = {"train_bn": {}, "infer": {}, "train_nobn": {}, "gemm_gflops": big_gemm_gflops(torch)}
    cases = [("train_bn", b, lambda b=b: train_calls(b, ("adam", 1e-3))) for b in batches]
    cases += [("infer", b, lambda b=b: infer_calls(b)) for b in batches]
    cases += [
        (
            "train_nobn",
            b,
            lambda b=b: train_calls(b, ("sgd", 0.01, 0.9), hidden=(128, 64), batch_norm=False, dropout=0.0),
        )
        for b in nobn_batches
    ]
    for case, batch, build in cases:
        calls = {name: timed(fn) for name, fn in build().items()}
        medians = interleaved_medians(calls, rounds=rounds, warmup=2)
        result[case][batch] = {name: t / reps * 1e3 for name, t in medians.items()}
    return result


def big_gemm_gflops(torch, n=2048, reps=5):
    """The machine's GEMM rate: GFLOP/s of torch.mm at n^3 (best of reps, after one warm-up)."""
    import time

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def step_gflop(widths, batch):
    """The GEMM FLOPs of one training step (in GFLOP): per Linear, the forward and the weight
    gradient, and the input gradient of every Linear but the first."""
    flops = 0
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        flops += 2 * batch * a * b * (2 if i == 0 else 3)
    return flops / 1e9


CLASS_NOTES = (784, 512, 256, 128, 64, 10)
SIDE_NOTES = (784, 128, 64, 10)


# --- the driver -------------------------------------------------------------------------------------


def have(module):
    return importlib.util.find_spec(module) is not None


def export_onnx(path):
    """The stock class-notes MLP in eval mode (the seed every impl uses), with a dynamic batch."""
    import torch

    from fused_mlp.models import MLP

    torch.manual_seed(0)
    model = MLP(impl="baseline").eval()
    program = torch.onnx.export(
        model,
        (torch.randn(64, 784),),
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        verbose=False,
    )
    program.save(path)


def _run(args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(batches, nobn_batches, rounds, reps, inner_rounds, compile_=True, log=print):
    """{case: {batch: {impl: median ms}}} over `rounds` rounds of one process per implementation."""
    peers = {"jax": have("jax") and have("optax"), "onnxruntime": have("onnxruntime") and have("onnxscript")}
    joined = ",".join
    samples = {}

    def add(case, batch, impl, ms):
        samples.setdefault(case, {}).setdefault(int(batch), {}).setdefault(impl, []).append(ms)

    with tempfile.TemporaryDirectory() as tmp:
        model_path = os.path.join(tmp, "mlp.onnx")
        if peers["onnxruntime"]:
            export_onnx(model_path)
        children = {
            "torch": [
                "-m",
                "benchmarks.peers",
                "--child",
                "--batches",
                joined(map(str, batches)),
                "--nobn-batches",
                joined(map(str, nobn_batches)),
                "--reps",
                str(reps),
                "--inner-rounds",
                str(inner_rounds),
            ]
            + ([] if compile_ else ["--no-compile"])
        }
        children["trainstep"] = children["torch"] + ["--train-step"]
        if peers["jax"]:
            children["jax"] = [
                "-m",
                "benchmarks.peer_jax",
                "--batches",
                joined(map(str, batches)),
                "--nobn-batches",
                joined(map(str, nobn_batches)),
                "--reps",
                str(reps),
                "--rounds",
                str(inner_rounds),
            ]
        if peers["onnxruntime"]:
            children["onnxruntime"] = [
                "-m",
                "benchmarks.peer_onnxruntime",
                "--model",
                model_path,
                "--batches",
                joined(map(str, batches)),
                "--threads",
                str(os.cpu_count() or 1),
                "--reps",
                str(reps),
                "--rounds",
                str(inner_rounds),
            ]
        names = list(children)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                got = _run(children[name])
                for case, per_batch in got.items():
                    if case == "gemm_gflops":
                        samples.setdefault(case, []).append(per_batch)
                        continue
                    for batch, value in per_batch.items():
                        if isinstance(value, dict):
                            for impl, ms in value.items():
                                add(case, batch, impl, ms)
                        else:
                            add(case, batch, "JAX" if name == "jax" else "ONNX Runtime", value)
            log(f"round {r + 1}/{rounds} done ({', '.join(order)})")
    medians = {
        case: {b: {impl: statistics.median(v) for impl, v in impls.items()} for b, impls in per.items()}
        for case, per in samples.items()
        if case != "gemm_gflops"
    }
    medians["gemm_gflops"] = statistics.median(samples["gemm_gflops"])
    return medians, peers


def _ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def format_report(medians, peers, rounds):
    from benchmarks.harness import machine_description

    missing = [name for name, ok in peers.items() if not ok]
    lines = [
        "# fused_mlp against JAX and ONNX Runtime, CPU",
        "",
        machine_description(),
        "",
        f"Each implementation in its own process, the processes alternating; median over {rounds} rounds "
        "of each process's medians. Times in ms per call. A ratio `A / B` is A's time over B's (above 1: B "
        "is faster). TrainStep is the whole training step as one op; fused_mlp is the fused model on the "
        "standard path (model(x), loss.backward(), optimizer.step()).",
        "",
        "![fused_mlp and its peers](peers_cpu.png)",
        "",
        "Reproduce: `make bench` (or `python -m benchmarks.peers`).",
        "",
    ]
    if missing:
        lines += [
            f"Not installed, so not measured: {', '.join(missing)} (`pip install -r requirements-bench.txt`).",
            "",
        ]

    def ms(row, impl):
        return f"{row[impl]:.3f}" if impl in row else "-"

    rate = medians.get("gemm_gflops")
    if rate:
        lines += [f"The machine's GEMM rate (torch.mm at 2048^3, 2 threads): {rate:.0f} GFLOP/s.", ""]

    def share(widths, batch, t):
        return f"{step_gflop(widths, batch) / (t / 1e3) / rate * 100:.0f}%" if rate and t else "-"

    train = medians.get("train_bn", {})
    if train:
        lines += [
            "## Training step, class-notes MLP (BatchNorm, Dropout 0.3, Adam)",
            "",
            "| batch | TrainStep | fused_mlp | eager | compile | JAX jit | floor | JAX / TrainStep "
            "| eager / TrainStep | compile / TrainStep | eager / fused_mlp | TrainStep's share of the limit |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b, row in sorted(train.items()):
            t, f = row.get("trainstep"), row["fused"]
            lines.append(
                f"| {b} | {ms(row, 'trainstep')} | {f:.3f} | {ms(row, 'eager')} | {ms(row, 'compile')} "
                f"| {ms(row, 'JAX')} | {row['floor']:.3f} | {_ratio(row.get('JAX'), t)} "
                f"| {_ratio(row.get('eager'), t)} | {_ratio(row.get('compile'), t)} | {_ratio(row.get('eager'), f)} "
                f"| {share(CLASS_NOTES, b, t)} |"
            )
        lines.append("")
    infer = medians.get("infer", {})
    if infer:
        lines += [
            "## Inference, class-notes MLP (eval, no_grad)",
            "",
            "| batch | fused_mlp | eager | compile | ONNX Runtime | addmm chain | vs eager | vs ONNX Runtime "
            "| fused / addmm chain |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b, row in sorted(infer.items()):
            f = row["fused"]
            lines.append(
                f"| {b} | {f:.3f} | {ms(row, 'eager')} | {ms(row, 'compile')} | {ms(row, 'ONNX Runtime')} "
                f"| {row['addmm chain']:.3f} | {_ratio(row.get('eager'), f)} | {_ratio(row.get('ONNX Runtime'), f)} "
                f"| {f / row['addmm chain']:.2f} |"
            )
        lines.append("")
    nobn = medians.get("train_nobn", {})
    if nobn:
        lines += [
            "## Training step, 784-128-64-10 ReLU net (no BatchNorm, SGD momentum 0.9)",
            "",
            "| batch | TrainStep | fused_mlp | eager | JAX jit | floor | JAX / TrainStep | eager / TrainStep "
            "| eager / fused_mlp | TrainStep's share of the limit |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b, row in sorted(nobn.items()):
            t, f = row.get("trainstep"), row["fused"]
            lines.append(
                f"| {b} | {ms(row, 'trainstep')} | {f:.3f} | {ms(row, 'eager')} | {ms(row, 'JAX')} "
                f"| {row['floor']:.3f} | {_ratio(row.get('JAX'), t)} | {_ratio(row.get('eager'), t)} "
                f"| {_ratio(row.get('eager'), f)} | {share(SIDE_NOTES, b, t)} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(medians, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("train_bn", "training step (BN MLP)", ("eager", "compile", "JAX", "fused", "trainstep")),
        ("infer", "inference (BN MLP)", ("eager", "compile", "ONNX Runtime", "fused")),
        ("train_nobn", "training step (no-BN net)", ("eager", "JAX", "fused", "trainstep")),
    ]
    panels = [p for p in panels if medians.get(p[0])]
    colors = {
        "eager": "#9aa5b1",
        "compile": "#6e7781",
        "JAX": "#e3a008",
        "ONNX Runtime": "#8250df",
        "fused": "#1f6feb",
        "trainstep": "#0a3069",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for ax, (case, title, impls) in zip(axes[0], panels):
        rows = sorted(medians[case].items())
        impls = [i for i in impls if any(i in row for _, row in rows)]
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            xs = [j + (k - (len(impls) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(
                xs,
                [row["fused"] and row.get(impl, 0) and row["fused"] / row[impl] for _, row in rows],
                width,
                label=impl,
                color=colors[impl],
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), [str(b) for b, _ in rows])
        ax.set_xlabel("batch")
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("speed relative to fused_mlp (higher is faster)")
    for ax in axes[0]:
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round at a small batch; nothing written")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of processes (default 5)")
    parser.add_argument("--reps", type=int, default=None, help="calls per timing (default 20)")
    parser.add_argument("--inner-rounds", type=int, default=None, help="timings per process (default 7)")
    parser.add_argument("--batches", default=None)
    parser.add_argument("--nobn-batches", default=None)
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles per batch)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train-step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    def batches_of(value, default):
        return tuple(int(v) for v in value.split(",") if v) if value is not None else default

    batches = batches_of(args.batches, QUICK_BATCHES if args.quick else BATCHES)
    nobn = batches_of(args.nobn_batches, QUICK_BATCHES if args.quick else NOBN_BATCHES)
    reps = args.reps or (2 if args.quick else 20)
    inner = args.inner_rounds or (1 if args.quick else 7)
    if args.child:
        result = torch_child(batches, nobn, reps, inner, not args.no_compile, only_train_step=args.train_step)
        print(json.dumps(result))
        return None
    rounds = args.rounds or (1 if args.quick else 5)
    medians, peers = run(batches, nobn, rounds, reps, inner, compile_=not (args.no_compile or args.quick))
    report = format_report(medians, peers, rounds)
    print(report)
    if not args.quick:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(os.path.join(RESULTS_DIR, "peers_cpu.md"), "w") as f:
            f.write(report)
        plot(medians, os.path.join(RESULTS_DIR, "peers_cpu.png"))
    return medians, peers


if __name__ == "__main__":
    main()
