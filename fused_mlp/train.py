"""Training and validation as the class notes teach them, with checkpoints, metrics and plots;
in one process, or in each process of a torchrun launch (DistributedDataParallel)."""

import hashlib
import json
import os
import pickle
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "World",
    "rank_seed",
    "train_one_epoch",
    "validate",
    "fit",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "UnsafeCheckpointError",
    "make_optimizer",
    "make_scheduler",
]


@dataclass(frozen=True)
class World:
    """Where this process stands in a torchrun launch: its rank, its local rank (which GPU of its
    machine it drives), the number of processes, and how many of them run on its machine.
    World() is a run in a single process."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @classmethod
    def from_env(cls, environ=None):
        """Read from what torchrun sets for each worker (RANK, LOCAL_RANK, WORLD_SIZE,
        LOCAL_WORLD_SIZE); a single process when WORLD_SIZE is unset or 1."""
        environ = os.environ if environ is None else environ
        size = int(environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        rank = int(environ["RANK"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
        return cls(rank, local_rank, size, int(environ.get("LOCAL_WORLD_SIZE", size)))

    @property
    def is_main(self):
        """Rank 0: the one process that prints and writes the run's files."""
        return self.rank == 0


SINGLE = World()


def rank_seed(seed, rank, epoch=0):
    """A seed for the default generator of `rank`, which dropout draws its masks' seeds from:
    different on every rank, so that the masks differ across the global batch, and unrelated to
    any plain --seed (seed + rank would give rank 1 of --seed 0 the masks of --seed 1). `epoch`
    tells apart the re-seeds of a run resumed on another number of processes."""
    digest = hashlib.blake2b(f"fused_mlp rank seed {seed} {rank} {epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _global_sums(world, device, *sums):
    """The sums (device tensors or numbers) added over every rank, as Python numbers. One process
    reads each tensor once; several reduce them in one float64 all-reduce (exact for the counts)."""
    if world.size == 1:
        return tuple(s.item() if isinstance(s, torch.Tensor) else s for s in sums)
    packed = torch.stack([torch.as_tensor(s, device=device).to(torch.float64) for s in sums])
    dist.all_reduce(packed)
    return tuple(packed.tolist())


def make_optimizer(model, name="adam", lr=1e-3, momentum=0.9):
    """Adam or SGD with momentum, each as its fused multi-tensor kernel where this torch has one
    for the parameters' device (else its default form): the same optimizer for every impl."""
    if name not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {name!r}: expected adam or sgd")

    def build(**fused):
        if name == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr, **fused)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, **fused)

    try:
        return build(fused=True)
    except (RuntimeError, TypeError):
        return build()


def make_scheduler(optimizer, name="cosine", epochs=30):
    """Cosine decay of the learning rate to 0 over the run (stepped once per epoch), or none."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "none":
        return None
    raise ValueError(f"unknown schedule {name!r}: expected cosine or none")


#: Training steps between reads of the running loss on the host. Each read waits for the device
#: to finish its queued work; the loss is summed on the device in between.
SYNC_EVERY = 50

#: Seconds between redraws of the progress bar, at most.
PROGRESS_INTERVAL = 0.1


def train_one_epoch(
    model, forward, batches, optimizer, device, progress=None, sync_every=SYNC_EVERY, world=SINGLE, train_step=None
):
    """One pass over the training batches. `forward` is the model, its compiled twin, or either
    wrapped in DistributedDataParallel; with `train_step` (a fused_mlp.TrainStep of the model and
    optimizer) each step is that one call instead of forward, loss, backward and optimizer.step().
    Returns (average loss, samples per second), over every rank's rows when `world` has several.

    The loss is summed on the device and read on the host once every `sync_every` steps (for the
    progress bar, when there is one) and once at the end, so the host never waits on the device at
    each step. The bar counts the images of every rank, and shows this rank's running loss."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches, 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if train_step is not None:
            loss = train_step(x, y)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(forward(x), y)
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        if progress is not None:
            progress.update(len(y) * world.size)  # redrawn at most every PROGRESS_INTERVAL seconds
            if step % sync_every == 0:
                progress.set_postfix(
                    loss=f"{loss_sum.item() / seen:.4f}",
                    samples_per_s=f"{seen * world.size / (time.perf_counter() - start):.0f}",
                    refresh=False,
                )
    total_loss, seen = _global_sums(world, device, loss_sum, seen)
    return total_loss / max(seen, 1), seen / (time.perf_counter() - start)


