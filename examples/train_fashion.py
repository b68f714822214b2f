"""Train the class-notes MLP on Fashion-MNIST (or MNIST).

    python examples/train_fashion.py                      # the defaults: ~90% test accuracy
    python examples/train_fashion.py --impl baseline      # the stock nn.Module model
    python examples/train_fashion.py --lr 1e-2 --batch-size 64 --schedule none   # the class notes' setting
    python examples/train_fashion.py --dataset mnist --hidden 128,64 --no-batch-norm --dropout 0

The model is 784 -> 512 -> 256 -> 128 -> 64 -> 10 with BatchNorm, ReLU and Dropout(0.3) after each
hidden Linear, trained with Adam on the cross-entropy, each step one op (fused_mlp.TrainStep;
--step standard for model(x), loss.backward(), optimizer.step()). Everything a run produces goes to its run
directory (--out): metrics.json, checkpoint_last.pt / checkpoint_best.pt, curves.png and
confusion.png. --resume RUN_DIR/checkpoint_last.pt continues an interrupted run (Ctrl-C or SIGTERM).

Under torchrun, each of its N processes trains on its share of every global batch (--batch-size)
with DistributedDataParallel, over gloo on the CPU or NCCL on GPUs; rank 0 prints and writes the
run directory:

    torchrun --standalone --nproc_per_node=2 examples/train_fashion.py --sync-bn
"""

import argparse
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import fused_mlp.nn
from fused_mlp import data
from fused_mlp.models import MLP
from fused_mlp.train import UnsafeCheckpointError, World, fit, read_checkpoint, uses_train_step

EXIT_USAGE = 2
DEFAULT_DIST_TIMEOUT = 120.0


class UsageError(Exception):
    """Bad input: the run stops with exit status 2 and this message, on every rank."""

    def __init__(self, message, usage=""):
        super().__init__(message)
        self.usage = usage


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C raises KeyboardInterrupt so that both leave the same way: the last
    completed epoch's checkpoint stays, and the exit status says the run did not finish. torchrun
    stops its workers with SIGTERM (on Ctrl-C, or when one of them fails), as do `kill` and
    batch schedulers."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # Not argparse's print-and-exit: under torchrun the ranks first make sure all have said it.
        raise UsageError(message, usage=self.format_usage())


