"""Builds fused_mlp._C: the C++ CPU kernels always, the CUDA kernels when a toolkit is there.

Environment knobs (all optional):
  FUSED_MLP_CPU_ONLY=1         never build CUDA sources
  FUSED_MLP_FORCE_CUDA=1       build CUDA even if the toolkit's major version differs from torch's
  FUSED_MLP_CPU_CAPABILITY     avx512 | avx2 | default (default: what this machine's CPU supports)
  CUDA_HOME                    the toolkit (default: a /usr/local/cuda* directory holding bin/nvcc)
  TORCH_CUDA_ARCH_LIST         GPU architectures (default with no GPU visible: "8.0;9.0+PTX")
  MAX_JOBS                     parallel compile jobs (default 2)
"""

import glob
import os
import re
import subprocess
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _find_cuda_home():
    """The toolkit directory, found before torch guesses (its guess from `which nvcc` can be wrong)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if os.path.exists(os.path.join(path, "bin", "nvcc")):
            return os.path.realpath(path)
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("MAX_JOBS", "2")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

_CAPABILITY_FLAGS = {
    # The flags ATen itself compiles its AVX2 / AVX512 kernels with.
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _cpu_capability():
    chosen = os.environ.get("FUSED_MLP_CPU_CAPABILITY", "").lower()
    if chosen:
        if chosen not in _CAPABILITY_FLAGS:
            sys.exit(f"FUSED_MLP_CPU_CAPABILITY must be one of {sorted(_CAPABILITY_FLAGS)}, got {chosen!r}")
        return chosen
    if sys.platform != "linux" or not os.uname().machine.startswith(("x86", "amd64")):
        return "default"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())
    except (OSError, AttributeError):
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


def _nvcc_major(cuda_home):
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def _want_cuda(cuda_sources):
    if not cuda_sources or os.environ.get("FUSED_MLP_CPU_ONLY") == "1":
        return False
    if torch.version.cuda is None:
        return False  # a CPU build of torch cannot link CUDA kernels
    if not _cuda_home:
        warnings.warn("fused_mlp: no CUDA toolkit found (set CUDA_HOME); building the CPU kernels only", stacklevel=2)
        return False
    toolkit_major = _nvcc_major(_cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if toolkit_major != torch_major and os.environ.get("FUSED_MLP_FORCE_CUDA") != "1":
        warnings.warn(
            f"fused_mlp: the CUDA toolkit at {_cuda_home} is CUDA {toolkit_major}, but torch was built "
            f"with CUDA {torch.version.cuda}; building the CPU kernels only "
            "(FUSED_MLP_FORCE_CUDA=1 builds CUDA anyway)",
            stacklevel=2,
        )
        return False
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # With no GPU to query, cpp_extension cannot pick architectures itself.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    return True


def _write_build_info(capability, with_cuda):
    """Facts the package checks at import, before it loads the extension."""
    path = os.path.join(ROOT, "fused_mlp", "_build_info.py")
    text = (
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CPU_CAPABILITY = {capability!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
    )
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if old != text:  # keep the mtime when nothing changed
        with open(path, "w") as f:
            f.write(text)


def _extensions():
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    cpp_sources = [rel(os.path.join(CSRC, "ops.cpp"))] + sorted(
        rel(p) for p in glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))
    )
    cuda_sources = sorted(rel(p) for p in glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    capability = _cpu_capability()
    with_cuda = _want_cuda(cuda_sources)
    _write_build_info(capability, with_cuda)

    cxx_flags = ["-O3", "-fno-math-errno"] + _CAPABILITY_FLAGS[capability]
    include_dirs = [CSRC]
    if with_cuda:
        return [
            CUDAExtension(
                "fused_mlp._C",
                cpp_sources + cuda_sources,
                include_dirs=include_dirs,
                extra_compile_args={
                    "cxx": cxx_flags + ["-DFUSED_MLP_WITH_CUDA"],
                    "nvcc": ["-O3", "-DFUSED_MLP_WITH_CUDA"],
                },
            )
        ]
    return [CppExtension("fused_mlp._C", cpp_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
