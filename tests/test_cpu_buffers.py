"""The CPU kernels' large tensors come from a cache of freed blocks (csrc/cpu_buffers.cpp): a step
that asks for the same sizes as the last one gets its blocks back instead of fresh pages, values
never depend on it, FUSED_MLP_CPU_CACHE_MB=0 turns it off and a bad setting is a clear error. Each
case is a fresh process, since the setting is read once."""

import os
import subprocess
import sys

import pytest
from conftest import needs_extension

pytestmark = needs_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Training steps of the class-notes MLP through TrainStep and the standard path at batch 1024 (tens
#: of megabytes of activations, gradients and GEMM outputs per step), then eval inference; prints a
#: digest of every loss, parameter and output, and the minor page faults of the last steps.
PROGRAM = r"""
import hashlib
import resource
import torch
from fused_mlp import TrainStep
from fused_mlp.models import MLP
from fused_mlp.train import make_optimizer

torch.manual_seed(0)
digest = hashlib.sha256()
model = MLP()
optimizer = make_optimizer(model, "adam", lr=1e-3)
step = TrainStep(model, optimizer, strict=True)
x, y = torch.randn(1024, 784), torch.randint(0, 10, (1024,))

def standard():
    optimizer.zero_grad(set_to_none=True)
    loss = model.loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss

for run in (lambda: step(x, y), standard):
    for _ in range(3):
        digest.update(run().detach().numpy().tobytes())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        digest.update(run().detach().numpy().tobytes())
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for p in model.parameters():
    digest.update(p.detach().numpy().tobytes())
# The first layer's weight gradient (1.6 MB, the backward's GEMM output) resizes as any tensor: the
# grown storage comes from the same allocator, the old values copied over.
grad = model.hidden[0].linear.weight.grad
kept = grad.clone()
grad.resize_(4096, 1000)
assert torch.equal(grad.view(-1)[: kept.numel()], kept.view(-1))
grad.fill_(1.0)
assert grad.sum().item() == 4096 * 1000
model.eval()
with torch.no_grad():
    digest.update(model(x).numpy().tobytes())
print(digest.hexdigest())
"""


def run(cache_mb=None):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("FUSED_MLP_CPU_CACHE_MB", None)
    if cache_mb is not None:
        env["FUSED_MLP_CPU_CACHE_MB"] = cache_mb
    return subprocess.run([sys.executable, "-c", PROGRAM], env=env, cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def runs():
    return {setting: run(setting) for setting in (None, "0")}


def test_a_repeated_step_takes_its_blocks_back_instead_of_new_pages(runs):
    cached, uncached = runs[None], runs["0"]
    assert cached.returncode == 0, cached.stderr
    assert uncached.returncode == 0, uncached.stderr
    faults = [int(n) for n in cached.stdout.split()[:2]]
    faults_off = [int(n) for n in uncached.stdout.split()[:2]]
    # Four steps at batch 1024 allocate over 100 MB; without the cache glibc hands much of it out as
    # fresh pages every step (thousands of faults), with it the blocks come back: next to nothing.
    for on, off in zip(faults, faults_off):
        assert off > 2000, (faults, faults_off)
        assert on < off / 20, (faults, faults_off)


def test_values_do_not_depend_on_the_cache(runs):
    assert runs[None].stdout.split()[-1] == runs["0"].stdout.split()[-1]


@pytest.mark.parametrize("setting", ["lots", "-1", "1.5", " 8", "+8", "99999999999999999999", "2000000"])
def test_a_bad_setting_is_a_clear_error(setting):
    result = run(setting)
    assert result.returncode != 0
    assert "FUSED_MLP_CPU_CACHE_MB must be a whole number of megabytes from 0 to 1048576" in result.stderr
