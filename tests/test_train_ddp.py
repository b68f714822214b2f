"""examples/train_fashion.py in several processes: torchrun, 2 workers on the CPU over gloo, on the
real data. Each launch costs a few seconds of start-up, so the runs are shared where they can be."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from test_train import ROOT, SCRIPT, run_script

from fused_mlp import data
from fused_mlp.models import MLP

EPOCHS = 3
#: The run most tests share: small enough for CI, with two epochs after the first one to interrupt.
COMMON = ("--epochs", str(EPOCHS), "--limit-train", "4000")


def environment(data_dir):
    # One thread per worker: two workers on two cores, as torchrun itself would set it.
    return dict(os.environ, FUSED_MLP_DATA=data_dir, OMP_NUM_THREADS="1")


def torchrun_command(*args, log_dir, tee=False):
    """torchrun's own files go to log_dir, rather than to a directory of its own in /tmp that it leaves there."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command.append(f"--log-dir={log_dir}")
    if tee:
        command.append("--tee=3")  # every worker's lines, each prefixed with its rank: "[default1]:..."
    return command + [SCRIPT, "--no-progress", *args]


def torchrun(*args, data_dir, log_dir, tee=True, timeout=300):
    return subprocess.run(
        torchrun_command(*args, log_dir=log_dir, tee=tee),
        capture_output=True,
        text=True,
        env=environment(data_dir),
        cwd=ROOT,
        timeout=timeout,
    )


def rank_lines(text, rank):
    """The lines of worker `rank` in a `torchrun --tee` log, without their prefix."""
    prefix = re.compile(rf"^\[[A-Za-z_]+{rank}\]:")
    return [prefix.sub("", line) for line in text.splitlines() if prefix.match(line)]


