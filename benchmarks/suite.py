"""The benchmark suite: fused_mlp against the stock nn.Module baseline and torch.compile, end to end.

    python -m benchmarks.suite                 # every case; writes benchmarks/results/<device>.md and .png
    python -m benchmarks.suite --quick         # tiny batches, one round: a smoke run, nothing written
    python -m benchmarks.suite --device cuda   # on the GPU (CUDA events after synchronizing)

Cases, each for impl in baseline (the stock modules, eager), compile (the baseline under
torch.compile, warmed up before timing) and fused, at batch 64, 256, 1024 and 4096:

- cross_entropy: log-softmax + NLL over the MLP's (batch, 10) logits, forward + backward;
- linear_bn_relu: the MLP's first hidden layer (784 -> 512, BatchNorm, ReLU, Dropout 0.3),
  forward + backward;
- mlp_train_step: one training step of the class-notes MLP: forward, loss, backward and the
  same torch.optim.Adam(fused=True) step for every impl;
- mlp_eval: inference of the MLP (eval mode, no_grad).

Floors, timed in the same interleaved rounds: the case's GEMMs alone (at::addmm / at::mm on
tensors of the same shapes, no autograd), plus the optimizer step alone for the training step.
Memory: the activation bytes autograd saves for backward (parameters and inputs excluded, each
storage once) and, on CUDA, the peak allocated bytes of one call.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import fused_mlp
from benchmarks.bench_linear_bn_relu import make_modules, make_step
from benchmarks.harness import (
    cuda_event_time,
    interleaved_medians,
    machine_description,
    saved_activation_bytes,
    wall_time,
)
from fused_mlp.models import MLP
from fused_mlp.train import make_optimizer

CASES = ("cross_entropy", "linear_bn_relu", "mlp_train_step", "mlp_eval")
BATCHES = (64, 256, 1024, 4096)
QUICK_BATCHES = (16,)
IMPLS = ("baseline", "compile", "fused")
CLASSES = 10
LAYER = (784, 512)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _compile(fn):
    # Every (case, batch) is one more specialization of the same code.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False)


# --- the cases: each builder returns {impl: step}, {floor part: step}, and the saved-bytes probes ----


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def cross_entropy_case(batch, device):
    g = _generator()
    x = torch.randn(batch, CLASSES, generator=g).to(device).requires_grad_()
    target = torch.randint(0, CLASSES, (batch,), generator=g).to(device)

    def class_notes_loss(x, target):  # log-softmax + NLL, as the class notes write it
        return F.nll_loss(F.log_softmax(x, dim=1), target)

    losses = {"baseline": class_notes_loss, "compile": _compile(class_notes_loss), "fused": fused_mlp.cross_entropy}

    def step_of(loss_fn):
        def step():
            loss_fn(x, target).backward()
            x.grad = None

        return step

    steps = {impl: step_of(fn) for impl, fn in losses.items()}
    probes = {impl: (lambda fn=losses[impl]: fn(x, target)) for impl in ("baseline", "fused")}
    return steps, {}, probes, (x, target)


def linear_bn_relu_case(batch, device):
    n_in, n_out = LAYER
    layer = make_modules(n_in, n_out, device=device)  # the op benchmark's modules, as "baseline"
    stock = layer["eager"]
    modules = {"baseline": stock, "compile": layer["compile"], "fused": layer["fused"]}
    g = _generator()
    x = torch.randn(batch, n_in, generator=g).to(device).requires_grad_()
    grad = torch.randn(batch, n_out, generator=g).to(device)

    steps = {impl: make_step(m, x, grad, "train") for impl, m in modules.items()}
    w, b, xd = stock.linear.weight.detach(), stock.linear.bias.detach(), x.detach()
    floor = {"gemm": lambda: (torch.addmm(b, xd, w.t()), torch.mm(grad, w), torch.mm(grad.t(), xd))}
    probes = {impl: (lambda m=modules[impl]: m(x)) for impl in ("baseline", "fused")}
    return steps, floor, probes, (x, *stock.parameters(), *modules["fused"].parameters())


def _mlps(device):
    models = {}
    for impl in IMPLS:
        torch.manual_seed(0)  # the same initial parameters for every impl
        models[impl] = MLP(impl="fused" if impl == "fused" else "baseline").to(device)
    return models


def _mlp_inputs(batch, device):
    g = _generator()
    x = torch.randn(batch, 784, generator=g).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=g).to(device)
    return x, y


def _linear_shapes(model):
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def _gemm_floor(model, batch, device, train):
    """The MLP's GEMMs on tensors of the same shapes: per Linear the forward addmm and, in training,
    the weight-gradient mm and (except for the first layer, whose input needs no gradient) the
    input-gradient mm."""
    g = _generator(1)
    layers = []
    for i, (n_in, n_out) in enumerate(_linear_shapes(model)):
        layers.append(
            (
                i,
                torch.randn(batch, n_in, generator=g).to(device),
                torch.randn(n_out, n_in, generator=g).to(device),
                torch.randn(n_out, generator=g).to(device),
                torch.randn(batch, n_out, generator=g).to(device),
            )
        )

    def gemms():
        for i, x, w, b, dy in layers:
            torch.addmm(b, x, w.t())
            if train:
                torch.mm(dy.t(), x)
                if i > 0:
                    torch.mm(dy, w)

    return gemms


def mlp_train_step_case(batch, device):
    models = _mlps(device)
    x, y = _mlp_inputs(batch, device)

    def step_of(impl):
        model = models[impl].train()
        optimizer = make_optimizer(model)

        def forward_loss(x, y):
            return model.loss(model(x), y)

        fn = _compile(forward_loss) if impl == "compile" else forward_loss

        def step():
            optimizer.zero_grad(set_to_none=True)
            fn(x, y).backward()
            optimizer.step()

        return step

    steps = {impl: step_of(impl) for impl in IMPLS}
    # The optimizer step alone, on a copy of the model with gradients in place.
    torch.manual_seed(0)
    spare = MLP(impl="baseline").to(device)
    for p in spare.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    adam = make_optimizer(spare)
    floor = {"gemm": _gemm_floor(spare, batch, device, train=True), "adam": adam.step}
    probes = {impl: (lambda m=models[impl]: m.loss(m(x), y)) for impl in ("baseline", "fused")}
    exclude = (x, y, *[p for m in models.values() for p in m.parameters()])
    return steps, floor, probes, exclude


def mlp_eval_case(batch, device):
    models = _mlps(device)
    x, _ = _mlp_inputs(batch, device)

    def step_of(impl):
        model = models[impl].eval()
        fn = _compile(model) if impl == "compile" else model

        def step():
            with torch.no_grad():
                fn(x)

        return step

    steps = {impl: step_of(impl) for impl in IMPLS}
    floor = {"gemm": _gemm_floor(models["baseline"], batch, device, train=False)}
    return steps, floor, {}, ()


BUILDERS = {
    "cross_entropy": cross_entropy_case,
    "linear_bn_relu": linear_bn_relu_case,
    "mlp_train_step": mlp_train_step_case,
    "mlp_eval": mlp_eval_case,
}


# --- measuring ------------------------------------------------------------------------------------


def _peak_bytes(fn, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure(case, batch, device, rounds, warmup):
    steps, floor, probes, exclude = BUILDERS[case](batch, device)
    calls = dict(steps)
    calls.update({f"floor:{part}": fn for part, fn in floor.items()})
    timer = cuda_event_time if device.type == "cuda" else wall_time
    medians = interleaved_medians(calls, rounds=rounds, warmup=warmup, timer=timer)
    result = {
        "case": case,
        "batch": batch,
        "ms": {impl: medians[impl] * 1e3 for impl in IMPLS},
        "floor_ms": {part: medians[f"floor:{part}"] * 1e3 for part in floor},
        "saved": {},
        "peak": {},
    }
    for impl, probe in probes.items():
        result["saved"][impl] = saved_activation_bytes(probe, exclude=exclude)
    if device.type == "cuda":
        result["peak"] = {impl: _peak_bytes(fn, device) for impl, fn in steps.items()}
    return result


def run(batches, device, rounds, warmup=3, cases=CASES, log=print):
    results = []
    for case in cases:
        for batch in batches:
            r = measure(case, batch, device, rounds, warmup)
            log(f"{case} batch {batch}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in r["ms"].items()))
            results.append(r)
    return results


# --- reporting ------------------------------------------------------------------------------------


def _ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def format_report(results, device, rounds, image=None):
    floor_note = (
        "floor = the case's GEMMs alone (forward addmm; in training the weight- and "
        "input-gradient mms, no input gradient for the first layer), plus the Adam step "
        "alone for the training step; cross-entropy has no GEMM, so no floor"
    )
    lines = [
        f"# fused_mlp benchmarks, {device.type.upper()}",
        "",
        machine_description() + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "",
        f"Median of {rounds} interleaved rounds (baseline, compile, fused and the floor alternate "
        "within each round; on CUDA each call is timed with CUDA events after synchronizing). "
        "Times in ms per call; speedups are baseline time / fused time; "
        f"{floor_note}. Saved = activation bytes autograd keeps for backward (inputs and "
        "parameters excluded).",
        "",
    ]
    if image:
        lines += [f"![speedups over the baseline]({image})", ""]
    lines += ["Reproduce: `make bench` (or `python -m benchmarks.suite`).", ""]
    header = (
        "| case | batch | baseline ms | compile ms | fused ms | fused samples/s | fused vs baseline "
        "| fused vs compile | floor ms | fused / floor | saved, baseline | saved, fused | fused / baseline |"
    )
    lines += [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ms, floor = r["ms"], sum(r["floor_ms"].values())
        saved = r["saved"]
        saved_cells = (
            f"{saved['baseline'] / 1e6:.3f} MB | {saved['fused'] / 1e6:.3f} MB | "
            f"{saved['fused'] / saved['baseline']:.2f}"
            if saved
            else "- | - | -"
        )
        floor_parts = " + ".join(f"{v:.3f}" for v in r["floor_ms"].values())
        over_floor = f"{ms['fused'] / floor:.2f}" if floor else "-"
        lines.append(
            f"| {r['case']} | {r['batch']} | {ms['baseline']:.3f} | {ms['compile']:.3f} | {ms['fused']:.3f} | "
            f"{r['batch'] / (ms['fused'] / 1e3):,.0f} | {_ratio(ms['baseline'], ms['fused'])} | "
            f"{_ratio(ms['compile'], ms['fused'])} | {floor_parts or '-'} | "
            f"{over_floor} | {saved_cells} |"
        )
    if any(r["peak"] for r in results):
        lines += [
            "",
            "Peak allocated per call (MB):",
            "",
            "| case | batch | baseline | compile | fused |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in results:
            p = r["peak"]
            lines.append(f"| {r['case']} | {r['batch']} | " + " | ".join(f"{p[i] / 1e6:.2f}" for i in IMPLS) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in CASES if any(r["case"] == c for r in results)]
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rows = [r for r in results if r["case"] == case]
        xs = range(len(rows))
        width = 0.38
        ax.bar(
            [x - width / 2 for x in xs],
            [r["ms"]["baseline"] / r["ms"]["compile"] for r in rows],
            width,
            label="compile vs baseline",
            color="#9aa5b1",
        )
        ax.bar(
            [x + width / 2 for x in xs],
            [r["ms"]["baseline"] / r["ms"]["fused"] for r in rows],
            width,
            label="fused vs baseline",
            color="#1f6feb",
        )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs), [str(r["batch"]) for r in rows])
        ax.set_xlabel("batch")
        ax.set_title(case)
    axes[0][0].set_ylabel("speedup over baseline (x)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"fused_mlp vs the stock modules, {device.type.upper()} ({machine_description().split(',')[0]})", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny batches, one round; nothing is written")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 60)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 64,256,1024,4096)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    cases = tuple(args.cases.split(","))
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown case(s) {unknown}; choose from {CASES}")
    rounds = args.rounds or (1 if args.quick else 60)
    batches = (
        QUICK_BATCHES if args.quick else tuple(int(b) for b in args.batches.split(",")) if args.batches else BATCHES
    )
    results = run(batches, device, rounds, warmup=1 if args.quick else 5, cases=cases)
    report = format_report(results, device, rounds, image=None if args.quick else f"{device.type}.png")
    print(report)
    if not args.quick:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(os.path.join(RESULTS_DIR, f"{device.type}.md"), "w") as f:
            f.write(report)
        plot(results, os.path.join(RESULTS_DIR, f"{device.type}.png"), device)
    return results


if __name__ == "__main__":
    main()
