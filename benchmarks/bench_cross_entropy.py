"""Fused cross-entropy vs F.cross_entropy (eager) vs torch.compile, forward + backward.

python -m benchmarks.bench_cross_entropy            # the tables, written to benchmarks/results/
python -m benchmarks.bench_cross_entropy --quick    # tiny shapes, one round: a smoke run

The second table is the large vocabulary under both CPU allocator settings (PyTorch's default, and
transparent huge pages with THP_MEM_ALLOC_ENABLE=1, which is read once per process: each setting
runs in a process of its own), in both call orders, against the bandwidth bound of the same run.
"""

import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

import fused_mlp
from benchmarks.harness import (
    interleaved_medians,
    machine_description,
    parse_args,
    publish,
    saved_activation_bytes,
    wall_time,
)

SHAPES = [(4096, 10), (4096, 1000), (4096, 32000)]
QUICK_SHAPES = [(64, 10)]
IMPLS = ("eager", "compile", "fused")
LARGE_VOCABULARY = (4096, 32000)
QUICK_LARGE_VOCABULARY = (64, 1000)
ALLOCATORS = {"default": {}, "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"}}


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


def bandwidth_bound(x):
    """What any forward + backward must at least move: two reads of the logits (the forward's and
    the backward's) and one write of a fresh tensor of their size (the gradient)."""

    def step():
        x.sum()
        x.sum()
        torch.empty_like(x).fill_(1.0)

    return step


def allocator_rounds(shape, rounds):
    """In this process (one allocator setting): per round, the fused and the eager step in
    alternating order, then the bandwidth bound. Returns the samples of each order in seconds."""
    x, target = make_inputs(*shape)
    steps = {
        "fused": training_step(fused_mlp.cross_entropy, x, target),
        "eager": training_step(F.cross_entropy, x, target),
    }
    bound = bandwidth_bound(x)
    # Warm-up: the first calls also pay for memory the process (or a virtual machine's host) has
    # never touched, several times over.
    for _ in range(3):
        for fn in (*steps.values(), bound):
            fn()
    samples = {"fused first": [], "eager first": []}
    for r in range(2 * rounds):
        order = ("fused", "eager") if r % 2 == 0 else ("eager", "fused")
        times = {name: wall_time(steps[name]) for name in order}
        times["bound"] = wall_time(bound)
        samples[f"{order[0]} first"].append(times)
    return samples


def run_allocators(shape, rounds):
    """{setting: {order: {fused, eager, bound: median seconds}}}, each setting in a fresh process."""
    out = {}
    for setting, env in ALLOCATORS.items():
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_cross_entropy",
                "--allocator-worker",
                *map(str, shape),
                str(rounds),
            ],
            env={**{k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}, **env},
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            capture_output=True,
            text=True,
            check=True,
        )
        samples = json.loads(result.stdout.splitlines()[-1])
        out[setting] = {
            order: {name: statistics.median(t[name] for t in times) for name in ("fused", "eager", "bound")}
            for order, times in samples.items()
        }
    return out


def format_allocator_table(shape, results):
    lines = [
        f"| ({shape[0]}, {shape[1]}) | order | eager ms | fused ms | fused vs eager | bound ms | fused / bound |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for setting, orders in results.items():
        for order, m in orders.items():
            lines.append(
                f"| {setting} | {order} | {m['eager'] * 1e3:.1f} | {m['fused'] * 1e3:.1f} | "
                f"{m['eager'] / m['fused']:.2f}x | {m['bound'] * 1e3:.1f} | {m['fused'] / m['bound']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--allocator-worker"]:
        rows, classes, rounds = map(int, argv[1:4])
        print(json.dumps(allocator_rounds((rows, classes), rounds)))
        return None
    args = parse_args(argv, __doc__)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    results = run(shapes, rounds=args.rounds)
    vocabulary = QUICK_LARGE_VOCABULARY if args.quick else LARGE_VOCABULARY
    allocators = run_allocators(vocabulary, rounds=args.rounds)
    report = (
        f"# Cross-entropy, forward + backward, CPU\n\n{machine_description()}\n\n"
        "Median of interleaved rounds; saved for backward = bytes autograd keeps beyond the "
        "logits and targets.\n\n" + format_table(results) + "\n\n"
        "## A large vocabulary: allocator settings and call order\n\n"
        "Each allocator setting in a process of its own, applied to both sides. Each round runs the "
        "fused and the eager step in one order, then the bandwidth bound: two reads of the logits and "
        "one write of a fresh tensor of their size, what any forward + backward moves at least. "
        "Rounds alternate the order; medians per order.\n\n" + format_allocator_table(vocabulary, allocators) + "\n"
    )
    publish(report, "cross_entropy_cpu.md", args.quick)
    return results, allocators


if __name__ == "__main__":
    main()
