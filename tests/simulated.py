"""Builds (once, cached) and loads the simulated CUDA kernels: tests/sim/*_sim.cpp compiled with
g++ against csrc/sim/cuda_sim.h and the real csrc/cuda/*.cuh device code."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_loaded = {}


def load(name):
    if name not in _loaded:
        from torch.utils.cpp_extension import load as load_extension

        build_dir = os.path.join(ROOT, "build", "sim", name)
        os.makedirs(build_dir, exist_ok=True)
        _loaded[name] = load_extension(
            name=f"fused_mlp_sim_{name}",
            sources=[os.path.join(ROOT, "tests", "sim", f"{name}_sim.cpp")],
            extra_include_paths=[os.path.join(ROOT, "csrc")],
            extra_cflags=["-O1", "-g", "-pthread"],
            build_directory=build_dir,
            verbose=False,
        )
    return _loaded[name]