def parse_args(argv=None):
    parser = _Parser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="the global batch: rows per optimizer step over all processes (under torchrun, each of "
        "N processes takes batch-size / N of them)",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--momentum", type=float, default=0.9, help="for --optimizer sgd")
    parser.add_argument(
        "--schedule",
        choices=["cosine", "none"],
        default="cosine",
        help="cosine: decay the learning rate to 0 over --epochs",
    )
    parser.add_argument(
        "--impl",
        choices=["fused", "baseline", "compile"],
        default="fused",
        help="compile: the baseline model under torch.compile",
    )
    parser.add_argument(
        "--step",
        choices=["trainstep", "standard"],
        default="trainstep",
        help="trainstep: each training step as one op (fused_mlp.TrainStep: forward, loss, backward and the "
        "optimizer's update); standard: model(x), loss.backward(), optimizer.step(). The standard path runs "
        "anyway for --impl baseline or compile, and under torchrun",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir", default=None, help="where the dataset is (or is downloaded to); default $FUSED_MLP_DATA or ./data"
    )
    parser.add_argument("--dataset", choices=sorted(data.DATASETS), default="fashion")
    parser.add_argument("--hidden", default="512,256,128,64", help="hidden layer widths")
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--no-batch-norm", action="store_true")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<dataset>-<impl>-<time>)")
    parser.add_argument("--resume", default=None, help="a checkpoint_last.pt to continue from")
    parser.add_argument(
        "--limit-train", type=int, default=None, help="train on the first N training images only (smoke runs)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (off anyway when stderr is not a terminal)"
    )
    parser.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun: BatchNorm statistics over the global batch rather than each process's share",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_DIST_TIMEOUT,
        help="under torchrun: seconds a process waits for the others at any collective before the run fails",
    )
    args = parser.parse_args(argv)
    try:
        args.hidden = tuple(int(w) for w in args.hidden.split(",") if w.strip())
    except ValueError:
        parser.error(f"--hidden must be comma-separated integers, got {args.hidden!r}")
    if not args.hidden or min(args.hidden) < 1:
        parser.error("--hidden needs at least one positive width")
    if args.epochs < 1 or args.batch_size < 2 or args.lr <= 0:
        parser.error("--epochs must be >= 1, --batch-size >= 2 and --lr > 0")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.dist_timeout <= 0:
        parser.error(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    return args


def fail(message):
    raise UsageError(message)


def check_world(args, world):
    """What a launch of several processes asks of the arguments: the same answer on every rank."""
    if args.batch_size % world.size or args.batch_size // world.size < 2:
        fail(
            f"--batch-size {args.batch_size} is the global batch: it must split evenly into at least "
            f"2 rows for each of the {world.size} processes (use a multiple of {world.size})"
        )


def pick_device(choice, world):
    if choice == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu" or world.size == 1:
        return torch.device(choice)
    # Checked against the machine's process count, not this process's local rank, so that every
    # process of the machine gives the same answer before they join.
    if world.local_size > torch.cuda.device_count():
        fail(
            f"torchrun started {world.local_size} processes on this machine, which has "
            f"{torch.cuda.device_count()} GPU(s): one process per GPU (--nproc_per_node), or --device cpu"
        )
    return torch.device("cuda", world.local_rank)


def prepare_run_dir(args, world):
    """The run directory, created by rank 0; never one that already holds a run unless resuming into
    it. The other ranks write nothing."""
    out = args.out or os.path.join("runs", f"{args.dataset}-{args.impl}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not world.is_main:
        return out
    if args.resume is None and os.path.exists(os.path.join(out, "metrics.json")):
        fail(f"--out {out} already holds a run; choose another directory or --resume {out}/checkpoint_last.pt")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as err:
        fail(f"--out {out} is not a writable directory ({err.strerror})")
    return out


def check_resume(path, model, run_args):
    """Refuses a resume file that does not exist or was written for another model or run."""
    if not os.path.isfile(path):
        fail(f"--resume {path}: no such file")
    try:
        state = read_checkpoint(path)
    except UnsafeCheckpointError as err:
        fail(f"--resume {err}")
    except Exception as err:
        fail(f"--resume {path} is not a checkpoint this program can read ({str(err).splitlines()[0]})")
    try:
        saved = state["args"]
        model.load_state_dict(state["model"])  # raises on a different architecture
    except Exception as err:
        fail(f"--resume {path} does not match this model ({str(err).splitlines()[0]})")
    for key in ("dataset", "hidden", "batch_norm", "epochs", "optimizer"):
        if saved.get(key) != run_args.get(key):
            fail(f"--resume {path} was written with {key}={saved.get(key)!r}, this run has {run_args.get(key)!r}")


def join_process_group(world, device, timeout):
    """Under torchrun, joins the other processes: gloo on the CPU, NCCL on the GPUs (this process's
    own, cuda:LOCAL_RANK). Every collective then waits at most `timeout` seconds for the others and
    raises, so a process that died ends the run rather than hanging it."""
    if world.size == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))


def first_error(error, world):
    """The first rank's UsageError, if any rank has one, on every rank: a file one rank could not
    read must stop the others too, instead of leaving them at the next collective."""
    if world.size == 1:
        return error
    errors = [None] * world.size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def report_usage_error(error, world):
    if error.usage:
        print(error.usage, end="", file=sys.stderr)
    print(f"train_fashion.py: error: {error}", file=sys.stderr, flush=True)
    if world.size > 1:
        # torchrun stops the other workers (SIGTERM) as soon as one exits with an error: the ranks
        # wait until all have printed theirs, then leave with this status whatever comes.
        dist.barrier()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return EXIT_USAGE


