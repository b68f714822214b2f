"""`make compat`: the package against other torch releases than the pinned one.

    python tools/compat.py 2.11.0 2.15.0

For each version: a venv of its own (build/compat/torch-<version>/venv) with that torch and the
test tools, a copy of the tree (build/compat/torch-<version>/src: the files git tracks or would
track), the extension built in place there for the CPU (FUSED_MLP_CPU_ONLY=1), and the CPU parity
tests (-m cpu_parity) against it, the extension required. The copy keeps the working tree's own
build untouched. Each torch from the registry is a CUDA build of a few GB, which is why this runs
outside `make test`. Exits non-zero if any version fails to install, build or pass."""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_TOOLS = ["numpy", "setuptools", "wheel", "ninja", "pytest", "pytest-timeout", "expecttest"]


def sh(cmd, cwd=ROOT, env=None):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, env=dict(os.environ, **(env or {})), check=True)


def copy_tree(dest):
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    os.makedirs(dest, exist_ok=True)
    pack = subprocess.Popen(
        ["tar", "--null", "-T", "-", "-cf", "-"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    unpack = subprocess.Popen(["tar", "-xf", "-"], cwd=dest, stdin=pack.stdout)
    pack.stdin.write(files)
    pack.stdin.close()
    if unpack.wait() != 0 or pack.wait() != 0:
        raise RuntimeError(f"copying the tree to {dest} failed")


def check(version):
    home = os.path.join(ROOT, "build", "compat", f"torch-{version}")
    venv, src = os.path.join(home, "venv"), os.path.join(home, "src")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        sh([sys.executable, "-m", "venv", venv])
    # A constraint file configured on the machine (a cap on torch) would refuse the version asked for.
    sh(
        [python, "-m", "pip", "install", "--quiet", f"torch=={version}", *TEST_TOOLS],
        env={"PIP_CONSTRAINT": os.devnull},
    )
    copy_tree(src)
    start = time.perf_counter()
    sh([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], cwd=src,
       env={"FUSED_MLP_CPU_ONLY": "1"})  # fmt: skip
    print(f"compat: torch {version}: built in {time.perf_counter() - start:.0f} s", flush=True)
    data = os.environ.get("FUSED_MLP_DATA") or os.path.join(ROOT, "..", "shared", "data")
    sh([python, "-m", "pytest", "tests", "-m", "cpu_parity", "-q", "-p", "no:cacheprovider"], cwd=src,
       env={"FUSED_MLP_REQUIRE_EXT": "1", "FUSED_MLP_DATA": os.path.abspath(data)})  # fmt: skip


def main(argv):
    if not argv:
        print("usage: tools/compat.py VERSION [VERSION ...]", file=sys.stderr)
        return 2
    failed = []
    for version in argv:
        try:
            check(version)
            print(f"compat: torch {version}: ok", flush=True)
        except (subprocess.CalledProcessError, RuntimeError) as error:
            print(f"compat: torch {version}: FAILED ({error})", flush=True)
            failed.append(version)
    print("compat: " + (f"FAILED for torch {', '.join(failed)}" if failed else f"ok for torch {', '.join(argv)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
