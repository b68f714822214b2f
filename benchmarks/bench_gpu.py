"""The GPU benchmarks of `make gpu-check`: cross-entropy, the layer, the class-notes training step
and inference, each against stock PyTorch eager and torch.compile, and CUDA graphs where they apply.

    python -m benchmarks.bench_gpu [--device cuda|cpu] [--tiny] [--out FILE.json]

On a GPU every time is a median of CUDA-event timings after warm-up; the memory-bound
cross-entropy also reports its achieved bandwidth against the GPU's peak. torch.compile is
time-boxed: it compiles each model at one batch size only (the first of the step's batches) and
the cross-entropy at its first shape only. --tiny runs the same code at tiny sizes (the dry run on the CPU,
host-clock timings, no torch.compile)."""

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from benchmarks.harness import cuda_event_time, wall_time
from fused_mlp import functional
from fused_mlp.models import MLP
from fused_mlp.nn import LinearBNReLU
from fused_mlp.step import TrainStep

# Peak memory bandwidth in bytes/s by device name, where the device properties do not give it.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def peak_bandwidth(device):
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock, width = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and width:  # kHz, bits; double data rate
        return 2 * clock * 1e3 * width / 8
    return next((bw for name, bw in PEAK_BANDWIDTH.items() if name in props.name), None)


def median_time(fn, device, reps, warmup=3):
    timer = cuda_event_time if device.type == "cuda" else wall_time
    for _ in range(warmup):
        fn()
    return statistics.median(timer(fn) for _ in range(reps))


def compiled_or_none(fn, enabled):
    return torch.compile(fn) if enabled else None


def bench_cross_entropy(device, shapes, dtypes, reps, compile_):
    rows = []
    peak = peak_bandwidth(device)
    for i, (n, c) in enumerate(shapes):
        for dtype in dtypes:
            x = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
            target = torch.randint(0, c, (n,), device=device)

            def step(loss_fn):
                def run():
                    x.grad = None
                    loss_fn(x, target).backward()

                return run

            cases = {"fused_mlp": step(functional.cross_entropy), "F.cross_entropy": step(F.cross_entropy)}
            compiled = compiled_or_none(F.cross_entropy, compile_ and i == 0)
            if compiled is not None:
                cases["torch.compile"] = step(compiled)
            times = {name: median_time(fn, device, reps) for name, fn in cases.items()}
            # Forward reads the logits; backward reads them again and writes their gradient.
            moved = 3 * x.numel() * x.element_size()
            row = {"rows": n, "classes": c, "dtype": str(dtype).replace("torch.", ""), "ms": {}, "bandwidth": {}}
            for name, t in times.items():
                row["ms"][name] = t * 1e3
                row["bandwidth"][name] = moved / t / peak if peak else None
            rows.append(row)
    return rows


def bench_layer(device, batches, reps):
    rows = []
    for batch in batches:
        fused = LinearBNReLU(784, 512, dropout=0.3).to(device).train()
        stock = torch.nn.Sequential(
            torch.nn.Linear(784, 512), torch.nn.BatchNorm1d(512), torch.nn.ReLU(), torch.nn.Dropout(0.3)
        ).to(device)
        x = torch.randn(batch, 784, device=device, requires_grad=True)

        def step(module):
            def run():
                module(x).sum().backward()

            return run

        times = {"fused_mlp": median_time(step(fused), device, reps), "stock": median_time(step(stock), device, reps)}
        rows.append({"batch": batch, "ms": {k: v * 1e3 for k, v in times.items()}})
    return rows


def _standard_step(model, optimizer):
    def run(x, y):
        optimizer.zero_grad(set_to_none=True)
        model.loss(model(x), y).backward()
        optimizer.step()

    return run


