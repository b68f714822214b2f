"""Synchronized batch statistics across 2 processes (gloo on the CPU): the fused layer, the
whole-network module and SyncBatchNorm1d alone must equal BatchNorm over the concatenation of the
processes' batches; disagreement, unsupported transforms and a vanished process fail loudly.
Each scenario runs tests/distributed_worker.py in two processes."""

import os
import subprocess
import sys
import time

import pytest
import torch
from distributed_worker import CASES, LR, STEPS, batch, build, rank_rows

from fused_mlp import distributed
from fused_mlp.models import MLP
from fused_mlp.nn import FusedMLP, LinearBNReLU, SyncBatchNorm1d, convert_sync_batchnorm

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
WORLD = 2


def run_pair(scenario, tmp_path, timeout=60):
    """Both ranks of `scenario`; returns [(returncode, stderr, seconds)] per rank."""
    init_file = tmp_path / "init"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, scenario, str(r), str(WORLD), str(init_file), str(tmp_path), str(timeout)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(WORLD)
    ]
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout * 3)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{scenario}: a rank hung past {timeout * 3} s")
        results.append((proc.returncode, err, time.monotonic() - start))
    return results


def run_results(scenario, tmp):
    for rank, (code, err, _) in enumerate(run_pair(scenario, tmp)):
        assert code == 0, f"rank {rank}:\n{err}"
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    return run_results("parity", tmp_path_factory.mktemp("parity"))


def reference_run(kind, rows, momentum):
    """The stock computation: one process, the concatenated batch, its mean loss, the same SGD."""
    model = build(kind, momentum)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for step in range(STEPS):
        x, weights = batch(kind, step, rows)
        x.requires_grad_()
        out = model(x)
        optimizer.zero_grad()
        ((out * weights).sum() / sum(rows)).backward()
        steps.append(
            {"out": out.detach(), "input_grad": x.grad, "grads": {n: p.grad for n, p in model.named_parameters()}}
        )
        optimizer.step()
    model.eval()
    return steps, model.state_dict(), model(batch(kind, STEPS, rows)[0]).detach()


@pytest.mark.parametrize("case", list(CASES))
def test_synchronized_statistics_equal_batch_norm_over_the_concatenated_batch(parity, case):
    assert_matches_concatenated_batch(parity, case)


@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 CUDA GPUs")
def test_a_stock_sync_batchnorm_in_the_fused_layers_is_honoured_on_cuda(tmp_path):
    results = run_results("parity-cuda", tmp_path)
    for case, (kind, _, _) in CASES.items():
        if kind in ("layer", "network"):
            assert_matches_concatenated_batch(results, case)


def assert_matches_concatenated_batch(parity, case):
    kind, rows, momentum = CASES[case]
    want_steps, want_state, want_eval = reference_run(kind, rows, momentum)
    tol = dict(rtol=1e-9, atol=1e-11)
    for rank in range(WORLD):
        got = parity[rank][case]
        mine = rank_rows(rows, rank)
        for step, (g, w) in enumerate(zip(got["steps"], want_steps)):
            where = f"rank {rank}, step {step}"
            torch.testing.assert_close(g["out"], w["out"][mine], **tol, msg=f"output, {where}")
            # Each rank's loss is scaled by the world size (so that DDP's average is the global
            # mean's gradient): its input gradient is the world size times the global one's rows.
            torch.testing.assert_close(
                g["input_grad"], WORLD * w["input_grad"][mine], **tol, msg=f"input gradient, {where}"
            )
            assert g["grads"].keys() == w["grads"].keys()
            for name in w["grads"]:
                torch.testing.assert_close(g["grads"][name], w["grads"][name], **tol, msg=f"{name} grad, {where}")
        assert got["state"].keys() == want_state.keys()
        for name, value in want_state.items():  # running statistics and counters, after STEPS steps
            torch.testing.assert_close(got["state"][name], value, **tol, msg=f"{name}, rank {rank}")
        torch.testing.assert_close(got["eval"], want_eval, **tol, msg=f"eval output, rank {rank}")