def build_model(args, device, world):
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model_impl = "fused" if args.impl == "fused" else "baseline"
    model = MLP(hidden=args.hidden, dropout=args.dropout, batch_norm=not args.no_batch_norm, impl=model_impl)
    if args.sync_bn and world.size > 1:  # one process has the whole batch: its statistics are global
        model = fused_mlp.nn.convert_sync_batchnorm(model)
    return model.to(device)


def run_arguments(args, device, world):
    """What metrics.json and the checkpoints record of the command line."""
    run_args = {
        k: getattr(args, k)
        for k in (
            "epochs",
            "batch_size",
            "lr",
            "optimizer",
            "momentum",
            "schedule",
            "impl",
            "step",
            "seed",
            "dataset",
            "dropout",
            "limit_train",
        )
    }
    run_args.update(hidden=list(args.hidden), batch_norm=not args.no_batch_norm, device=str(device))
    if world.size > 1 or args.sync_bn:
        run_args.update(world_size=world.size, sync_bn=args.sync_bn)
    return run_args


def prepare(args, device, world):
    """The model, the recorded arguments, the run directory and the data, or a UsageError."""
    check_world(args, world)
    model = build_model(args, device, world)
    run_args = run_arguments(args, device, world)
    if args.resume:
        check_resume(args.resume, model, run_args)
    out = prepare_run_dir(args, world) if not args.resume or args.out else os.path.dirname(os.path.abspath(args.resume))
    try:
        splits = data.load_splits(args.dataset, args.data_dir, seed=args.seed)
    except data.DatasetUnavailable as err:
        fail(str(err))
    if args.limit_train:
        splits.train_x, splits.train_y = splits.train_x[: args.limit_train], splits.train_y[: args.limit_train]
    return model, run_args, out, splits


def train(args, device, world, model, run_args, out, splits):
    say = print if world.is_main else (lambda *a, **k: None)
    forward = torch.compile(model) if args.impl == "compile" else model
    processes = ""
    if world.size > 1:
        per_rank = args.batch_size // world.size
        processes = f", {world.size} processes, global batch {args.batch_size} ({per_rank} per process)"
    step = "trainstep" if uses_train_step(run_args, model, forward, world) else "standard"
    say(
        f"{args.dataset}: {len(splits.train_y):,} train / {len(splits.val_y):,} validation / "
        f"{len(splits.test_y):,} test images; impl={args.impl}, step={step}, device={device}{processes}, "
        f"run directory {out}",
        flush=True,
    )
    try:
        metrics = fit(
            model,
            forward,
            splits,
            run_args,
            out,
            device,
            resume=args.resume,
            log=lambda line: say(line, flush=True),
            progress_bar=not args.no_progress,
            world=world,
        )
    except KeyboardInterrupt:
        say(
            f"\ninterrupted: the last completed epoch is saved; continue with "
            f"--resume {os.path.join(out, 'checkpoint_last.pt')}",
            file=sys.stderr,
            flush=True,
        )
        raise
    say(
        f"test accuracy {metrics['test_accuracy'] * 100:.2f}%  (test loss {metrics['test_loss']:.4f}, "
        f"best validation accuracy {metrics['best']['val_accuracy'] * 100:.2f}% at epoch "
        f"{metrics['best']['epoch']})"
    )
    say(f"run directory: {out}")
    return 0


def run(argv, world):
    try:
        args = parse_args(argv)
        device = pick_device(args.device, world)
    except UsageError as error:
        # The same error on every rank; they still meet, for each to print it before any exits.
        join_process_group(world, torch.device("cpu"), DEFAULT_DIST_TIMEOUT)
        return report_usage_error(error, world)
    join_process_group(world, device, args.dist_timeout)
    try:
        setup, error = prepare(args, device, world), None
    except UsageError as err:
        setup, error = None, err
    error = first_error(error, world)
    if error is not None:
        return report_usage_error(error, world)
    return train(args, device, world, *setup)


def main(argv=None):
    world = World.from_env()
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run(argv, world)
    except KeyboardInterrupt as stop:
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
