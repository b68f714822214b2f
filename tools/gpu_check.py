"""`make gpu-check`: the CUDA kernels on this machine's GPU in one command, from a fresh checkout,
with the torch installed here and nothing else installed.

Stages, each timed, each run even when an earlier one failed (the report says which):
  build     the extension in place (pip install --no-build-isolation --no-deps -e .), for this
            GPU's architecture alone and this CPU's instruction set (plus the baseline), all cores;
  ptxas     the device code's resource use from ptxas (-Xptxas -v, sm_90 or this GPU's): a table of
            registers, shared memory, stack and spills per kernel; fails on any spill or stack frame;
  tests     pytest -m gpu: every test that runs on a CUDA GPU (parity, gradcheck, the network op,
            TrainStep with CUDA-graph capture, the determinism of fresh processes on the GPU);
  sanitize  tools/cuda_kernels_once.py under compute-sanitizer --tool memcheck, then racecheck;
  bench     benchmarks/bench_gpu.py (CUDA events, medians).
It writes benchmarks/results/gpu.md, prints a one-line verdict, and exits non-zero on any failure.

Without a GPU (here, in CI) it is a dry run that proves its own plumbing: it prints the build's
command and flags, runs the ptxas check for sm_90, collects the tests it would run, runs the
sanitizer program and the benchmarks on the CPU at tiny sizes, and writes its report under
build/gpu-check/ (never over the committed results). It exits 0 unless one of those fails."""

import argparse
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "gpu-check")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "gpu.md")
PYTHON = sys.executable
TEST_TARGETS = ["tests", "-m", "gpu"]


class Stage:
    def __init__(self, name):
        self.name, self.ok, self.seconds, self.summary, self.details = name, True, 0.0, "", ""


def run_stage(stages, name, fn):
    stage = Stage(name)
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        fn(stage)
    except Exception as error:  # a stage's failure is reported, and the next stage still runs
        stage.ok, stage.summary = False, f"{type(error).__name__}: {error}"
    stage.seconds = time.perf_counter() - start
    print(f"== {name}: {'ok' if stage.ok else 'FAILED'} in {stage.seconds:.1f} s  {stage.summary}", flush=True)
    stages.append(stage)
    return stage


def sh(cmd, *, env=None, log=None, check=True, capture=False):
    print("$ " + " ".join(cmd), flush=True)
    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run(cmd, cwd=ROOT, env=full_env, text=True, capture_output=capture or bool(log))
    if log:
        with open(log, "w") as f:
            f.write(result.stdout + result.stderr)
    if check and result.returncode != 0:
        tail = (result.stdout + result.stderr)[-2000:] if (capture or log) else ""
        raise RuntimeError(f"{cmd[0]} ... exited {result.returncode}\n{tail}")
    return result


# --- build ------------------------------------------------------------------------------------


def build_env(gpu):
    import torch

    arch = "{}.{}".format(*torch.cuda.get_device_capability()) if gpu else "(this GPU's, from the device)"
    return {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 1), "FUSED_MLP_CPU_VARIANTS": "native"}


BUILD_CMD = [PYTHON, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]


def stage_build(stage, gpu):
    env = build_env(gpu)
    if not gpu:
        stage.summary = "dry run: " + " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(BUILD_CMD[1:])
        return
    try:
        sh(BUILD_CMD, env=env, log=os.path.join(OUT, "build.log"))
    except RuntimeError:
        # A pip too old for editable pyproject builds: the same in-place build by setuptools itself.
        sh([PYTHON, "setup.py", "build_ext", "--inplace"], env=env, log=os.path.join(OUT, "build_setup.log"))
    stage.summary = f"built for sm_{env['TORCH_CUDA_ARCH_LIST'].replace('.', '')}"


# --- ptxas --------------------------------------------------------------------------------------


def nvcc_command(source, arch):
    import torch
    from torch.utils import cpp_extension

    includes = [os.path.join(ROOT, "csrc"), *cpp_extension.include_paths("cuda"), sysconfig.get_paths()["include"]]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # The language standard the installed torch builds extensions with (C++17 up to about 2.13, C++20
    # after), as its cpp_extension adds it to every compile.
    found = re.search(r"common_cflags \+= \['-std=(c\+\+\d+)'", inspect.getsource(cpp_extension))
    std = found.group(1) if found else "c++17"
    return [
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"),
        *(f"-I{p}" for p in includes),
        "-c",
        source,
        "-o",
        os.devnull,
        f"-std={std}",
        "-O3",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-Xptxas",
        "-v",
        "-DFUSED_MLP_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "--compiler-options",
        "-fPIC",
    ]


