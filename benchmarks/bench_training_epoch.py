"""Whole training epochs of the class-notes MLP on Fashion-MNIST: TrainStep vs fused vs baseline vs compile.

    python -m benchmarks.bench_training_epoch [--epochs 3]

Epochs of the implementations alternate (trainstep, fused, baseline, compile, trainstep, ...), so a
drifting machine affects them alike; the median samples/s of each is reported. trainstep is the
fused model trained by fused_mlp.TrainStep (the whole step as one op, what examples/train_fashion.py
runs by default), fused the same model on the standard path. Needs the dataset ($FUSED_MLP_DATA or
./data).
"""

import argparse
import dataclasses
import statistics
import time

import torch

from benchmarks.harness import machine_description
from fused_mlp import TrainStep, data
from fused_mlp.models import MLP
from fused_mlp.train import make_optimizer, train_one_epoch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per implementation")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, help="train on the first LIMIT samples only (a quick run)")
    args = parser.parse_args(argv)
    splits = data.load_splits("fashion", seed=0)
    if args.limit:
        splits = dataclasses.replace(splits, train_x=splits.train_x[: args.limit], train_y=splits.train_y[: args.limit])
    runs, train_steps = {}, {}
    for impl in ("trainstep", "fused", "baseline", "compile"):
        torch.manual_seed(0)
        model = MLP(impl="baseline" if impl in ("baseline", "compile") else "fused")
        forward = torch.compile(model) if impl == "compile" else model
        batches = data.Batches(splits.train_x, splits.train_y, args.batch_size, shuffle=True, seed=0)
        runs[impl] = (model, forward, batches, make_optimizer(model))
        if impl == "trainstep":
            train_steps[impl] = TrainStep(model, runs[impl][3], strict=True)
    speeds = {impl: [] for impl in runs}
    for epoch in range(args.epochs + 1):  # epoch 0 warms up (and compiles)
        for impl, (model, forward, batches, optimizer) in runs.items():
            _, speed = train_one_epoch(model, forward, batches, optimizer, "cpu", train_step=train_steps.get(impl))
            if epoch > 0:
                speeds[impl].append(speed)
    medians = {impl: statistics.median(s) for impl, s in speeds.items()}
    print(f"# Training epochs, Fashion-MNIST, batch {args.batch_size}, CPU\n\n{machine_description()}\n")
    print(f"| impl | samples/s (median of {args.epochs} epochs) | seconds per epoch | vs baseline |")
    print("|---|---:|---:|---:|")
    for impl, speed in medians.items():
        print(f"| {impl} | {speed:,.0f} | {len(splits.train_y) / speed:.2f} | {speed / medians['baseline']:.2f}x |")
    steps = step_medians(runs, train_steps, rounds=15)
    print(
        f"\nThe bare step on one batch of {args.batch_size} (zero_grad, forward, loss, backward, optimizer "
        "step; for trainstep its one call), the same models, median of 15 alternating rounds: "
        + ", ".join(f"{impl} {ms:.2f} ms" for impl, ms in steps.items())
        + f"; baseline / trainstep {steps['baseline'] / steps['trainstep']:.2f}x, "
        f"baseline / fused {steps['baseline'] / steps['fused']:.2f}x."
    )
    overhead = loop_overhead(runs["fused"][2], 21)
    print(
        "\nThe loop's own cost: fused_mlp.train.train_one_epoch against the bare steps over the same "
        f"batches, on a nearly free model, median of 21 alternating epochs: {overhead:+.1f} us per step."
    )
    return medians


def step_medians(runs, train_steps, rounds):
    """Milliseconds per training step of each impl on one fixed batch, the impls alternating."""
    from benchmarks.harness import interleaved_medians

    def step_of(model, forward, batches, optimizer, train_step=None):
        x, y = next(iter(batches))
        if train_step is not None:
            return lambda: train_step(x, y)

        def step():
            optimizer.zero_grad(set_to_none=True)
            model.loss(forward(x), y).backward()
            optimizer.step()

        return step

    calls = {impl: step_of(*run, train_steps.get(impl)) for impl, run in runs.items()}
    return {impl: t * 1e3 for impl, t in interleaved_medians(calls, rounds=rounds, warmup=3).items()}


class _NearlyFree(torch.nn.Module):
    """A model and loss of almost no cost (one scalar parameter), so that what an epoch of it
    takes is the loop around the steps."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x

    def loss(self, logits, target):
        return self.w * 1.0


def loop_overhead(batches, rounds):
    """Per step, microseconds: train_one_epoch minus the bare steps (zero_grad, forward, loss,
    backward, optimizer step) over the same batches, both on a nearly free model, so the
    difference is not lost in the noise of real steps. Median of `rounds` alternating pairs."""
    model = _NearlyFree()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def bare():
        model.train()
        start = time.perf_counter()
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            model.loss(model(x), y).backward()
            optimizer.step()
        return time.perf_counter() - start

    def loop():
        start = time.perf_counter()
        train_one_epoch(model, model, batches, optimizer, "cpu")
        return time.perf_counter() - start

    steps = sum(1 for _ in batches)
    differences = []
    for r in range(rounds + 1):  # the first pair warms up
        first, second = (bare, loop) if r % 2 == 0 else (loop, bare)
        times = {first: first(), second: second()}
        if r:
            differences.append((times[loop] - times[bare]) / steps * 1e6)
    return statistics.median(differences)


if __name__ == "__main__":
    main()
