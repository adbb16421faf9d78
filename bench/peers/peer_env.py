"""Each peer lives in its own virtual environment under bench/peers/, never in lmkv_mp's.

``ensure_venv(name)`` creates ``bench/peers/.venv-<name>`` from ``requirements-<name>.txt``
beside this file the first time (and again whenever that file changes), and returns the
venv's python. The requirements are exact pins installed with ``--no-deps``, so what runs is
what was tested, whatever the peer's own metadata asks for. torch is pinned to the CPU
wheel this machine carries; an unpinned torch would pull a multi-GB CUDA build.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def venv_dir(name: str) -> Path:
    return HERE / f".venv-{name}"


def venv_python(name: str) -> Path:
    return venv_dir(name) / "bin" / "python"


def _digest(name: str) -> str:
    return hashlib.sha256((HERE / f"requirements-{name}.txt").read_bytes()).hexdigest()


def venv_ready(name: str) -> bool:
    """True if the venv is installed from the current requirements file."""
    stamp = venv_dir(name) / ".requirements.sha256"
    return stamp.exists() and stamp.read_text().strip() == _digest(name) and venv_python(name).exists()


def ensure_venv(name: str, log=print) -> Path:
    """The venv's python, installing the venv first if it is missing or out of date."""
    if venv_ready(name):
        return venv_python(name)
    req = HERE / f"requirements-{name}.txt"
    log(f"installing peer '{name}' into {venv_dir(name)} (once)")
    # The base interpreter, not lmkv_mp's venv: the peer must not see lmkv_mp's packages.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv_dir(name))], check=True)
    pip = [str(venv_python(name)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", "-r", str(req)], check=True, stdout=sys.stderr)
    (venv_dir(name) / ".requirements.sha256").write_text(_digest(name) + "\n")
    return venv_python(name)

