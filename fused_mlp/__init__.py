"""fused_mlp: fused Linear-BatchNorm-ReLU-Dropout and cross-entropy ops for PyTorch.

The ops run in C++ (CPU) and CUDA kernels from the compiled extension ``fused_mlp._C``; when it is
not built, the same maths runs in plain PyTorch (``fused_mlp.reference``) after one warning.
"""

__version__ = "0.1.0"

from . import functional, nn, ops, reference  # noqa: E402
from .functional import cross_entropy  # noqa: E402
from .ops import BACKEND  # noqa: E402
from .step import TrainStep  # noqa: E402

__all__ = ["__version__", "BACKEND", "TrainStep", "cross_entropy", "functional", "nn", "ops", "reference"]