_FUNCTION = re.compile(r"ptxas info\s*: (?:Compiling entry function|Function properties for) '?([\w$.]+)'?")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(text):
    """{mangled name: {"registers", "smem", "stack", "spill_stores", "spill_loads", "entry"}} from
    ptxas -v output."""
    kernels, current = {}, None
    for line in text.splitlines():
        m = _FUNCTION.search(line)
        if m:
            current = kernels.setdefault(
                m.group(1), {"registers": 0, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "entry": False}
            )
            current["entry"] |= "entry function" in line
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return kernels


def demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return dict(zip(names, names))
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else dict(zip(names, names))


def short(name, width=90):
    name = re.sub(r"\(.*$", "", name)  # drop the parameter list
    return name if len(name) <= width else name[: width - 3] + "..."


def stage_ptxas(stage, gpu):
    import torch

    if not torch.version.cuda:
        raise RuntimeError("this torch has no CUDA: the device code cannot be compiled")
    arch = "".join(map(str, torch.cuda.get_device_capability())) if gpu else "90"
    sources = sorted(
        os.path.join("csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith(".cu")
    )
    jobs = max(1, min(len(sources), os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda s: sh(nvcc_command(s, arch), capture=True, check=False), sources))
    kernels = {}
    for source, result in zip(sources, results):
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source}:\n{result.stderr[-2000:]}")
        kernels.update(parse_ptxas(result.stderr))
    entries = {k: v for k, v in kernels.items() if v["entry"]}
    if not entries:
        raise RuntimeError("ptxas reported no entry functions")
    names = demangle(sorted(kernels))
    lines = [
        f"ptxas -v for sm_{arch}: {len(entries)} kernels (entry functions), {len(kernels) - len(entries)} other "
        "device functions.",
        "",
        "| kernel | registers | shared memory (bytes) | stack (bytes) | spill stores / loads (bytes) |",
        "|---|---:|---:|---:|---:|",
    ]
    for mangled in sorted(kernels, key=lambda k: names[k]):
        k = kernels[mangled]
        kind = "" if k["entry"] else " (device function)"
        lines.append(
            f"| `{short(names[mangled])}`{kind} | {k['registers']} | {k['smem']} | {k['stack']} | "
            f"{k['spill_stores']} / {k['spill_loads']} |"
        )
    stage.details = "\n".join(lines)
    print(stage.details)
    bad = [names[m] for m, k in kernels.items() if k["stack"] or k["spill_stores"] or k["spill_loads"]]
    stage.summary = (
        f"{len(entries)} kernels, at most {max(k['registers'] for k in entries.values())} registers, "
        f"spill bytes {sum(k['spill_stores'] + k['spill_loads'] for k in kernels.values())}, "
        f"stack bytes {sum(k['stack'] for k in kernels.values())}"
    )
    if bad:
        stage.ok = False
        stage.summary += "; spills or stack frames in: " + "; ".join(short(n, 60) for n in bad[:5])


# --- tests --------------------------------------------------------------------------------------


def stage_tests(stage, gpu):
    if not gpu:
        result = sh(
            [PYTHON, "-m", "pytest", *TEST_TARGETS, "--collect-only", "-q", "-p", "no:cacheprovider"], capture=True
        )
        ids = [line for line in result.stdout.splitlines() if "::" in line]
        files = sorted({i.split("::")[0] for i in ids})
        stage.counts = {"collected": len(ids)}
        stage.summary = f"dry run: would run {len(ids)} tests from {len(files)} files"
        stage.details = "Tests it would run: " + ", ".join(f"{f} ({sum(i.startswith(f) for i in ids)})" for f in files)
        print(stage.details)
        return
    junit = os.path.join(OUT, "tests.xml")
    result = sh(
        [PYTHON, "-m", "pytest", *TEST_TARGETS, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"],
        env={"FUSED_MLP_REQUIRE_EXT": "1"},
        log=os.path.join(OUT, "tests.log"),
        check=False,
    )
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    stage.counts = {"passed": total - failures - errors - skipped, "failed": failures + errors, "skipped": skipped}
    stage.summary = ", ".join(f"{v} {k}" for k, v in stage.counts.items())
    tail = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    stage.details = "\n".join(tail[:40])
    stage.ok = result.returncode == 0


# --- sanitize -----------------------------------------------------------------------------------


def sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    from torch.utils import cpp_extension

    path = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "compute-sanitizer")
    return path if os.path.exists(path) else None


