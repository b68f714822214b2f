"""What synchronized BatchNorm costs: 2 processes on gloo (CPU), one thread each.

    python -m benchmarks.bench_distributed [--steps 60] [--batch-size 256]

Starts two copies of itself (init_method=file://) and reports, from rank 0:
- per hidden layer of the class-notes MLP (widths 512, 256, 128, 64), the time of the forward's
  header exchange and statistics gather beyond the local statistics, and of the backward's
  all-reduce of the two per-feature sums: the cost of synchronization per layer per step;
- the training step of the class-notes MLP under DistributedDataParallel (Adam, dropout 0.3) three
  ways, alternating in blocks: local statistics on the one-op network path, local statistics on
  the per-layer path, and synchronized statistics (per-layer path plus collectives);
- the bytes each collective carries per step.
Both processes share this 2-core machine, so the timings include their competition for it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

WIDTHS = (512, 256, 128, 64)
IN_FEATURES, CLASSES = 784, 10


def _median_seconds(fn, reps, warmup=5):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def collectives(local_rows, reps):
    """Per width: (local statistics, synchronized statistics, backward all-reduce) in seconds."""
    from fused_mlp import distributed, ops

    group = dist.group.WORLD
    out = {}
    for width in WIDTHS:
        rows = torch.randn(local_rows, width)
        sums = (torch.randn(width), torch.randn(width))
        out[width] = {
            "local_stats": _median_seconds(lambda: ops.bn_batch_stats(rows, 1e-5), reps),
            "sync_stats": _median_seconds(lambda: distributed.synchronized_statistics(rows, 1e-5, group), reps),
            "all_reduce_sums": _median_seconds(lambda: distributed._all_reduce_sums(sums, group), reps),
        }
    return out


def training_steps(local_rows, steps, block=10):
    """Median seconds per DDP training step for each way of running the BatchNorm."""
    from torch.nn.parallel import DistributedDataParallel

    from fused_mlp.nn import FusedMLP, convert_sync_batchnorm
    from fused_mlp.train import make_optimizer

    def build(kind):
        torch.manual_seed(0)
        model = FusedMLP(IN_FEATURES, WIDTHS, CLASSES, dropout=0.3)
        if kind == "synchronized":
            model = convert_sync_batchnorm(model)
        elif kind == "per-layer local":
            # Layers that differ in eps cannot be one network op: the per-layer path, unsynchronized.
            model.hidden[-1].bn.eps = 2e-5
        return DistributedDataParallel(model), model

    x = torch.randn(local_rows, IN_FEATURES)
    y = torch.randint(0, CLASSES, (local_rows,))
    runs = {}
    for kind in ("one-op local", "per-layer local", "synchronized"):
        ddp, model = build(kind)
        runs[kind] = (ddp, make_optimizer(model))

    def step(ddp, optimizer):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()

    samples = {kind: [] for kind in runs}
    for _ in range(2):
        for run in runs.values():
            step(*run)
    for _ in range(max(1, steps // block)):
        for kind, run in runs.items():
            for _ in range(block):
                start = time.perf_counter()
                step(*run)
                samples[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(s) for kind, s in samples.items()}


def payload_bytes(world):
    """Bytes each rank puts into the collectives of one training step, by collective."""
    from fused_mlp.nn import FusedMLP

    per_layer = {
        width: {
            "header all_gather (int64 x 3)": 3 * 8,
            "statistics all_gather (float32 mean, M2)": 2 * width * 4,
            "backward all_reduce (float32 sum dy, sum dy*zhat)": 2 * width * 4,
        }
        for width in WIDTHS
    }
    params = sum(p.numel() for p in FusedMLP(IN_FEATURES, WIDTHS, CLASSES).parameters())
    return {"per_layer": per_layer, "ddp_gradients": params * 4, "world": world}


def worker(rank, world, init_file, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    local_rows = args.batch_size // world
    result = {
        "collectives": collectives(local_rows, args.reps),
        "steps": training_steps(local_rows, args.steps),
        "bytes": payload_bytes(world),
        "local_rows": local_rows,
    }
    if rank == 0:
        print(json.dumps(result))
    dist.barrier()  # no rank tears the group down while another still finishes its last collective
    dist.destroy_process_group()


def report(result, args):
    from benchmarks.harness import machine_description

    lines = [
        "# Synchronized BatchNorm on gloo: 2 processes, 1 thread each",
        "",
        f"{machine_description()}; global batch {args.batch_size} ({result['local_rows']} rows per process); "
        f"`python -m benchmarks.bench_distributed --steps {args.steps} --reps {args.reps}`.",
        "",
        "Per layer per step, medians (µs):",
        "",
        "| width | local statistics | synchronized statistics | forward sync cost | backward all-reduce | "
        "sync cost per layer per step |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for width, c in result["collectives"].items():
        forward = c["sync_stats"] - c["local_stats"]
        lines.append(
            f"| {width} | {c['local_stats'] * 1e6:.0f} | {c['sync_stats'] * 1e6:.0f} | {forward * 1e6:.0f} | "
            f"{c['all_reduce_sums'] * 1e6:.0f} | {(forward + c['all_reduce_sums']) * 1e6:.0f} |"
        )
    steps = result["steps"]
    base = steps["one-op local"]
    lines += ["", "DDP training step of the class-notes MLP (Adam, dropout 0.3), medians:", ""]
    lines += ["| BatchNorm | ms per step | vs one-op local |", "|---|---:|---:|"]
    for kind, seconds in steps.items():
        lines.append(f"| {kind} | {seconds * 1e3:.2f} | {seconds / base:.2f}x |")
    b = result["bytes"]
    per_step = sum(sum(layer.values()) for layer in b["per_layer"].values())
    lines += [
        "",
        f"Bytes each process contributes per step: {per_step:,} to the BatchNorm collectives "
        f"(per layer: 24 header, 8 x width statistics, 8 x width backward sums) and "
        f"{b['ddp_gradients']:,} to DDP's gradient all-reduce.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per way")
    parser.add_argument("--reps", type=int, default=200, help="timed calls per collective")
    parser.add_argument("--batch-size", type=int, default=256, help="the global batch")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "distributed_cpu.md"))
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--init-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    world = 2
    if args.worker is not None:
        return worker(args.worker, world, args.init_file, args)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        command = [sys.executable, "-m", "benchmarks.bench_distributed", *(argv or sys.argv[1:])]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [
            subprocess.Popen(
                [*command, "--worker", str(r), "--init-file", init_file], stdout=subprocess.PIPE, text=True, env=env
            )
            for r in range(world)
        ]
        outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("a worker failed")
    text = report(json.loads(outputs[0].strip().splitlines()[-1]), args)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
