"""Timing and memory measurement shared by the benchmarks.

The implementations being compared run interleaved, round by round, in one process, so a machine
whose speed drifts during the run affects them alike; the medians are what is reported.
"""

import argparse
import os
import platform
import statistics
import time

import torch


def wall_time(fn):
    """Seconds one call of fn takes, by the host clock."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cuda_event_time(fn):
    """Seconds the GPU spends on one call of fn, from CUDA events recorded around it on the current
    stream, after synchronizing so that no earlier work is counted."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def interleaved_medians(cases, rounds, warmup=2, timer=wall_time):
    """cases: {name: zero-argument callable}. Returns {name: median seconds per call}, each call
    timed by timer (wall_time, or cuda_event_time for GPU work)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(timer(fn))
    return {name: statistics.median(s) for name, s in samples.items()}


def saved_activation_bytes(fn, exclude=()):
    """Bytes of the tensors autograd saves for backward while `fn()` runs, each storage counted
    once, leaving out the storages of the tensors in `exclude` (inputs and parameters, which
    exist whether or not anything is saved)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def parse_args(argv, doc):
    """The benchmarks' shared command line: --quick (tiny shapes, one round) and --rounds."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 15)
    return args


def publish(report, name, quick):
    """Prints the report and, unless quick, writes it to benchmarks/results/<name>."""
    print(report)
    if quick:
        return
    results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, name), "w") as f:
        f.write(report)
