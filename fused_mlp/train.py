"""Training and validation as the class notes teach them, with checkpoints, metrics and plots."""

import json
import os
import tempfile
import time

import torch

__all__ = [
    "train_one_epoch",
    "validate",
    "fit",
    "save_checkpoint",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
]


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


def train_one_epoch(model, forward, batches, optimizer, device, progress=None, sync_every=SYNC_EVERY):
    """One pass over the training batches. `forward` is the model or its compiled twin.
    Returns (average loss, samples per second).

    The loss is summed on the device and read on the host once every `sync_every` steps (for the
    progress bar, when there is one) and once at the end, so the host never waits on the device at
    each step."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches, 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        logits = forward(x)
        loss = model.loss(logits, y)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        if progress is not None:
            progress.update(len(y))  # redrawn at most every PROGRESS_INTERVAL seconds
            if step % sync_every == 0:
                progress.set_postfix(
                    loss=f"{loss_sum.item() / seen:.4f}",
                    samples_per_s=f"{seen / (time.perf_counter() - start):.0f}",
                    refresh=False,
                )
    total_loss = loss_sum.item()
    return total_loss / max(seen, 1), seen / (time.perf_counter() - start)


@torch.no_grad()
def validate(model, forward, batches, device, return_predictions=False):
    """Average loss and accuracy (a fraction) over the batches, in eval mode; the sums stay on the
    device until the end."""
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
    result = (loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1))
    if return_predictions:
        return result + (torch.cat(predictions).cpu() if predictions else torch.empty(0, dtype=torch.long),)
    return result


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


def save_checkpoint(path, model, optimizer, scheduler, epoch, args, train_batches, history, best):
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "args": args,
        "history": history,
        "best": best,
        "rng": {
            "torch": torch.get_rng_state(),
            "shuffle": train_batches.generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    _atomic_write(path, lambda f: torch.save(state, f))


def write_json(path, data):
    _atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def load_checkpoint(path, model, optimizer, scheduler, train_batches):
    """Restores everything save_checkpoint saved; returns the checkpoint dict."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    train_batches.generator.set_state(state["rng"]["shuffle"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


# --- the run ------------------------------------------------------------------------------------


def fit(model, forward, splits, args, out_dir, device, resume=None, log=print, progress_bar=True):
    """Trains for args["epochs"] epochs, validating after each, and writes into out_dir:
    checkpoint_last.pt and checkpoint_best.pt (by validation accuracy), metrics.json, and the
    plots. log gets one line per epoch; with progress_bar, a bar on stderr follows the epoch
    while stderr is a terminal. Returns the metrics dict, with the final test accuracy and loss of
    the last epoch's model."""
    from .data import Batches

    train_batches = Batches(
        splits.train_x, splits.train_y, args["batch_size"], shuffle=True, seed=args["seed"], device=device
    )
    val_batches = Batches(splits.val_x, splits.val_y, 1024, device=device)
    test_batches = Batches(splits.test_x, splits.test_y, 1024, device=device)
    optimizer = make_optimizer(model, args["optimizer"], args["lr"], args.get("momentum", 0.9))
    scheduler = make_scheduler(optimizer, args["schedule"], args["epochs"])
    history, best, first_epoch = [], {"val_accuracy": -1.0, "epoch": 0}, 1
    if resume:
        state = load_checkpoint(resume, model, optimizer, scheduler, train_batches)
        history, best, first_epoch = state["history"], state["best"], state["epoch"] + 1
        log(f"resumed from {resume} after epoch {state['epoch']}")

    last_path = os.path.join(out_dir, "checkpoint_last.pt")
    best_path = os.path.join(out_dir, "checkpoint_best.pt")
    metrics = {"args": args, "history": history}
    for epoch in range(first_epoch, args["epochs"] + 1):
        bar = None
        if progress_bar:
            from tqdm import tqdm

            # disable=None: no bar when stderr, where it is drawn, is not a terminal. A redirected
            # or CI log then holds the epoch lines alone instead of every redrawn frame.
            bar = tqdm(
                total=train_batches.num_samples(),
                desc=f"epoch {epoch}/{args['epochs']}",
                unit="img",
                leave=False,
                dynamic_ncols=True,
                disable=None,
                mininterval=PROGRESS_INTERVAL,
            )
        start = time.perf_counter()
        train_loss, speed = train_one_epoch(model, forward, train_batches, optimizer, device, bar)
        if bar is not None:
            bar.close()
        val_loss, val_acc = validate(model, forward, val_batches, device)
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
        if val_acc > best["val_accuracy"]:
            best = {"val_accuracy": val_acc, "epoch": epoch}
            save_checkpoint(best_path, model, optimizer, scheduler, epoch, args, train_batches, history, best)
        save_checkpoint(last_path, model, optimizer, scheduler, epoch, args, train_batches, history, best)
        write_json(os.path.join(out_dir, "metrics.json"), metrics)
        log(
            f"epoch {epoch:3d}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
            f"val acc {val_acc * 100:.2f}%  {speed:,.0f} samples/s  {seconds:.1f} s"
        )

    test_loss, test_acc, predictions = validate(model, forward, test_batches, device, return_predictions=True)
    metrics.update(best=best, test_loss=test_loss, test_accuracy=test_acc)
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
