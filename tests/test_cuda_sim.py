"""The CUDA simulation (csrc/sim/cuda_sim.h): its self-tests, built as a plain executable with g++,
and once more under AddressSanitizer, which must catch a kernel that writes out of bounds; and the
cross-entropy and Linear -> BatchNorm1d -> ReLU -> Dropout CUDA kernels simulated in
AddressSanitizer executables."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIM_DIR = os.path.join(ROOT, "tests", "sim")
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.timeout(300)


ASAN = ("-fsanitize=address", "-fno-omit-frame-pointer")


def build(tmp_path_factory, source, name, *flags):
    if shutil.which(CXX) is None:
        pytest.fail(f"no C++ compiler ({CXX}) to build the simulation")
    import torch.utils.cpp_extension as ext

    exe = str(tmp_path_factory.mktemp("sim") / name)
    includes = [f"-I{os.path.join(ROOT, 'csrc')}"] + [f"-I{p}" for p in ext.include_paths()]
    cmd = [CXX, "-std=c++20", "-O1", "-g", "-pthread", *includes, os.path.join(SIM_DIR, source), "-o", exe, *flags]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return exe


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    return build(tmp_path_factory, "sim_selftest.cpp", "sim_selftest")


@pytest.fixture(scope="module")
def selftest_asan(tmp_path_factory):
    return build(tmp_path_factory, "sim_selftest.cpp", "sim_selftest_asan", *ASAN)


def run(exe, *args):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, env=env)


def check_all_passed(result):
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == f"{len(lines) - 1 - sum(line.startswith('  ') for line in lines)} passed, 0 failed"
    assert not any(line.startswith("FAIL") for line in lines)
    return lines


def test_simulation_self_tests(selftest):
    lines = check_all_passed(run(selftest))
    names = " ".join(lines)
    for expected in (
        "__syncthreads",
        "__shfl_up_sync",
        "atomicAdd",
        "divergent __syncthreads",
        "early return",
        "partial warp",
        "threads per block",
        "shared memory",
    ):
        assert expected in names


def test_simulation_self_tests_under_address_sanitizer(selftest_asan):
    check_all_passed(run(selftest_asan))


def test_address_sanitizer_catches_an_out_of_bounds_write(selftest_asan):
    result = run(selftest_asan, "oob")
    assert result.returncode != 0
    assert "heap-buffer-overflow" in result.stderr
    assert "wrote past the end without a report" not in result.stdout


def test_cross_entropy_kernels_under_address_sanitizer(tmp_path_factory):
    exe = build(tmp_path_factory, "cross_entropy_asan.cpp", "cross_entropy_asan", *ASAN)
    lines = check_all_passed(run(exe))
    assert any("classes=4097" in line for line in lines) and any("sm_count=1" in line for line in lines)


def test_linear_bn_relu_kernels_under_address_sanitizer(tmp_path_factory):
    exe = build(tmp_path_factory, "linear_bn_relu_asan.cpp", "linear_bn_relu_asan", *ASAN)
    lines = check_all_passed(run(exe))
    assert any("features=4097" in line for line in lines) and any("sm_count=1" in line for line in lines)