@torch.no_grad()
def validate(model, forward, batches, device, return_predictions=False, world=SINGLE):
    """Average loss and accuracy (a fraction) over the batches, in eval mode; the sums stay on the
    device until the end. With several ranks, each evaluates its piece of the set and the figures
    are those of the whole set; the predictions are every rank's, in the set's order."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    predictions = []
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = forward(x)
        loss_sum += model.loss(logits, y) * len(y)
        pred = logits.argmax(dim=1)
        correct += (pred == y).sum()
        seen += len(y)
        if return_predictions:
            predictions.append(pred)
    loss_sum, correct, seen = _global_sums(world, device, loss_sum, correct, seen)
    result = (loss_sum / max(seen, 1), correct / max(seen, 1))
    if return_predictions:
        mine = torch.cat(predictions).cpu() if predictions else torch.empty(0, dtype=torch.long)
        return result + (_gathered(mine, world),)
    return result


def _gathered(tensor, world):
    """Every rank's tensor, concatenated in rank order (a collective: every rank calls it)."""
    if world.size == 1:
        return tensor
    pieces = [None] * world.size
    dist.all_gather_object(pieces, tensor)
    return torch.cat(pieces)


def _broadcast_buffers(model):
    """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP does the same at each
    training step's forward, so this is what rank 0 saves; without it, each rank would evaluate its
    piece with the statistics of its own last batch, and the figures would be of no one model."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


# --- checkpoints --------------------------------------------------------------------------------


def _atomic_write(path, write):
    """Writes through a temporary file in the same directory, fsyncs it, then renames it over
    `path`: a crash or Ctrl-C at any moment leaves either the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state():
    """This process's generators that training draws from: torch's CPU one and the CUDA ones
    (dropout takes its seeds from the default generator of its device)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def gather_rng_states(world):
    """Every rank's rng_state(), in rank order (a collective: every rank calls it)."""
    if world.size == 1:
        return [rng_state()]
    states = [None] * world.size
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(path, model, optimizer, scheduler, epoch, args, train_batches, history, best, rng_states=None):
    """Writes the checkpoint atomically. rng_states is gather_rng_states()'s list when the run has
    several ranks (rank 0 writes it for all); the data order's generator is the same on every rank
    and saved once."""
    rng_states = rng_states or [rng_state()]
    rng = dict(rng_states[0], shuffle=train_batches.generator.get_state())
    if len(rng_states) > 1:
        rng["ranks"] = rng_states
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "args": args,
        "history": history,
        "best": best,
        "world_size": len(rng_states),
        "rng": rng,
    }
    _atomic_write(path, lambda f: torch.save(state, f))


def write_json(path, data):
    _atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds something other than tensors and plain data: loading it would run code."""


def read_checkpoint(path):
    """The checkpoint dict at path, read with torch.load(weights_only=True): tensors, numbers,
    strings and containers of them, which is all that save_checkpoint writes. A file that names any
    other object (which unpickling would construct by running code the file names) is refused with
    UnsafeCheckpointError before anything in it runs; a file that is no checkpoint at all raises
    ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        code = next((line for line in lines if any(mark in line for mark in _CODE_MARKS)), None)
        if code is not None:
            raise UnsafeCheckpointError(
                f"{path} holds objects other than tensors and plain data, which loading would construct by "
                f"running code the file names; refused ({code})"
            ) from None
        after = [b for a, b in zip(lines, lines[1:]) if "WeightsUnpickler error" in a]
        raise ValueError(f"{path} is not a checkpoint: {(after or lines or ['unreadable'])[0]}") from None


