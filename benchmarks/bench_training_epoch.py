"""Whole training epochs of the class-notes MLP on Fashion-MNIST: fused vs baseline vs compile.

    python -m benchmarks.bench_training_epoch [--epochs 3]

Epochs of the implementations alternate (fused, baseline, compile, fused, ...), so a drifting
machine affects them alike; the median samples/s of each is reported. Needs the dataset
($FUSED_MLP_DATA or ./data).
"""

import argparse
import statistics

import torch

from benchmarks.harness import machine_description
from fused_mlp import data
from fused_mlp.models import MLP
from fused_mlp.train import make_optimizer, train_one_epoch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per implementation")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    splits = data.load_splits("fashion", seed=0)
    runs = {}
    for impl in ("fused", "baseline", "compile"):
        torch.manual_seed(0)
        model = MLP(impl="fused" if impl == "fused" else "baseline")
        forward = torch.compile(model) if impl == "compile" else model
        batches = data.Batches(splits.train_x, splits.train_y, args.batch_size, shuffle=True, seed=0)
        runs[impl] = (model, forward, batches, make_optimizer(model))
    speeds = {impl: [] for impl in runs}
    for epoch in range(args.epochs + 1):  # epoch 0 warms up (and compiles)
        for impl, (model, forward, batches, optimizer) in runs.items():
            _, speed = train_one_epoch(model, forward, batches, optimizer, "cpu")
            if epoch > 0:
                speeds[impl].append(speed)
    medians = {impl: statistics.median(s) for impl, s in speeds.items()}
    print(f"# Training epochs, Fashion-MNIST, batch {args.batch_size}, CPU\n\n{machine_description()}\n")
    print(f"| impl | samples/s (median of {args.epochs} epochs) | seconds per epoch | vs baseline |")
    print("|---|---:|---:|---:|")
    for impl, speed in medians.items():
        print(f"| {impl} | {speed:,.0f} | {len(splits.train_y) / speed:.2f} | {speed / medians['baseline']:.2f}x |")
    return medians


if __name__ == "__main__":
    main()
