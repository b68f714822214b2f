"""The CPU kernels' own GEMMs against torch.mm, on every layer shape of the class-notes net.

    python -m benchmarks.bench_gemm [--quick]

For each Linear (784-512, 512-256, 256-128, 128-64, 64-10) at batch 64, 256 and 1024, the three
products of a training step: the forward x W^T + b, the weight gradient g^T x and the input
gradient g W. The owned GEMMs run through the network ops with no hidden layer (one Linear): the
forward through mlp_inference, whose call costs what torch.addmm's does (about 2.2 us each on a
4 x 4 x 4 product here), the backward through mlp_backward below autograd, as the package calls it
(its Python autograd kernel, for double backward, would add about 6 us), whose call still costs
about 3 us more than the three torch calls it is set against (7.0 against 3.7 us on a 4 x 4 x 4
product: its lists of arguments and results, and its checks), which the small layers' ratios
carry. torch.addmm and torch.mm take the same tensors; the calls alternate. GFLOP/s against the
machine's rate (torch.mm at 2048^3). Writes benchmarks/results/gemm_cpu.md.
"""

import argparse
import os
import time

import torch

from benchmarks.harness import interleaved_medians, machine_description
from benchmarks.peers import big_gemm_gflops

SHAPES = ((784, 512), (512, 256), (256, 128), (128, 64), (64, 10))
BATCHES = (64, 256, 1024)
NO_SEED = torch.zeros(2, dtype=torch.int64)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gemm_cpu.md")


def cases(batch, k, n):
    g = torch.Generator().manual_seed(batch + k + n)
    x, w, b = torch.randn(batch, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    dy = torch.randn(batch, n, generator=g)
    fused = torch.ops.fused_mlp

    def owned_forward():  # the output Linear of a net with no hidden layer: gemm_nt, the bias in its epilogue
        fused.mlp_inference(x, [w], [b])

    def owned_backward():  # g^T x and g W, called as the package calls it: below autograd
        with torch._C._AutoDispatchBelowAutograd():
            fused.mlp_backward(dy, x, [w], [b], [], [], [], [], [], [], False, False, 0.0, NO_SEED, True, [True])

    def aten_backward():  # the same two products, and the bias gradient the op also returns
        torch.mm(dy.t(), x)
        torch.mm(dy, w)
        dy.sum(0)

    return {
        "owned forward": owned_forward,
        "torch forward": lambda: torch.addmm(b, x, w.t()),
        "owned backward": owned_backward,
        "torch backward": aten_backward,
    }


def run(batches, reps, rounds):
    rows = []
    for batch in batches:
        for k, n in SHAPES:
            calls = cases(batch, k, n)

            def repeated(fn):
                def run_reps():
                    for _ in range(reps):
                        fn()

                return run_reps

            medians = interleaved_medians({name: repeated(fn) for name, fn in calls.items()}, rounds=rounds, warmup=2)
            flops = 2 * batch * k * n
            work = {name: flops if "forward" in name else 2 * flops for name in medians}
            gflops = {name: work[name] / (t / reps) / 1e9 for name, t in medians.items()}
            rows.append((batch, k, n, gflops))
    return rows


def report(rows, rate):
    lines = [
        "# The owned GEMMs against torch.mm, CPU",
        "",
        machine_description(),
        "",
        f"GFLOP/s; the machine's rate (torch.mm at 2048^3): {rate:.0f} GFLOP/s. Forward: x W^T + b "
        "(owned: through mlp_inference; torch.addmm); backward: g^T x and g W (owned: through mlp_backward "
        "below autograd, whose call costs about 3 us more than the torch calls; torch.mm twice, and the bias "
        "gradient's sum, "
        "which the op also returns). Reproduce: `python -m benchmarks.bench_gemm`.",
        "",
        "| batch | layer | owned forward | torch forward | ratio | owned backward | torch backward | ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, k, n, g in rows:
        lines.append(
            f"| {batch} | {k}-{n} | {g['owned forward']:.0f} | {g['torch forward']:.0f} "
            f"| {g['owned forward'] / g['torch forward']:.2f}x | {g['owned backward']:.0f} "
            f"| {g['torch backward']:.0f} | {g['owned backward'] / g['torch backward']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 64 only, few repetitions; nothing written")
    args = parser.parse_args(argv)
    import fused_mlp  # noqa: F401  (loads the ops)

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    rows = run((64,) if args.quick else BATCHES, 2 if args.quick else 20, 1 if args.quick else 7)
    text = report(rows, big_gemm_gflops(torch))
    print(text)
    if not args.quick:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as f:
            f.write(text)
    print(f"({time.perf_counter() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