def bench_training_step(device, batches, reps, compile_):
    rows = []
    for i, batch in enumerate(batches):
        x = torch.randn(batch, 784, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        cases = {}
        for name in ("TrainStep", "TrainStep + CUDA graph", "fused_mlp", "eager", "torch.compile"):
            if name == "TrainStep + CUDA graph" and device.type != "cuda":
                continue
            if name == "torch.compile" and not (compile_ and i == 0):
                continue
            model = MLP(impl="baseline" if name in ("eager", "torch.compile") else "fused").to(device).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            if name.startswith("TrainStep"):
                fn = TrainStep(model, optimizer, strict=True, cuda_graph=name.endswith("graph"))
            else:
                if name == "torch.compile":
                    model = torch.compile(model)  # model.loss reaches the module's own
                fn = _standard_step(model, optimizer)
            cases[name] = (lambda f: lambda: f(x, y))(fn)
        times = {name: median_time(fn, device, reps) for name, fn in cases.items()}
        rows.append({"batch": batch, "ms": {k: v * 1e3 for k, v in times.items()}})
    return rows


def bench_inference(device, batches, reps, compile_):
    rows = []
    for i, batch in enumerate(batches):
        x = torch.randn(batch, 784, device=device)
        fused, eager = MLP().to(device).eval(), MLP(impl="baseline").to(device).eval()
        cases = {"fused_mlp": fused, "eager": eager}
        if compile_ and i == 0:
            cases["torch.compile"] = torch.compile(MLP(impl="baseline").to(device).eval())
        times = {}
        with torch.no_grad():
            for name, model in cases.items():
                times[name] = median_time((lambda m: lambda: m(x))(model), device, reps)
        rows.append({"batch": batch, "ms": {k: v * 1e3 for k, v in times.items()}})
    return rows


def run(device, tiny, compile_):
    if tiny:
        sizes = dict(ce=[(64, 1000), (8, 5000)], layer=[16, 64], step=[16, 64], reps=3)
    else:
        sizes = dict(ce=[(4096, 32000), (8192, 128256)], layer=[256, 4096], step=[64, 256, 1024, 4096], reps=20)
    dtypes = (torch.float32, torch.bfloat16)
    torch.manual_seed(0)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "compile": "one batch size per model (the first), the cross-entropy at its first shape" if compile_ else "off",
        "cross_entropy": bench_cross_entropy(device, sizes["ce"], dtypes, sizes["reps"], compile_),
        "layer": bench_layer(device, sizes["layer"], sizes["reps"]),
        "training_step": bench_training_step(device, sizes["step"], sizes["reps"], compile_),
        "inference": bench_inference(device, sizes["step"], sizes["reps"], compile_),
    }


def _table(rows, keys, label):
    names = list(dict.fromkeys(n for r in rows for n in r["ms"]))
    head = "| " + " | ".join([*keys, *(f"{n} ms" for n in names)]) + " |"
    lines = [head, "|" + "---:|" * (len(keys) + len(names))]
    for r in rows:
        cells = [str(r[k]) for k in keys] + [f"{r['ms'][n]:.3f}" if n in r["ms"] else "" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return [f"### {label}", "", *lines, ""]


def markdown(report):
    """The report's tables as Markdown."""
    out = _table(report["cross_entropy"], ("rows", "classes", "dtype"), "Cross-entropy, forward and backward")
    if any(v is not None for r in report["cross_entropy"] for v in r["bandwidth"].values()):
        out += ["Share of the GPU's peak memory bandwidth (3 passes over the logits):", ""]
        for r in report["cross_entropy"]:
            shares = ", ".join(f"{n} {v:.0%}" for n, v in r["bandwidth"].items() if v is not None)
            out.append(f"- {r['rows']} x {r['classes']} {r['dtype']}: {shares}")
        out.append("")
    out += _table(report["layer"], ("batch",), "LinearBNReLU 784-512, training, forward and backward")
    out += _table(report["training_step"], ("batch",), "Training step, class-notes MLP, Adam")
    for r in report["training_step"]:
        ms = r["ms"]
        if "eager" in ms and "TrainStep" in ms:
            r["speedup"] = ms["eager"] / min(v for k, v in ms.items() if k.startswith("TrainStep"))
    out += ["Speed-up of TrainStep (its faster form) over eager: "]
    out[-1] += ", ".join(f"batch {r['batch']} {r['speedup']:.2f}x" for r in report["training_step"] if "speedup" in r)
    out += ["", *_table(report["inference"], ("batch",), "Inference, class-notes MLP, eval, no_grad")]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, no torch.compile (the dry run)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    report = run(torch.device(args.device), args.tiny, not (args.tiny or args.no_compile))
    text = markdown(report)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**report, "markdown": text}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