#: What torch's weights-only unpickler says of a file that names a callable or class it does not
#: allow: the file carries code.
_CODE_MARKS = ("GLOBAL", "allowlisted", "reduce")


def load_checkpoint(path, model, optimizer, scheduler, train_batches, world=SINGLE):
    """Restores everything save_checkpoint saved; returns the checkpoint dict.

    Each rank takes back its own generators when the checkpoint was written by as many ranks as
    this run has, and the run continues exactly. With another number, the data order still
    continues, but each rank's share of it is new, and each rank's generator is re-seeded with
    rank_seed(seed, rank, epoch): the run continues from the epoch boundary, not as it would have."""
    state = read_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    train_batches.generator.set_state(state["rng"]["shuffle"])
    ranks = state["rng"].get("ranks") or [state["rng"]]
    if len(ranks) == world.size:
        torch.set_rng_state(ranks[world.rank]["torch"])
        if ranks[world.rank]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ranks[world.rank]["cuda"])
    else:
        torch.manual_seed(rank_seed(state["args"]["seed"], world.rank, state["epoch"]))
    return state


def uses_train_step(args, model, forward, world=SINGLE):
    """Whether fit trains with fused_mlp.TrainStep: asked for (args["step"] == "trainstep", the
    default), in one process (several need DistributedDataParallel's all-reduce, which the standard
    path has), on the fused model itself (not a compiled twin or the stock model)."""
    return (
        args.get("step", "trainstep") == "trainstep"
        and world.size == 1
        and forward is model
        and getattr(model, "impl", None) == "fused"
    )


