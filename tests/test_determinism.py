"""The same program on the same machine, at the same thread count, gives the same bits on every run:
no code path, thread split or algorithm is chosen by timing. Each run is a fresh process, as a
user's rerun is."""

import os
import subprocess
import sys

import pytest
import torch

import fused_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: 20 training steps of the class-notes MLP (Adam) and of the side notes' no-BatchNorm net (SGD with
#: momentum), at batch 64 and 256, from torch.manual_seed(0); then eval forwards with and without
#: autograd (the latter the folded-weight inference op). Prints one digest of every loss, output,
#: parameter, buffer and optimizer state.
PROGRAM = r"""
import hashlib
import os
import torch
from fused_mlp.models import MLP
from fused_mlp.train import make_optimizer

device = torch.device(os.environ.get("DETERMINISM_DEVICE", "cpu"))
torch.manual_seed(0)
digest = hashlib.sha256()

def feed(value):
    if isinstance(value, torch.Tensor):
        digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            feed(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            feed(item)

nets = [
    dict(hidden=(512, 256, 128, 64), batch_norm=True, dropout=0.3, optimizer="adam", lr=1e-3),
    dict(hidden=(128, 64), batch_norm=False, dropout=0.0, optimizer="sgd", lr=1e-2),
]
for net in nets:
    for batch in (64, 256):
        model = MLP(hidden=net["hidden"], batch_norm=net["batch_norm"], dropout=net["dropout"]).to(device)
        optimizer = make_optimizer(model, net["optimizer"], lr=net["lr"])
        for _ in range(20):
            x, y = torch.randn(batch, 1, 28, 28).to(device), torch.randint(0, 10, (batch,)).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(model(x), y)
            loss.backward()
            optimizer.step()
            feed(loss)
        model.eval()
        x = torch.randn(batch, 1, 28, 28).to(device)
        with torch.no_grad():
            feed(model(x))
        feed(model(x))
        feed(model.state_dict())
        feed(optimizer.state_dict()["state"])
print(digest.hexdigest())
"""


def digest(**env):
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, **env),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(fused_mlp.BACKEND != "extension", reason="needs the compiled extension")
@pytest.mark.parametrize("gemm", [None, "aten", "onednn"], ids=["default", "aten", "onednn"])
def test_two_fresh_processes_give_the_same_bits(gemm):
    """Training and evaluation, twice, each in a new process: the same digest. Also with the GEMMs
    of FUSED_MLP_GEMM overridden, which may round differently from the default but never
    differently from themselves."""
    env = {} if gemm is None else {"FUSED_MLP_GEMM": gemm}
    first, second = digest(**env), digest(**env)
    assert len(first) == 64
    assert first == second


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(fused_mlp.BACKEND != "extension", reason="needs the compiled extension")
def test_two_fresh_processes_give_the_same_bits_on_a_gpu():
    """The same program on the GPU: the CUDA kernels sum in fixed orders too."""
    first, second = digest(DETERMINISM_DEVICE="cuda"), digest(DETERMINISM_DEVICE="cuda")
    assert first == second