def epoch_lines(lines):
    return [line for line in lines if line.startswith("epoch ")]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def interrupt_after_first_epoch(command, data_dir):
    """Runs `command`, and stops it as soon as its first epoch line is out (its checkpoint saved):
    SIGTERM, as torchrun sends its workers and `kill` sends by default. Returns the finished process
    and its stderr. The run has EPOCHS - 1 more epochs to go when the signal leaves: the signal lands
    during one of them unless this process lags that far behind."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(data_dir), cwd=ROOT
    )
    try:
        for line in process.stdout:
            if line.startswith("epoch   1"):
                process.send_signal(signal.SIGTERM)
                break
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process, stderr


# --- the data each rank sees ----------------------------------------------------------------------


def test_each_rank_takes_its_share_of_the_shared_order():
    x, y = torch.arange(1000.0).unsqueeze(1), torch.arange(1000)
    whole = list(data.Batches(x, y, 64, shuffle=True, seed=3))
    shares = [data.Batches(x, y, 32, shuffle=True, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    steps = list(zip(*shares))
    assert len(steps) == len(whole) == len(shares[0]) == len(shares[1])
    for ((_, y0), (_, y1)), (_, y_whole) in zip(steps, whole):  # step k together: the k-th whole batch
        assert torch.equal(torch.cat([y0, y1]).sort().values, y_whole.sort().values)

    # An odd count: as many steps on both ranks, the permutation's last row sitting this epoch out.
    odd = [data.Batches(x[:999], y[:999], 32, shuffle=True, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    seen = [torch.cat([b for _, b in share]) for share in odd]
    assert [len(list(share)) for share in odd] == [16, 16] and [len(s) for s in seen] == [499, 499]
    assert [share.num_samples() for share in odd] == [499, 499]
    assert len(set(torch.cat(seen).tolist())) == 998

    # Evaluation: contiguous pieces, which put end to end in rank order are the set.
    pieces = [data.Batches(x[:999], y[:999], 100, rank=rank, world_size=2) for rank in (0, 1)]
    assert torch.equal(torch.cat([b for piece in pieces for _, b in piece]), y[:999])


# --- one run, start to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "straight"
    result = torchrun(*COMMON, "--out", str(out), data_dir=data_dir, log_dir=out.parent)
    assert result.returncode == 0, result.stderr
    return out, result


def test_two_processes_train_and_rank_0_alone_reports_and_writes(straight):
    out, result = straight
    rank0, rank1 = rank_lines(result.stdout, 0), rank_lines(result.stdout, 1)
    assert rank1 == []  # the other rank is quiet
    assert "2 processes, global batch 256 (128 per process)" in rank0[0]
    lines = epoch_lines(rank0)
    assert [line.split()[1] for line in lines] == ["1", "2", "3"]
    assert all(line.endswith("global batch 256 on 2 processes") for line in lines)
    assert any(line.startswith("test accuracy") for line in rank0)

    names = {"metrics.json", "checkpoint_last.pt", "checkpoint_best.pt", "curves.png", "confusion.png"}
    assert {p.name for p in out.iterdir()} == names  # one writer: no second copy, no stray temp file
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["args"]["world_size"] == 2
    # Measured here: 0.75 after these three epochs on 4,000 images; chance is 0.10.
    assert metrics["test_accuracy"] > 0.6

    state = load(out / "checkpoint_last.pt")
    assert state["epoch"] == EPOCHS and state["world_size"] == 2
    ranks = state["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # dropout differs by rank
    MLP().load_state_dict(state["model"])


# --- the same maths as one process ------------------------------------------------------------


@pytest.mark.parametrize("impl", ["baseline", "fused"])
def test_two_processes_equal_one_at_the_same_global_batch(impl, data_dir, tmp_path):
    """Without dropout, and with BatchNorm over the global batch, step k of the two ranks together
    is step k of one process: the same rows (each rank takes every other one of the shared order),
    the same statistics, and DDP's mean of the two ranks' gradients of their mean losses over equal
    shares is the gradient of the mean loss over the batch. Equal up to rounding, as the sums are
    split differently; with SGD, because Adam would scale the pre-BatchNorm biases' gradients, zero
    up to that rounding, into full steps of noise."""
    args = ("--epochs", "1", "--limit-train", "2000", "--dropout", "0", "--optimizer", "sgd", "--lr", "0.05")
    args += ("--impl", impl)
    one = run_script(*args, "--out", str(tmp_path / "one"), data_dir=data_dir)
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--sync-bn", "--out", str(tmp_path / "two"), data_dir=data_dir, log_dir=tmp_path)
    assert two.returncode == 0, two.stderr
    m_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m_two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # Measured here: within 4e-8 of each other.
    for key in ("train_loss", "val_loss"):
        assert m_two["history"][0][key] == pytest.approx(m_one["history"][0][key], rel=1e-6), key
    assert m_two["test_loss"] == pytest.approx(m_one["test_loss"], rel=1e-6)
    assert m_two["test_accuracy"] == pytest.approx(m_one["test_accuracy"], abs=1e-3)


# --- interruption and resume --------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(data_dir, tmp_path_factory):
    """A 2-process run stopped by SIGTERM to torchrun, which passes it on to its workers."""
    out = tmp_path_factory.mktemp("ddp") / "interrupted"
    command = torchrun_command(*COMMON, "--out", str(out), log_dir=out.parent)
    process, stderr = interrupt_after_first_epoch(command, data_dir)
    return out, process.returncode, stderr


@pytest.fixture(scope="module")
def interrupted_alone(data_dir, tmp_path_factory):
    """The same run in one process, stopped by SIGTERM."""
    out = tmp_path_factory.mktemp("ddp") / "interrupted_alone"
    command = [sys.executable, SCRIPT, "--no-progress", *COMMON, "--out", str(out)]
    process, stderr = interrupt_after_first_epoch(command, data_dir)
    return out, process.returncode, stderr


@pytest.mark.parametrize("run", ["interrupted", "interrupted_alone"])
def test_sigterm_leaves_the_last_completed_epoch(run, request):
    out, returncode, stderr = request.getfixturevalue(run)
    assert returncode != 0, stderr
    assert "interrupted: the last completed epoch is saved" in stderr
    state = load(out / "checkpoint_last.pt")
    assert 1 <= state["epoch"] < EPOCHS, "the run ended before the signal reached it"
    assert state["world_size"] == (2 if run == "interrupted" else 1)
    MLP().load_state_dict(state["model"])
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == state["epoch"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_resume_on_as_many_processes_continues_exactly(straight, interrupted, data_dir, tmp_path):
    checkpoint = interrupted[0] / "checkpoint_last.pt"
    args = (*COMMON, "--resume", str(checkpoint), "--out", str(tmp_path / "resumed"))
    result = torchrun(*args, data_dir=data_dir, log_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout + result.stderr
    m_resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    m_straight = json.loads((straight[0] / "metrics.json").read_text())
    figures = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr")
    assert [{k: h[k] for k in figures} for h in m_resumed["history"]] == [
        {k: h[k] for k in figures} for h in m_straight["history"]
    ]
    assert (m_resumed["test_loss"], m_resumed["test_accuracy"]) == (
        m_straight["test_loss"],
        m_straight["test_accuracy"],
    )


@pytest.mark.parametrize("source,nproc", [("interrupted", 1), ("interrupted_alone", 2)])
def test_resume_on_another_number_of_processes_warns_once_and_continues(source, nproc, request, data_dir, tmp_path):
    checkpoint = request.getfixturevalue(source)[0] / "checkpoint_last.pt"
    saved = load(checkpoint)
    args = (*COMMON, "--resume", str(checkpoint), "--out", str(tmp_path / "resumed"))
    if nproc == 1:
        result = run_script(*args, data_dir=data_dir)
    else:
        result = torchrun(*args, data_dir=data_dir, log_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    warning = f"was written by {saved['world_size']} process(es), this run has {nproc}"
    assert result.stdout.count(warning) == 1, result.stdout
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["history"][: saved["epoch"]] == saved["history"]
    assert load(tmp_path / "resumed" / "checkpoint_last.pt")["world_size"] == nproc
    assert metrics["test_accuracy"] > 0.6


# --- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "255"], "--batch-size 255 is the global batch: it must split evenly"),
        (["--resume", "/nonexistent/checkpoint_last.pt"], "no such file"),
        (["--out", "/proc/fused_mlp_run"], "is not a writable directory"),  # found by rank 0 alone
        (["--dataset", "cifar"], "invalid choice: 'cifar'"),
    ],
)
def test_bad_input_exits_2_on_every_rank(args, message, data_dir, tmp_path):
    result = torchrun("--epochs", "1", *args, data_dir=data_dir, log_dir=tmp_path, timeout=120)
    assert result.returncode != 0
    for rank in (0, 1):
        assert any(message in line for line in rank_lines(result.stderr, rank)), result.stderr
    assert worker_exit_statuses(result.stderr) == {0: 2, 1: 2}, result.stderr


def worker_exit_statuses(stderr):
    """Each failed worker's exit status, {rank: status}, from torchrun's closing summary."""
    entries = re.findall(r"rank\s+:\s+(\d+) \(local_rank: \d+\)\s+exitcode\s+:\s+(-?\d+)", stderr)
    return {int(rank): int(status) for rank, status in entries}


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_workers(*args, data_dir, nproc=2):
    """The workers of a launch started as torchrun starts them (its environment variables), but
    without its agent, which would stop the survivors itself as soon as one worker dies: here they
    must find out on their own."""
    port = free_port()
    workers = []
    for rank in range(nproc):
        env = dict(environment(data_dir), MASTER_ADDR="localhost", MASTER_PORT=str(port))
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
        workers.append(
            subprocess.Popen(
                [sys.executable, "-u", SCRIPT, "--no-progress", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=ROOT,
            )
        )
    return workers


@pytest.mark.parametrize(
    "victim,how",
    [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)],
    ids=["rank-1-dies", "rank-0-dies", "rank-1-hangs"],
)
def test_a_rank_that_dies_or_hangs_ends_the_others_within_the_timeout(victim, how, data_dir, tmp_path):
    """Rank 0 hosts the rendezvous store, so its death is a case of its own; a hung rank (stopped,
    its sockets open) is found out by the --dist-timeout alone."""
    timeout = "10" if how == signal.SIGSTOP else "20"  # a hang takes the whole timeout to find out
    workers = start_workers(*COMMON, "--dist-timeout", timeout, "--out", str(tmp_path / "run"), data_dir=data_dir)
    survivor = workers[1 - victim]
    try:
        for line in workers[0].stdout:
            if line.startswith("epoch   1"):
                break
        start = time.monotonic()
        os.kill(workers[victim].pid, how)
        _, stderr = survivor.communicate(timeout=60)
        assert survivor.returncode not in (0, None), stderr
        assert time.monotonic() - start < 60
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.communicate()