def _data_parallel(module, device):
    """The module under DistributedDataParallel: gradients averaged over the ranks in backward,
    rank 0's parameters and buffers broadcast at construction and its buffers at each forward."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


# --- the run ------------------------------------------------------------------------------------


def fit(model, forward, splits, args, out_dir, device, resume=None, log=print, progress_bar=True, world=SINGLE):
    """Trains for args["epochs"] epochs, validating after each, and writes into out_dir:
    checkpoint_last.pt and checkpoint_best.pt (by validation accuracy), metrics.json, and the
    plots. log gets one line per epoch; with progress_bar, a bar on stderr follows the epoch
    while stderr is a terminal. Returns the metrics dict, with the final test accuracy and loss of
    the last epoch's model.

    In a torchrun launch (`world` of several ranks, the process group joined), every rank calls
    fit: args["batch_size"] is the global batch, each rank trains on its share of each epoch
    through DistributedDataParallel, and the figures are over every rank's rows. Rank 0 alone
    logs, draws the bar and writes the files; the others return the same metrics."""
    from .data import Batches

    if args["batch_size"] % world.size:
        raise ValueError(f"fit: batch_size {args['batch_size']} does not divide among {world.size} ranks")
    if not world.is_main:
        log, progress_bar = (lambda *a: None), False
    shard = dict(device=device, rank=world.rank, world_size=world.size)
    per_rank = args["batch_size"] // world.size
    train_batches = Batches(splits.train_x, splits.train_y, per_rank, shuffle=True, seed=args["seed"], **shard)
    val_batches = Batches(splits.val_x, splits.val_y, 1024, **shard)
    test_batches = Batches(splits.test_x, splits.test_y, 1024, **shard)
    # Training steps go through DDP; evaluation calls `forward` itself, which has no collective in
    # it, so the ranks' pieces of the set need not have the same number of batches.
    train_forward = _data_parallel(forward, device) if world.size > 1 else forward
    optimizer = make_optimizer(model, args["optimizer"], args["lr"], args.get("momentum", 0.9))
    scheduler = make_scheduler(optimizer, args["schedule"], args["epochs"])
    train_step = None
    if uses_train_step(args, model, forward, world):
        from .step import TrainStep

        train_step = TrainStep(model, optimizer)
    history, best, first_epoch = [], {"val_accuracy": -1.0, "epoch": 0}, 1
    if resume:
        state = load_checkpoint(resume, model, optimizer, scheduler, train_batches, world)
        history, best, first_epoch = state["history"], state["best"], state["epoch"] + 1
        log(f"resumed from {resume} after epoch {state['epoch']}")
        saved_world = state.get("world_size", 1)
        if saved_world != world.size:
            log(
                f"warning: {resume} was written by {saved_world} process(es), this run has {world.size}: "
                f"training continues from the end of epoch {state['epoch']}, but with other data shards "
                "and dropout masks than the original run would have drawn"
            )
    elif world.size > 1:
        torch.manual_seed(rank_seed(args["seed"], world.rank))

    last_path = os.path.join(out_dir, "checkpoint_last.pt")
    best_path = os.path.join(out_dir, "checkpoint_best.pt")
    metrics = {"args": args, "history": history}
    batch_note = f"  global batch {args['batch_size']} on {world.size} processes" if world.size > 1 else ""
    for epoch in range(first_epoch, args["epochs"] + 1):
        bar = None
        if progress_bar:
            from tqdm import tqdm

            # disable=None: no bar when stderr, where it is drawn, is not a terminal. A redirected
            # or CI log then holds the epoch lines alone instead of every redrawn frame.
            bar = tqdm(
                total=train_batches.num_samples() * world.size,
                desc=f"epoch {epoch}/{args['epochs']}",
                unit="img",
                leave=False,
                dynamic_ncols=True,
                disable=None,
                mininterval=PROGRESS_INTERVAL,
            )
        start = time.perf_counter()
        train_loss, speed = train_one_epoch(
            model, train_forward, train_batches, optimizer, device, bar, world=world, train_step=train_step
        )
        if bar is not None:
            bar.close()
        if world.size > 1:
            _broadcast_buffers(model)
        val_loss, val_acc = validate(model, forward, val_batches, device, world=world)
        if scheduler is not None:
            scheduler.step()
        seconds = time.perf_counter() - start
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "samples_per_s": speed,
                "seconds": seconds,
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        rng_states = gather_rng_states(world)
        checkpoint = (model, optimizer, scheduler, epoch, args, train_batches, history)
        if val_acc > best["val_accuracy"]:
            best = {"val_accuracy": val_acc, "epoch": epoch}
            if world.is_main:
                save_checkpoint(best_path, *checkpoint, best, rng_states)
        if world.is_main:
            save_checkpoint(last_path, *checkpoint, best, rng_states)
            write_json(os.path.join(out_dir, "metrics.json"), metrics)
        log(
            f"epoch {epoch:3d}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
            f"val acc {val_acc * 100:.2f}%  {speed:,.0f} samples/s  {seconds:.1f} s{batch_note}"
        )

    test_loss, test_acc, predictions = validate(
        model, forward, test_batches, device, return_predictions=True, world=world
    )
    metrics.update(best=best, test_loss=test_loss, test_accuracy=test_acc)
    if world.is_main:
        write_json(os.path.join(out_dir, "metrics.json"), metrics)
        plot_curves(history, os.path.join(out_dir, "curves.png"))
        plot_confusion(splits.test_y, predictions, splits.classes, os.path.join(out_dir, "confusion.png"))
    return metrics


# --- plots --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history, path):
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val_accuracy"] * 100 for h in history], color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(targets, predictions, classes, path):
    plt = _pyplot()
    n = len(classes)
    matrix = torch.zeros(n, n, dtype=torch.long)
    matrix.index_put_((targets.long(), predictions.long()), torch.ones_like(targets, dtype=torch.long), accumulate=True)
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xlabel="predicted",
        ylabel="true",
        title=f"Test confusion matrix (accuracy {matrix.diag().sum().item() / max(matrix.sum().item(), 1) * 100:.2f}%)",
    )
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    threshold = matrix.max().item() / 2 if matrix.numel() else 0
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                int(matrix[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if matrix[i, j] > threshold else "black",
            )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return matrix
