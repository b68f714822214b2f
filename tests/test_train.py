"""The Fashion-MNIST training loop and its command line, on the real data."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from fused_mlp import data, train
from fused_mlp.models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_fashion.py")


def run_script(*args, data_dir=None, timeout=600):
    env = dict(os.environ)
    if data_dir:
        env["FUSED_MLP_DATA"] = data_dir
    return subprocess.run(
        [sys.executable, SCRIPT, "--no-progress", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def splits(data_dir):
    return data.load_splits("fashion", data_dir, seed=0, download=False)


def test_splits(splits):
    assert len(splits.train_y) == 54_000 and len(splits.val_y) == 6_000 and len(splits.test_y) == 10_000
    assert splits.train_x.shape[1:] == (1, 28, 28)
    assert abs(splits.train_x.mean().item()) < 0.02 and abs(splits.train_x.std().item() - 1) < 0.02
    assert splits.classes[0] == "T-shirt/top"


def test_split_is_seeded(data_dir, splits):
    assert torch.equal(data.load_splits("fashion", data_dir, seed=0, download=False).val_y, splits.val_y)
    assert not torch.equal(data.load_splits("fashion", data_dir, seed=1, download=False).val_y, splits.val_y)


def test_dataloader_path_gives_the_same_batches_as_indexing(splits):
    loader = data.make_loader(splits.val_x, splits.val_y, 500)
    batches = data.Batches(splits.val_x, splits.val_y, 500)
    for (xa, ya), (xb, yb) in zip(loader, batches):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_missing_data_names_the_directory_and_files(tmp_path):
    with pytest.raises(data.DatasetUnavailable, match="train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        data.load_splits("fashion", str(tmp_path), download=False)


@pytest.mark.parametrize("impl", ["fused", "baseline"])
def test_smoke_one_epoch_on_a_subset(impl, data_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script("--epochs", "1", "--limit-train", "4000", "--impl", impl, "--out", str(out), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    # Measured here: 0.70 (fused) and 0.71 (baseline) after this epoch; chance is 0.10.
    assert metrics["test_accuracy"] > 0.55
    assert len(metrics["history"]) == 1 and metrics["args"]["impl"] == impl
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        state = torch.load(out / name, weights_only=True)
        MLP(impl=impl).load_state_dict(state["model"])
    for name in ("curves.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test accuracy" in result.stdout and str(out) in result.stdout


def test_side_notes_net_trains_fused_without_batch_norm(data_dir, tmp_path):
    """The side notes' 784-128-64-10 ReLU net on MNIST, through the whole-network fused op."""
    out = tmp_path / "run"
    args = ("--dataset", "mnist", "--hidden", "128,64", "--no-batch-norm", "--dropout", "0", "--impl", "fused")
    result = run_script(*args, "--epochs", "1", "--limit-train", "4000", "--out", str(out), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    # Measured here: 0.75 after this epoch; chance is 0.10.
    assert metrics["test_accuracy"] > 0.6, metrics["test_accuracy"]
    model = MLP(hidden=(128, 64), batch_norm=False, dropout=0.0, impl="fused")
    model.load_state_dict(torch.load(out / "checkpoint_last.pt", weights_only=True)["model"])
    assert model.out.weight.grad is None and not hasattr(model.hidden[0], "bn")


def test_same_seed_same_first_batch_loss(splits):
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = MLP()
        batches = data.Batches(splits.train_x, splits.train_y, 256, shuffle=True, seed=0)
        x, y = next(iter(batches))
        losses.append(model.loss(model(x), y).item())
    assert losses[0] == losses[1]


def small_splits(splits, n=3000):
    return data.Splits(
        splits.train_x[:n],
        splits.train_y[:n],
        splits.val_x[:1000],
        splits.val_y[:1000],
        splits.test_x[:1000],
        splits.test_y[:1000],
        splits.classes,
        splits.mean,
        splits.std,
    )


FIT_ARGS = dict(
    epochs=2, batch_size=128, lr=1e-3, optimizer="adam", momentum=0.9, schedule="cosine", seed=0, impl="fused"
)


def fit_fresh(splits, out_dir, resume=None, log=lambda *a: None):
    torch.manual_seed(0)
    model = MLP()
    os.makedirs(out_dir, exist_ok=True)
    metrics = train.fit(
        model, model, splits, dict(FIT_ARGS), str(out_dir), "cpu", resume=resume, log=log, progress_bar=False
    )
    return model, metrics


def test_resume_equals_an_uninterrupted_run(splits, tmp_path):
    small = small_splits(splits)
    straight, m_straight = fit_fresh(small, tmp_path / "straight")

    def interrupt_after_first_epoch(line):
        if line.startswith("epoch   1"):
            raise KeyboardInterrupt  # as Ctrl-C right after epoch 1 was saved

    with pytest.raises(KeyboardInterrupt):
        fit_fresh(small, tmp_path / "interrupted", log=interrupt_after_first_epoch)
    checkpoint = tmp_path / "interrupted" / "checkpoint_last.pt"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1

    resumed, m_resumed = fit_fresh(small, tmp_path / "interrupted", resume=str(checkpoint))
    assert [h["epoch"] for h in m_resumed["history"]] == [1, 2]
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert m_resumed["test_accuracy"] == m_straight["test_accuracy"]


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    train.write_json(str(path), {"epoch": 1})
    before = path.read_bytes()

    def crash(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train._atomic_write(str(path), crash)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]  # no temp file left


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["--impl", "jax"], "invalid choice: 'jax'"),
        (["--device", "cuda"], "no CUDA GPU is available"),
        (["--resume", "/nonexistent/checkpoint_last.pt"], "no such file"),
        (["--out", "/proc/fused_mlp_run"], "is not a writable directory"),
    ],
)
def test_bad_command_lines_exit_2(args, message, data_dir):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_script("--epochs", "1", *args, data_dir=data_dir)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_mismatched_resume_is_refused_and_nothing_overwritten(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_script("--epochs", "1", "--limit-train", "1000", "--out", str(out), data_dir=data_dir).returncode == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run_script(
        "--epochs", "1", "--hidden", "32,16", "--resume", str(out / "checkpoint_last.pt"), data_dir=data_dir
    )
    assert result.returncode == 2 and "does not match this model" in result.stderr
    again = run_script("--epochs", "1", "--out", str(out), data_dir=data_dir)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


class _Payload:
    """Unpickling this runs a shell command: the code a booby-trapped checkpoint carries."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_checkpoint_that_carries_code_is_refused_before_it_runs(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_script("--epochs", "2", "--limit-train", "1000", "--out", str(out), data_dir=data_dir).returncode == 0
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)  # what the project writes loads so
    marker = tmp_path / "payload-ran"
    state["args"]["note"] = _Payload(f"touch {marker}")
    trapped = tmp_path / "trapped.pt"
    torch.save(state, trapped)

    result = run_script("--epochs", "2", "--resume", str(trapped), "--out", str(out), data_dir=data_dir)
    assert result.returncode == 2, result.stderr
    assert "holds objects other than tensors and plain data" in result.stderr
    assert "posix.system" in result.stderr  # the refused global, named
    with pytest.raises(train.UnsafeCheckpointError, match="refused"):
        train.read_checkpoint(str(trapped))
    assert not marker.exists()

    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    result = run_script("--epochs", "2", "--resume", str(junk), "--out", str(out), data_dir=data_dir)
    assert result.returncode == 2 and "is not a checkpoint this program can read" in result.stderr

    torch.load(trapped, weights_only=False)  # the trap is armed: an unchecked load runs the payload
    assert marker.exists()


def test_a_redirected_log_gets_one_line_per_epoch_and_no_bar(data_dir, tmp_path):
    # As under CI or `> log 2>&1`: stdout and stderr both a pipe, and no --no-progress.
    result = subprocess.run(
        [sys.executable, SCRIPT, "--epochs", "2", "--limit-train", "2000", "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, FUSED_MLP_DATA=data_dir),
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout
    assert "\r" not in result.stdout
    assert "epoch 1/2" not in result.stdout and "img/s" not in result.stdout
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert [line.split()[1] for line in epoch_lines] == ["1", "2"]
    assert all("train loss" in line and "val acc" in line for line in epoch_lines)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_still_gets_the_bar(splits, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    torch.manual_seed(0)
    model = MLP()
    lines = []
    train.fit(model, model, small_splits(splits), dict(FIT_ARGS, epochs=1), str(tmp_path), "cpu", log=lines.append)
    assert "\r" in terminal.getvalue() and "epoch 1/1" in terminal.getvalue()
    assert len(lines) == 1 and lines[0].startswith("epoch   1")


class _Progress:
    """Records what the loop tells a progress bar."""

    def __init__(self):
        self.samples, self.postfixes = 0, []

    def update(self, n):
        self.samples += n

    def set_postfix(self, refresh=True, **values):
        self.postfixes.append((refresh, values))


def test_the_loop_reads_the_device_once_per_sync_interval(splits, monkeypatch):
    """120 steps: the running loss is read for the bar at steps 50 and 100 and once at the end,
    never per step; the epoch's loss is the mean of the steps' losses all the same."""
    reads = []
    item = torch.Tensor.item

    def counting_item(self):
        reads.append(1)
        return item(self)

    torch.manual_seed(0)
    model = MLP(hidden=(32,), dropout=0.0)
    batches = data.Batches(splits.train_x[: 120 * 16], splits.train_y[: 120 * 16], 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same model
    expected = sum(model.loss(model(x), y).item() * len(y) for x, y in batches) / (120 * 16)
    progress = _Progress()
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    loss, speed = train.train_one_epoch(model, model, batches, optimizer, "cpu", progress)
    assert len(reads) == 3
    assert progress.samples == 120 * 16 and speed > 0
    assert [refresh for refresh, _ in progress.postfixes] == [False, False]  # the bar redraws on its own clock
    assert loss == pytest.approx(expected, rel=1e-6)
    reads.clear()
    train.validate(model, model, batches, "cpu", return_predictions=True)
    assert len(reads) == 2  # the loss and the accuracy, once each


def test_the_bar_redraws_at_most_ten_times_a_second(splits, tmp_path, monkeypatch):
    bars = []
    import tqdm

    class Recording(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    torch.manual_seed(0)
    model = MLP()
    train.fit(model, model, small_splits(splits), dict(FIT_ARGS, epochs=1), str(tmp_path), "cpu", log=lambda *a: None)
    assert bars and all(kw["mininterval"] >= 0.1 for kw in bars)
