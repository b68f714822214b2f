"""Loads the compiled extension ``fused_mlp._C``, or says clearly why it cannot.

FUSED_MLP_IMPL=reference   use the plain-PyTorch reference ops, even if the extension is built
FUSED_MLP_REQUIRE_EXT=1    a missing or unloadable extension is an error, never a fallback
"""

import importlib
import os
import warnings

import torch

_BUILD_HINT = "build it with `pip install --no-build-isolation .` (or `make test`) in the fused_mlp source tree"


class ExtensionError(ImportError):
    """The compiled extension is missing, or cannot run with this torch."""


def _check_build(info):
    if torch.__version__ != info.TORCH_VERSION:
        raise ExtensionError(
            f"fused_mlp._C was built against torch {info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild it: {_BUILD_HINT}"
        )


def load():
    """Returns "extension" or "reference": which implementation the ops use."""
    require = os.environ.get("FUSED_MLP_REQUIRE_EXT", "") == "1"
    impl = (os.environ.get("FUSED_MLP_IMPL") or "auto").lower()
    if impl not in ("auto", "extension", "reference"):
        raise ValueError(f"FUSED_MLP_IMPL must be auto, extension or reference, got {impl!r}")
    if impl == "reference":
        if require:
            raise ExtensionError("FUSED_MLP_IMPL=reference contradicts FUSED_MLP_REQUIRE_EXT=1")
        return "reference"
    try:
        info = importlib.import_module("fused_mlp._build_info")
        _check_build(info)
        importlib.import_module("fused_mlp._C")
    except ImportError as err:
        if require or impl == "extension":
            raise ExtensionError(f"fused_mlp._C could not be loaded ({err}); {_BUILD_HINT}") from err
        warnings.warn(
            f"fused_mlp._C is not available ({err}); using the slower plain-PyTorch reference "
            f"ops. To get the fused kernels, {_BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return "reference"
    return "extension"
