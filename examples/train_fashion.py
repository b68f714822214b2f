"""Train the class-notes MLP on Fashion-MNIST (or MNIST).

    python examples/train_fashion.py                      # the defaults: ~90% test accuracy
    python examples/train_fashion.py --impl baseline      # the stock nn.Module model
    python examples/train_fashion.py --lr 1e-2 --batch-size 64 --schedule none   # the class notes' setting
    python examples/train_fashion.py --dataset mnist --hidden 128,64 --no-batch-norm --dropout 0

The model is 784 -> 512 -> 256 -> 128 -> 64 -> 10 with BatchNorm, ReLU and Dropout(0.3) after each
hidden Linear, trained with Adam on the cross-entropy. Everything a run produces goes to its run
directory (--out): metrics.json, checkpoint_last.pt / checkpoint_best.pt, curves.png and
confusion.png. --resume RUN_DIR/checkpoint_last.pt continues an interrupted run.
"""

import argparse
import os
import sys
import time

import torch

from fused_mlp import data
from fused_mlp.models import MLP
from fused_mlp.train import fit

EXIT_USAGE = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
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
    return args


def fail(message):
    print(f"train_fashion.py: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def pick_device(choice):
    if choice == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def prepare_run_dir(args):
    """The run directory, created; never one that already holds a run unless resuming into it."""
    out = args.out or os.path.join("runs", f"{args.dataset}-{args.impl}-{time.strftime('%Y%m%d-%H%M%S')}")
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
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["args"]
        model.load_state_dict(state["model"])  # raises on a different architecture
    except Exception as err:
        fail(f"--resume {path} does not match this model ({str(err).splitlines()[0]})")
    for key in ("dataset", "hidden", "batch_norm", "epochs", "optimizer"):
        if saved.get(key) != run_args.get(key):
            fail(f"--resume {path} was written with {key}={saved.get(key)!r}, this run has {run_args.get(key)!r}")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model_impl = "fused" if args.impl == "fused" else "baseline"
    model = MLP(hidden=args.hidden, dropout=args.dropout, batch_norm=not args.no_batch_norm, impl=model_impl).to(device)
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
            "seed",
            "dataset",
            "dropout",
            "limit_train",
        )
    }
    run_args.update(hidden=list(args.hidden), batch_norm=not args.no_batch_norm, device=str(device))
    if args.resume:
        check_resume(args.resume, model, run_args)
    out = prepare_run_dir(args) if not args.resume or args.out else os.path.dirname(os.path.abspath(args.resume))

    try:
        splits = data.load_splits(args.dataset, args.data_dir, seed=args.seed)
    except data.DatasetUnavailable as err:
        fail(str(err))
    if args.limit_train:
        splits.train_x, splits.train_y = splits.train_x[: args.limit_train], splits.train_y[: args.limit_train]
    forward = torch.compile(model) if args.impl == "compile" else model

    print(
        f"{args.dataset}: {len(splits.train_y):,} train / {len(splits.val_y):,} validation / "
        f"{len(splits.test_y):,} test images; impl={args.impl}, device={device}, run directory {out}"
    )
    try:
        metrics = fit(
            model, forward, splits, run_args, out, device, resume=args.resume, progress_bar=not args.no_progress
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: the last completed epoch is saved; continue with "
            f"--resume {os.path.join(out, 'checkpoint_last.pt')}",
            file=sys.stderr,
        )
        return 130
    print(
        f"test accuracy {metrics['test_accuracy'] * 100:.2f}%  (test loss {metrics['test_loss']:.4f}, "
        f"best validation accuracy {metrics['best']['val_accuracy'] * 100:.2f}% at epoch "
        f"{metrics['best']['epoch']})"
    )
    print(f"run directory: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
