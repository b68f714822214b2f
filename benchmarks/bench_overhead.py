"""Per-call cost of the Python around the kernels, before and after a change, and what a double
backward costs.

    python -m benchmarks.bench_overhead --before /path/to/other/checkout [--rounds 12]

--before is a source tree of fused_mlp with its extension built (for a change to the Python
layer only, a copy of this tree's fused_mlp/_C*.so and _build_info.py will do). Each round runs
one process per tree, alternating which goes first, and each process reports its medians; the
table gives the median over rounds. Both trees run on the same machine in the same minutes, so
their ratio means something even where absolute times drift 2x between runs.

Cases, forward + backward, one thread, no transform:
- cross_entropy: fused_mlp.cross_entropy on (64, 10) logits, class-index targets;
- layer: LinearBNReLU(784, 512, dropout=0.3) in training at batch 64.

Without --before, only this tree runs, against stock PyTorch in the same process, interleaved:
- hvp_cross_entropy: a Hessian-vector product through cross-entropy at (4096, 10);
- gradient_penalty_layer: d/dparams |d out / d x|^2 through the layer at batch 256, 784 -> 512;
- per_sample_grads_cross_entropy: torch.func.vmap(torch.func.grad(...)) of the loss of each of
  256 samples of 10 classes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import fused_mlp
from fused_mlp.nn import LinearBNReLU
assert fused_mlp.__file__.startswith(sys.argv[1]), fused_mlp.__file__
torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.randn(64, 10, requires_grad=True)
t = torch.randint(0, 10, (64,))
layer = LinearBNReLU(784, 512, dropout=0.3)
xin = torch.randn(64, 784)
cases = {
    "cross_entropy": lambda: fused_mlp.cross_entropy(x, t).backward(),
    "layer": lambda: layer(xin).sum().backward(),
}
calls = {"cross_entropy": 400, "layer": 40}
for f in cases.values():
    for _ in range(20):
        f()
times = {k: [] for k in cases}
for _ in range(15):
    for k, f in cases.items():
        start = time.perf_counter()
        for _ in range(calls[k]):
            f()
        times[k].append((time.perf_counter() - start) / calls[k] * 1e6)
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""


def _run(tree):
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, tree], capture_output=True, text=True, check=True, env=dict(os.environ)
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def overhead(before, rounds):
    trees = {"before": os.path.abspath(before), "after": ROOT}
    results = {name: [] for name in trees}
    for r in range(rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            results[name].append(_run(trees[name]))
    print(f"Per call, forward + backward, one thread; median of {rounds} alternating process rounds.\n")
    print("| case | before us | after us | after - before us | after / before |")
    print("|---|---:|---:|---:|---:|")
    medians = {}
    for case in results["after"][0]:
        b = statistics.median(r[case] for r in results["before"])
        a = statistics.median(r[case] for r in results["after"])
        medians[case] = (b, a)
        print(f"| {case} | {b:.1f} | {a:.1f} | {a - b:+.1f} | {a / b:.3f} |")
    return medians


def against_stock(rounds):
    import torch

    from fused_mlp.nn import LinearBNReLU

    torch.manual_seed(0)
    x = torch.randn(4096, 10, requires_grad=True)
    t = torch.randint(0, 10, (4096,))
    v = torch.randn(4096, 10)

    def hvp(loss_fn):
        def run():
            (g,) = torch.autograd.grad(loss_fn(x, t), x, create_graph=True)
            torch.autograd.grad(g, x, v)

        return run

    stock = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.BatchNorm1d(512), torch.nn.ReLU())
    layer = LinearBNReLU.from_modules(stock[0], stock[1])
    xin = torch.randn(256, 784, requires_grad=True)

    def penalty(model):
        def run():
            (gx,) = torch.autograd.grad(model(xin).pow(2).sum(), xin, create_graph=True)
            torch.autograd.grad(gx.pow(2).sum(), list(stock.parameters()))

        return run

    import fused_mlp

    xs, ts = torch.randn(256, 10), torch.randint(0, 10, (256,))

    def per_sample(loss_fn):
        grads = torch.func.vmap(torch.func.grad(lambda x, t: loss_fn(x[None], t[None])))
        return lambda: grads(xs, ts)

    cases = {
        "hvp_cross_entropy": (hvp(fused_mlp.cross_entropy), hvp(torch.nn.functional.cross_entropy)),
        "gradient_penalty_layer": (penalty(layer), penalty(stock)),
        "per_sample_grads_cross_entropy": (
            per_sample(fused_mlp.cross_entropy),
            per_sample(torch.nn.functional.cross_entropy),
        ),
    }
    times = {k: ([], []) for k in cases}
    for _ in range(rounds):
        for k, fns in cases.items():
            for i, f in enumerate(fns):
                f()
                start = time.perf_counter()
                for _ in range(5):
                    f()
                times[k][i].append((time.perf_counter() - start) / 5 * 1e3)
    threads = torch.get_num_threads()
    print(f"Double backward and torch.func, {threads} threads; median of {rounds} interleaved rounds.\n")
    print("| case | fused ms | stock ms | fused / stock |")
    print("|---|---:|---:|---:|")
    medians = {}
    for k, (fused, stock_times) in times.items():
        f, s = statistics.median(fused), statistics.median(stock_times)
        medians[k] = (f, s)
        print(f"| {k} | {f:.2f} | {s:.2f} | {f / s:.2f} |")
    return medians


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="a built fused_mlp source tree to compare this one with")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    if args.before:
        return overhead(args.before, args.rounds)
    return against_stock(args.rounds)


if __name__ == "__main__":
    main()
