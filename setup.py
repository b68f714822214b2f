"""Builds fused_mlp._C: the C++ CPU kernels always, the CUDA kernels when a toolkit is there.

The CPU kernels (csrc/cpu/*.cpp) are compiled once per x86-64 instruction set, as ATen compiles
its own: DEFAULT, AVX2 and AVX512, each into its own namespace. The extension picks one at run
time from the running CPU (and ATEN_CPU_CAPABILITY), so a build runs on any x86-64 machine.

Environment knobs (all optional):
  FUSED_MLP_CPU_ONLY=1         never build CUDA sources
  FUSED_MLP_CPU_VARIANTS=native the baseline and this CPU's own instruction set alone (a build for
                               this machine only, as `make gpu-check` does); default: all
  CUDA_HOME                    the toolkit (default: a /usr/local/cuda* directory holding bin/nvcc)
  TORCH_CUDA_ARCH_LIST         GPU architectures (default with no GPU visible: "8.0;9.0+PTX")
  MAX_JOBS                     parallel compile jobs
"""

import glob
import os
import platform
import re
import shutil
import subprocess
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

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _rel(path):
    return os.path.relpath(path, ROOT)


def _cpu_variants():
    """(name, compiler flags) of each instruction set the CPU kernels are compiled for, in link
    order. The flags are those ATen compiles its own AVX2 / AVX512 kernels with, plus F16C, which
    ATen's vectorized float16 conversions need (every AVX2 CPU has it). The linker keeps the first
    copy of an inline function that several objects define, so the baseline variant goes first:
    a helper shared by all variants then never carries AVX-512 instructions into the others."""
    variants = [("DEFAULT", [])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        avx2 = ["-mavx2", "-mfma", "-mf16c"]
        if _compiler_accepts(["-mno-avx256-split-unaligned-load", "-mno-avx256-split-unaligned-store"]):
            # gcc's generic tuning splits unaligned 256-bit loads and stores in two, which costs
            # time on every CPU with AVX2.
            avx2 += ["-mno-avx256-split-unaligned-load", "-mno-avx256-split-unaligned-store"]
        variants.append(("AVX2", avx2))
        variants.append(("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]))
    wanted = os.environ.get("FUSED_MLP_CPU_VARIANTS", "all")
    if wanted == "native":
        # ATen's choice for this CPU; the baseline stays, for ATEN_CPU_CAPABILITY=default.
        native = torch.backends.cpu.get_cpu_capability()
        variants = [v for v in variants if v[0] in ("DEFAULT", native)]
    elif wanted != "all":
        raise ValueError(f"FUSED_MLP_CPU_VARIANTS must be 'all' or 'native', got {wanted!r}")
    return [(name, flags + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"]) for name, flags in variants]


def _compiler_accepts(flags):
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return False
    result = subprocess.run(
        [*cxx.split(), *flags, "-x", "c++", "-E", "-o", os.devnull, os.devnull], capture_output=True
    )
    return result.returncode == 0


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
    if toolkit_major != torch_major:
        # torch's cpp_extension refuses a toolkit of another major version than its own.
        warnings.warn(
            f"fused_mlp: the CUDA toolkit at {_cuda_home} is CUDA {toolkit_major}, but torch was built "
            f"with CUDA {torch.version.cuda}; building the CPU kernels only. Point CUDA_HOME at a "
            f"CUDA {torch_major} toolkit to build the CUDA kernels.",
            stacklevel=2,
        )
        return False
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # With no GPU to query, cpp_extension cannot pick architectures itself.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    return True


CPU_VARIANTS = _cpu_variants()
# Compiled once per instruction set: the CPU kernels.
CPU_KERNEL_SOURCES = sorted(_rel(p) for p in glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
HEADERS = sorted(
    _rel(p) for pattern in ("**/*.h", "**/*.cuh") for p in glob.glob(os.path.join(CSRC, pattern), recursive=True)
)


class BuildExtensionPerCpu(BuildExtension):
    """cpp_extension's build, plus the CPU kernels compiled once per instruction set into objects
    of their own (one ninja build per variant, since the flags differ), linked into the same
    extension after its other objects. The build facts the package checks at import are written
    beside the extension only once it is built."""

    def build_extension(self, ext):
        objects = []
        for name, flags in CPU_VARIANTS:
            args = dict(ext.extra_compile_args)
            args["cxx"] = ext.extra_compile_args["cxx"] + flags
            out_dir = os.path.abspath(os.path.join(self.build_temp, f"cpu_{name.lower()}"))
            objects += self.compiler.compile(
                [_variant_source(source, name, out_dir) for source in CPU_KERNEL_SOURCES],
                output_dir=out_dir,
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=args,
                depends=ext.depends,
            )
        ext.extra_objects = objects
        super().build_extension(ext)
        self._write_build_info(ext)

    def copy_extensions_to_source(self):
        # An in-place (editable) build: the build facts go beside the copied extension too.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            self.copy_file(_build_info_path(regular_file), _build_info_path(inplace_file))

    def _write_build_info(self, ext):
        path = _build_info_path(self.get_ext_fullpath(ext.name))
        text = (
            "# Written by setup.py after fused_mlp._C was built.\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"WITH_CUDA = {ext.with_cuda!r}\n"
            f"CPU_CAPABILITIES = {tuple(name for name, _ in CPU_VARIANTS)!r}\n"
        )
        with open(path, "w") as f:
            f.write(text)


def _variant_source(source, variant, out_dir):
    """A source file of one variant, <name>.<VARIANT>.cpp, that includes the kernel source: each
    variant's objects (and the symbol table's file entries) then carry the variant's name."""
    stem = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(out_dir, f"{stem}.{variant}.cpp")
    text = f'#include "{os.path.relpath(source, "csrc")}"\n'
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return path  # unchanged: keep its mtime, so ninja does not rebuild it
    with open(path, "w") as f:
        f.write(text)
    return path


def _build_info_path(extension_path):
    return os.path.join(os.path.dirname(extension_path), "_build_info.py")


def _extensions():
    generic_sources = [_rel(os.path.join(CSRC, name)) for name in ("ops.cpp", "cpu_dispatch.cpp", "cpu_buffers.cpp")]
    cuda_sources = sorted(_rel(p) for p in glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    with_cuda = _want_cuda(cuda_sources)
    macros = [(f"FUSED_MLP_CPU_HAVE_{name}", None) for name, _ in CPU_VARIANTS]
    # at::parallel_for runs its loop on ATen's OpenMP threads only where the caller is compiled
    # with OpenMP; without it, every CPU kernel would run on one thread. The OpenMP runtime is the
    # one torch loads (libgomp.so.1 by soname), so the kernels share ATen's thread pool.
    openmp = ["-fopenmp"] if _compiler_accepts(["-fopenmp"]) else []
    cxx_flags = ["-O3", "-fno-math-errno", *openmp]
    common = dict(
        include_dirs=[CSRC],
        define_macros=macros,
        depends=HEADERS + CPU_KERNEL_SOURCES,
        extra_link_args=openmp,
        py_limited_api=False,
    )
    if with_cuda:
        ext = CUDAExtension(
            "fused_mlp._C",
            generic_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DFUSED_MLP_WITH_CUDA"], "nvcc": ["-O3", "-DFUSED_MLP_WITH_CUDA"]},
            **common,
        )
    else:
        ext = CppExtension(
            "fused_mlp._C",
            generic_sources + [_rel(os.path.join(CSRC, "cuda_unavailable.cpp"))],
            extra_compile_args={"cxx": cxx_flags},
            **common,
        )
    ext.with_cuda = with_cuda
    return [ext]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtensionPerCpu.with_options(use_ninja=True)},
)