def test_processes_that_disagree_on_the_features_get_an_error_from_the_header(tmp_path):
    for rank, (code, err, _) in enumerate(run_pair("header-mismatch", tmp_path)):
        assert code != 0
        assert "disagree on the features" in err and "rank 0: 6, rank 1: 8" in err, f"rank {rank}:\n{err}"


def test_a_stock_sync_batchnorm_in_a_fused_layer_on_the_cpu_is_refused_pointing_to_the_helper(tmp_path):
    for rank, (code, err, _) in enumerate(run_pair("stock-sync-batchnorm-on-cpu", tmp_path)):
        assert code != 0
        assert "torch.nn.SyncBatchNorm" in err and "convert_sync_batchnorm" in err, f"rank {rank}:\n{err}"


def test_torch_func_and_double_backward_through_synchronized_statistics_raise_and_compile_breaks_the_graph(tmp_path):
    for rank, (code, err, _) in enumerate(run_pair("unsupported", tmp_path)):
        assert code == 0, f"rank {rank}:\n{err}"
        messages = torch.load(tmp_path / f"rank{rank}.pt")
        assert messages.keys() == {"func", "double_backward", "compiled_matches_eager"}
        assert messages["compiled_matches_eager"]
        assert messages["func"] == distributed.UNDER_TRANSFORM
        assert messages["double_backward"] == distributed.DOUBLE_BACKWARD


def test_a_rank_that_exits_before_a_collective_makes_the_other_fail_within_the_timeout(tmp_path):
    (code, err, seconds), (left, _, _) = run_pair("rank-exits", tmp_path, timeout=20)
    assert left == 0
    assert code != 0 and "synchronized BatchNorm" in err and "failed" in err, err
    assert seconds < 60


# --- one process: nothing is communicated -----------------------------------------------------------


def test_convert_sync_batchnorm_shares_state_and_keeps_the_keys():
    model = MLP(hidden=(10, 8), impl="fused")
    stock = MLP(hidden=(10, 8), impl="baseline")
    keys = list(model.state_dict())
    first_bn = model.hidden[0].bn
    converted = convert_sync_batchnorm(model)
    assert converted is model and list(model.state_dict()) == keys
    bn = model.hidden[0].bn
    assert type(bn) is SyncBatchNorm1d and bn.weight is first_bn.weight and bn.running_var is first_bn.running_var
    assert bn.process_group is None and bn.momentum == first_bn.momentum and bn.eps == first_bn.eps
    converted = convert_sync_batchnorm(stock.eval())
    assert not any(type(m) is torch.nn.BatchNorm1d for m in converted.modules())
    assert all(not m.training for m in converted.modules())
    assert isinstance(convert_sync_batchnorm(torch.nn.BatchNorm1d(3)), SyncBatchNorm1d)
    plain = torch.nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    alone = convert_sync_batchnorm(plain, process_group="group")
    assert alone.weight is None and alone.running_mean is None and alone.process_group == "group"


@pytest.mark.parametrize("kind", ["layer", "network", "standalone"])
def test_without_a_process_group_a_converted_model_is_the_stock_one(kind):
    assert distributed.active_group() is None
    model, stock = convert_sync_batchnorm(build(kind, 0.1)), build(kind, 0.1)
    for step in range(2):
        x, weights = batch(kind, step, (11,))
        (model(x) * weights).sum().backward()
        (stock(x) * weights).sum().backward()
    for (name, a), b in zip(model.state_dict().items(), stock.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    for (name, a), b in zip(model.named_parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_modules_accept_sync_batchnorm1d_on_the_one_op_path():
    net = convert_sync_batchnorm(FusedMLP(6, (5, 4), 3))
    layer = convert_sync_batchnorm(LinearBNReLU(6, 5))
    assert isinstance(layer.bn, SyncBatchNorm1d) and net(torch.randn(7, 6)).shape == (7, 3)
    assert layer(torch.randn(7, 6)).shape == (7, 5)
