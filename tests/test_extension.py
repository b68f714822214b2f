"""How the package finds its compiled kernels, and what it does without them."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    """Runs `code` in a fresh interpreter with extra environment variables; returns the result."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_MLP_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_version():
    assert isinstance(fused_mlp.__version__, str) and fused_mlp.__version__.count(".") == 2


def test_extension_is_loaded_when_required():
    if os.environ.get("FUSED_MLP_REQUIRE_EXT") != "1":
        pytest.skip("FUSED_MLP_REQUIRE_EXT is not set (CI sets it)")
    assert fused_mlp.BACKEND == "extension"


@pytest.mark.skipif(fused_mlp.BACKEND != "extension", reason="needs the compiled extension")
def test_ops_are_registered_for_cpu():
    for name in ("cross_entropy_forward", "cross_entropy_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_mlp::{name}", "CPU")


def test_forced_reference_backend_gives_the_same_results():
    code = """
        import warnings, torch, fused_mlp
        assert fused_mlp.BACKEND == "reference", fused_mlp.BACKEND
        g = torch.Generator().manual_seed(0)
        x = torch.randn(6, 5, generator=g, requires_grad=True)
        t = torch.tensor([0, 4, -100, 2, 1, 1])
        loss = fused_mlp.cross_entropy(x, t, label_smoothing=0.1)
        loss.backward()
        print(repr(loss.item()), x.grad.flatten().tolist())
        """
    ref = run_python(code, FUSED_MLP_IMPL="reference")
    assert ref.returncode == 0, ref.stderr
    ext = run_python(code.replace('"reference", fused_mlp.BACKEND', 'fused_mlp.BACKEND, "x"'))
    assert ext.returncode == 0, ext.stderr
    ref_loss, ref_grad = ref.stdout.split(" ", 1)
    ext_loss, ext_grad = ext.stdout.split(" ", 1)
    assert abs(float(ref_loss) - float(ext_loss)) < 1e-6
    assert max(abs(a - b) for a, b in zip(eval(ref_grad), eval(ext_grad))) < 1e-6


MISSING_EXTENSION = """
    import sys, warnings
    sys.modules["fused_mlp._C"] = None  # as if the extension had never been built
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fused_mlp
    print(fused_mlp.BACKEND)
    for w in caught:
        print("WARNING:", w.message)
    """


def test_missing_extension_falls_back_with_one_warning():
    result = run_python(MISSING_EXTENSION)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "reference"
    warnings = [line for line in lines if line.startswith("WARNING:")]
    assert len(warnings) == 1 and "pip install --no-build-isolation" in warnings[0]


def test_missing_extension_is_an_error_when_required():
    result = run_python(MISSING_EXTENSION, FUSED_MLP_REQUIRE_EXT="1")
    assert result.returncode != 0
    assert "ExtensionError" in result.stderr and "could not be loaded" in result.stderr


def test_reference_contradicts_require():
    result = run_python("import fused_mlp", FUSED_MLP_IMPL="reference", FUSED_MLP_REQUIRE_EXT="1")
    assert result.returncode != 0 and "contradicts FUSED_MLP_REQUIRE_EXT=1" in result.stderr


def test_unknown_impl_is_refused():
    result = run_python("import fused_mlp", FUSED_MLP_IMPL="cuda-please")
    assert result.returncode != 0 and "FUSED_MLP_IMPL must be auto, extension or reference" in result.stderr


@pytest.mark.skipif(fused_mlp.BACKEND != "extension", reason="needs the compiled extension")
def test_torch_version_mismatch_is_named():
    code = """
        import torch
        torch.__version__ = "2.0.0"
        import fused_mlp
        """
    result = run_python(code, FUSED_MLP_REQUIRE_EXT="1")
    assert result.returncode != 0
    assert "was built against torch 2.14.1" in result.stderr and "torch 2.0.0 is installed" in result.stderr
    fallback = run_python(code + "print(fused_mlp.BACKEND)")
    assert fallback.returncode == 0 and fallback.stdout.strip() == "reference"
    assert "built against torch" in fallback.stderr


@pytest.mark.skipif(fused_mlp.BACKEND != "extension", reason="needs the compiled extension")
def test_a_build_without_cuda_names_the_op_and_how_to_build_with_cuda(tmp_path):
    """csrc/cuda_unavailable.cpp, what a CPU-only build registers for the CUDA key, loaded over this
    build's CUDA kernels in a fresh process; each op is then called as the dispatcher would call
    it for CUDA tensors (there is no GPU to make one)."""
    code = f"""
        import warnings, torch, fused_mlp
        from torch.utils.cpp_extension import load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it overrides this build's CUDA kernels, on purpose
            load(name="fused_mlp_cuda_unavailable", sources=[{os.path.join(ROOT, "csrc", "cuda_unavailable.cpp")!r}],
                 build_directory={str(tmp_path)!r}, is_python_module=False)
        cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
        x, t = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
        calls = {{
            "cross_entropy_forward": (x, t, None, 1, -100, 0.0),
            "linear_bn_relu_forward": (x, torch.randn(2, 3), None, None, None, None, None, True, 1e-5, 0.0,
                                       torch.zeros(2, dtype=torch.long)),
            "philox_seed_offset": (x, None),
        }}
        for name, args in calls.items():
            try:
                getattr(torch.ops.fused_mlp, name).default.redispatch(cuda, *args)
            except RuntimeError as err:
                print(type(err).__name__, str(err).splitlines()[0])
        """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    for line, name in zip(lines, ("cross_entropy_forward", "linear_bn_relu_forward", "philox_seed_offset")):
        assert line.startswith(f"RuntimeError fused_mlp::{name}: this build of fused_mlp has no CUDA kernels"), line
        assert "CUDA_HOME" in line and "pip install --no-build-isolation ." in line, line
