import os

import pytest
import torch

import fused_mlp
from fused_mlp import data


@pytest.fixture(scope="session")
def data_dir():
    """The dataset directory ($FUSED_MLP_DATA, else ../shared/data beside the repository). Tests
    that need it skip when it is absent, except under CI, where they fail."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("FUSED_MLP_DATA") or os.path.join(root, "..", "shared", "data")
    missing = [
        f
        for name in ("FashionMNIST", "MNIST")
        for f in data.RAW_FILES
        if not os.path.isfile(os.path.join(path, name, "raw", f))
    ]
    if missing:
        message = f"the Fashion-MNIST / MNIST files are not in {path}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must have them)")
        pytest.skip(message)
    return path


#: Tests of the compiled kernels themselves: skipped on the reference backend (FUSED_MLP_IMPL=reference).
needs_extension = pytest.mark.skipif(fused_mlp.BACKEND != "extension", reason="needs the compiled extension")


def _moved(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_moved(v, device) for v in value]
    return value


class Backend:
    """One implementation of the ops' kernels: `name`, the `device` its tensors live on, and the ops
    as attributes (cross_entropy_forward, linear_bn_relu_backward, ...) with the ops' signatures."""

    def __init__(self, name, device, ops):
        self.name, self.device, self._ops = name, torch.device(device), ops

    def __getattr__(self, op):
        try:
            return self._ops[op]
        except KeyError:
            raise AttributeError(f"backend {self.name} has no op {op}") from None

    def to(self, args):
        """args with every tensor moved to this backend's device."""
        return tuple(_moved(a, self.device) for a in args)

    def __repr__(self):
        return self.name


#: The ops that compute (every op but the random-number and in-place ones).
COMPUTE_OPS = (
    "cross_entropy_forward",
    "cross_entropy_backward",
    "linear_bn_relu_forward",
    "linear_bn_relu_backward",
    "bn_batch_stats",
    "bn_relu_dropout",
    "linear_relu_dropout_forward",
    "bn_backward_sums",
    "bn_backward_finish",
)


#: The whole-network ops.
NETWORK_OPS = ("mlp_forward", "mlp_backward", "mlp_inference", "mlp_train_step")


def _simulated_backend():
    import simulated

    ce, layer, network = simulated.load("cross_entropy"), simulated.load("linear_bn_relu"), simulated.load("mlp")
    for module in (ce, layer, network):
        module.set_barrier_timeout_ms(5000)
    ops = {"cross_entropy_forward": ce.forward, "cross_entropy_backward": ce.backward}
    ops.update(linear_bn_relu_forward=layer.forward, linear_bn_relu_backward=layer.backward)
    ops.update({name: getattr(layer, name) for name in COMPUTE_OPS[4:]})
    ops.update({name: getattr(network, name) for name in NETWORK_OPS})
    return Backend("cuda-sim", "cpu", ops)


@pytest.fixture(
    scope="session",
    params=[pytest.param("cpu", marks=pytest.mark.cpu_parity), "cuda-sim", "cuda"],
)
def backend(request):
    """The backends every parity test runs on: the CPU kernels, the CUDA kernels in the simulation
    (csrc/sim), and the CUDA kernels on a GPU; each skipped when it is not available."""
    if request.param == "cuda-sim":
        return _simulated_backend()
    if fused_mlp.BACKEND != "extension":
        pytest.skip("needs the compiled extension")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ops = {name: getattr(torch.ops.fused_mlp, name) for name in COMPUTE_OPS + NETWORK_OPS}
    return Backend(request.param, request.param, ops)


def _needs_gpu(item):
    """Whether a test runs on a CUDA GPU: a skip "needs ... CUDA GPU(s)" when none is there, or a
    parameter that is the CUDA device (the `backend` fixture's "cuda", a torch.device)."""
    for mark in item.iter_markers("skipif"):
        if "CUDA GPU" in str(mark.kwargs.get("reason", "")):
            return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(
        value == "cuda" or (isinstance(value, torch.device) and value.type == "cuda") for value in params.values()
    )


def pytest_collection_modifyitems(config, items):
    # Marker gpu: what `make gpu-check` runs on a machine with a GPU (`pytest -m gpu`).
    for item in items:
        if _needs_gpu(item):
            item.add_marker(pytest.mark.gpu)
