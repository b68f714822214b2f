"""The CPU kernels are compiled once per instruction set and chosen at run time (csrc/cpu/kernels.h):
the choice follows the CPU and ATEN_CPU_CAPABILITY, every variant the CPU can run passes the CPU
parity tests, and no variant carries instructions of a higher one."""

import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

import fused_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")

pytestmark = pytest.mark.skipif(fused_mlp.BACKEND != "extension", reason="needs the compiled extension")


def cpu_supports():
    """The capabilities this CPU (and this torch) can run: ATen's own choice and everything below it."""
    best = torch.backends.cpu.get_cpu_capability()
    best = best if best in CAPABILITIES else "DEFAULT"
    return CAPABILITIES[: CAPABILITIES.index(best) + 1]


def built_capabilities():
    from fused_mlp import _build_info

    return _build_info.CPU_CAPABILITIES


def test_the_best_variant_this_cpu_runs_is_chosen():
    from fused_mlp import _C

    requested = os.environ.get("ATEN_CPU_CAPABILITY")
    expected = [c for c in cpu_supports() if c in built_capabilities()][-1]
    if requested:  # the suite itself may run under a lower capability (test_parity_under_each_capability)
        expected = min(expected, requested.upper(), key=CAPABILITIES.index)
    assert _C.cpu_capability() == expected


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_parity_under_each_capability(capability):
    """The CPU parity tests (marker cpu_parity) in a fresh process under ATEN_CPU_CAPABILITY, which
    picks ATen's kernels and ours alike."""
    if capability not in built_capabilities():
        pytest.skip(f"this build has no {capability} variant (not an x86-64 build)")
    if capability not in cpu_supports():
        pytest.skip(f"this CPU cannot run {capability} code (its best is {cpu_supports()[-1]})")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower(), FUSED_MLP_REQUIRE_EXT="1")
    check = subprocess.run(
        [sys.executable, "-c", "from fused_mlp import _C; print(_C.cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == capability
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cpu_parity", "tests"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]


# --- the machine code of each variant -------------------------------------------------------------

_FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
_INSTRUCTION = re.compile(r"^\s+[0-9a-f]+:\t((?:[0-9a-f]{2} )+)\s*\t(.*)$")
# Registers only EVEX (AVX-512) encodings can name: zmm, xmm16-31 / ymm16-31, the mask registers.
_EVEX_REGISTERS = re.compile(r"%zmm|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[0-7]\b")
# Legacy prefixes that may precede an EVEX prefix (0x62): address size and segment overrides.
_EVEX_BYTES = re.compile(r"^(?:(?:67|2e|36|3e|26|64|65) )*62 ")


def _local_function_variants(path):
    """{address: variant} of the library's local functions (static functions, and the clones the
    compiler makes of inline ones): each belongs to the object file whose FILE entry precedes it in
    the symbol table, and setup.py names a variant's sources <name>.<VARIANT>.cpp."""
    out = subprocess.run(["readelf", "-sW", path], capture_output=True, text=True, check=True).stdout
    variants, current = {}, None
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 8 or not fields[0].endswith(":"):
            continue
        value, kind, binding, name = fields[1], fields[3], fields[4], fields[7]
        if kind == "FILE":
            match = re.search(r"\.(DEFAULT|AVX2|AVX512)\.cpp$", name)
            current = match.group(1) if match else None
        elif kind == "FUNC" and binding == "LOCAL":
            variants[int(value, 16)] = current
    return variants


def _instruction_sets(path):
    """{(function name, variant): {"evex", "ymm", "vex"}} for the functions of the library's .text
    section. A global function's variant is the namespace in its name (shared inline functions
    compiled into several variants are one symbol, whichever copy the linker kept); a local one's is
    its object file's."""
    if shutil.which("objdump") is None or shutil.which("readelf") is None:
        pytest.fail("objdump and readelf (binutils) are needed to inspect the compiled variants")
    local = _local_function_variants(path)
    out = subprocess.run(["objdump", "-d", "-C", "-j", ".text", path], capture_output=True, text=True, check=True)
    found = defaultdict(set)
    function = None
    for line in out.stdout.splitlines():
        header = _FUNCTION.match(line)
        if header:
            address = int(line.split()[0], 16)
            name = header.group(1)
            function = (name, local[address] if address in local else _variant(name))
            found[function]
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction or function is None:
            continue
        raw, text = instruction.groups()
        if _EVEX_BYTES.match(raw) or _EVEX_REGISTERS.search(text) or "{evex}" in text:
            found[function].add("evex")
        if "%ymm" in text:
            found[function].add("ymm")
        if re.match(r"^(?:(?:67|2e|36|3e|26|64|65) )*c[45] ", raw):  # a VEX prefix: AVX of any width
            found[function].add("vex")
    return found


def _variant(function):
    for capability in ("AVX512", "AVX2", "DEFAULT"):
        if re.search(rf"\b{capability}\b|_{capability}\(", function):
            return capability
    return None  # compiled once, for the baseline: registrations, checks, the CUDA host code


@pytest.fixture(scope="module")
def instruction_sets():
    return _instruction_sets(fused_mlp._C.__file__)


def test_the_extension_has_every_variant_the_build_claims(instruction_sets):
    variants = {variant for _, variant in instruction_sets}
    assert set(built_capabilities()) <= variants


def test_avx512_code_stays_in_the_avx512_variant(instruction_sets):
    """No zmm register, mask register or EVEX encoding outside the AVX512 variant: the DEFAULT and
    AVX2 variants, and the code every CPU runs, never need AVX-512."""
    leaks = sorted(
        f"{name} [{variant}]"
        for (name, variant), sets in instruction_sets.items()
        if "evex" in sets and variant != "AVX512"
    )
    assert not leaks, f"{len(leaks)} functions outside the AVX512 variant use AVX-512: {leaks[:10]}"
    if "AVX512" in built_capabilities():
        assert any("evex" in sets for (_, variant), sets in instruction_sets.items() if variant == "AVX512")


def test_avx_code_stays_in_the_avx_variants(instruction_sets):
    """The DEFAULT variant and the code compiled once use no AVX at all (VEX or EVEX encodings),
    so they run on any x86-64 CPU."""
    leaks = sorted(
        f"{name} [{variant}]"
        for (name, variant), sets in instruction_sets.items()
        if variant in (None, "DEFAULT") and sets & {"vex", "evex", "ymm"}
    )
    assert not leaks, f"{len(leaks)} baseline functions use AVX: {leaks[:10]}"
    if "AVX2" in built_capabilities():
        assert any("ymm" in sets for (_, variant), sets in instruction_sets.items() if variant == "AVX2")