def stage_sanitize(stage, gpu):
    program = [PYTHON, os.path.join("tools", "cuda_kernels_once.py")]
    if not gpu:
        sh([*program, "--device", "cpu"], capture=True)
        tools = " and ".join(f"compute-sanitizer --tool {t} --error-exitcode 1" for t in ("memcheck", "racecheck"))
        stage.summary = f"dry run: the program ran on the CPU; on a GPU, under {tools}"
        return
    tool_path = sanitizer()
    if tool_path is None:
        raise RuntimeError("compute-sanitizer not found (PATH or CUDA_HOME/bin)")
    errors = {}
    for tool in ("memcheck", "racecheck"):
        log = os.path.join(OUT, f"sanitize_{tool}.log")
        cmd = [tool_path, "--tool", tool, "--error-exitcode", "1", "--target-processes", "all", *program]
        result = sh(cmd, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, log=log, check=False)
        text = result.stdout + result.stderr
        m = re.search(r"ERROR SUMMARY: (\d+) error", text)
        errors[tool] = int(m.group(1)) if m else (0 if result.returncode == 0 else -1)
        if result.returncode != 0:
            stage.ok = False
    stage.counts = {"sanitizer errors": sum(max(v, 0) for v in errors.values())}
    stage.summary = ", ".join(f"{t}: {'did not finish' if n < 0 else f'{n} errors'}" for t, n in errors.items())


# --- bench --------------------------------------------------------------------------------------


def stage_bench(stage, gpu):
    out = os.path.join(OUT, "bench.json")
    args = ["--out", out] + ([] if gpu else ["--device", "cpu", "--tiny"])
    sh([PYTHON, "-m", "benchmarks.bench_gpu", *args], log=os.path.join(OUT, "bench.log"))
    with open(out) as f:
        report = json.load(f)
    stage.details = report["markdown"]
    speedups = [r for r in report["training_step"] if r.get("batch") == (64 if gpu else 64)]
    ms = speedups[0]["ms"] if speedups else {}
    if "eager" in ms and "TrainStep" in ms:
        best = min(v for k, v in ms.items() if k.startswith("TrainStep"))
        stage.counts = {"step speed-up over eager at batch 64": f"{ms['eager'] / best:.2f}x"}
    stage.summary = "dry run on the CPU at tiny sizes" if not gpu else "see the tables"


# --- report -------------------------------------------------------------------------------------


def report(stages, gpu):
    import torch

    device = torch.cuda.get_device_name() if gpu else "no GPU (dry run)"
    lines = [
        "# fused_mlp on a GPU: `make gpu-check`",
        "",
        f"Device: {device}. torch {torch.__version__}, CUDA {torch.version.cuda}, Python {sys.version.split()[0]}.",
        "",
        "| stage | result | seconds |",
        "|---|---|---:|",
        *(f"| {s.name} | {'ok' if s.ok else 'FAILED'}: {s.summary} | {s.seconds:.1f} |" for s in stages),
        "",
    ]
    for s in stages:
        if s.details:
            lines += [f"## {s.name}", "", s.details, ""]
    path = RESULTS if gpu else os.path.join(OUT, "gpu.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the dry run even where a GPU is present")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    os.makedirs(OUT, exist_ok=True)
    if not gpu:
        print("gpu-check: needs a CUDA GPU; none here, so a dry run of its own plumbing.", flush=True)
    start = time.perf_counter()
    stages = []
    run_stage(stages, "build", lambda s: stage_build(s, gpu))
    run_stage(stages, "ptxas", lambda s: stage_ptxas(s, gpu))
    if gpu and not stages[0].ok:
        print("gpu-check: the build failed; the stages that need it are skipped.")
    else:
        for name, fn in (("tests", stage_tests), ("sanitize", stage_sanitize), ("bench", stage_bench)):
            run_stage(stages, name, lambda s, fn=fn: fn(s, gpu))
    path = report(stages, gpu)
    counts = {}
    for s in stages:
        counts.update(getattr(s, "counts", {}))
    failed = [s.name for s in stages if not s.ok]
    verdict = "FAILED (" + ", ".join(failed) + ")" if failed else "ok"
    facts = "; ".join(f"{k}: {v}" for k, v in counts.items())
    mode = "" if gpu else "dry run, "
    print(f"gpu-check: {verdict}; {mode}{facts}; {time.perf_counter() - start:.0f} s in all; report {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
