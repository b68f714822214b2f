"""Fused cross-entropy vs F.cross_entropy (eager) vs torch.compile, forward + backward.

python -m benchmarks.bench_cross_entropy            # the table, written to benchmarks/results/
python -m benchmarks.bench_cross_entropy --quick    # tiny shapes, one round: a smoke run
"""

import torch
import torch.nn.functional as F

import fused_mlp
from benchmarks.harness import interleaved_medians, machine_description, parse_args, publish, saved_activation_bytes

SHAPES = [(4096, 10), (4096, 1000), (4096, 32000)]
QUICK_SHAPES = [(64, 10)]
IMPLS = ("eager", "compile", "fused")


def make_inputs(rows, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=g).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=g)
    return x, target


def loss_functions():
    compiled = torch.compile(F.cross_entropy, dynamic=False)
    return {"eager": F.cross_entropy, "compile": compiled, "fused": fused_mlp.cross_entropy}


def training_step(loss_fn, x, target):
    """One forward + backward; the gradient is dropped so every round allocates it afresh."""

    def step():
        loss_fn(x, target).backward()
        x.grad = None

    return step


def run(shapes, rounds):
    fns = loss_functions()
    rows_out = []
    for rows, classes in shapes:
        x, target = make_inputs(rows, classes)
        steps = {name: training_step(fns[name], x, target) for name in IMPLS}
        medians = interleaved_medians(steps, rounds=rounds, warmup=2)
        saved = {
            name: saved_activation_bytes(lambda: fns[name](x, target), exclude=(x, target))
            for name in ("eager", "fused")
        }
        rows_out.append(((rows, classes), medians, saved))
    return rows_out


def format_table(results):
    lines = [
        "| (N, C) | eager ms | compile ms | fused ms | fused vs eager | fused vs compile "
        "| saved for backward, eager | fused |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (rows, classes), m, saved in results:
        lines.append(
            f"| ({rows}, {classes}) | {m['eager'] * 1e3:.3f} | {m['compile'] * 1e3:.3f} | "
            f"{m['fused'] * 1e3:.3f} | {m['eager'] / m['fused']:.2f}x | {m['compile'] / m['fused']:.2f}x | "
            f"{saved['eager'] / 1e6:.2f} MB | {saved['fused'] / 1e6:.3f} MB |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv, __doc__)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    results = run(shapes, rounds=args.rounds)
    table = format_table(results)
    report = (
        f"# Cross-entropy, forward + backward, CPU\n\n{machine_description()}\n\n"
        "Median of interleaved rounds; saved for backward = bytes autograd keeps beyond the "
        "logits and targets.\n\n" + table + "\n"
    )
    publish(report, "cross_entropy_cpu.md", args.quick)
    return results


if __name__ == "__main__":
    main()
