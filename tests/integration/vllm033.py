"""A cached virtualenv holding the vLLM 0.33.0 wheel, for checking the connector's API
against a vLLM release that cannot run here (0.33.0 is a CUDA build; this machine is CPU only).

The venv imports vLLM's connector modules and nothing else works in it: torch is the CPU
wheel 2.13.0 (0.33.0 asks for 2.14.0; the connector modules import on either), vllm is
installed with ``--no-deps``, and only the pure-Python packages that
``vllm.distributed.kv_transfer.kv_connector.v1.base`` and ``...kv_connector.factory`` import
at module level are added, at the versions vLLM's own metadata asks for. lmkv_mp is not
installed there: callers put the checkout on ``PYTHONPATH`` (an editable install would build
the C extensions into the checkout and tie the cached venv to one checkout's path).

Built once at ``$LMKV_VLLM033_VENV`` (default ``~/.cache/lmkv/vllm-0.33.0-venv``); a stamp
file holding a digest of everything installed skips the build next time, and a change to
that list rebuilds it. ``python -m tests.integration.vllm033 [--rebuild]`` builds it and
prints the interpreter's path and how long that took.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import Distribution
from pathlib import Path

from packaging.requirements import Requirement

VLLM_VERSION = "0.33.0"
# Pinned: an unpinned torch resolves to a CUDA build (several GB).
TORCH = "torch==2.13.0"
# Distribution names of what vLLM 0.33.0's connector base and factory import at module level
# (found by trial: import, install what is missing, repeat). Versions come from vLLM's metadata.
VLLM_IMPORT_DEPS = (
    "aiohttp", "cachetools", "cbor2", "cloudpickle", "fastapi", "llguidance", "msgspec", "numpy", "openai",
    "oss-harmony", "partial-json-parser", "pillow", "prometheus_client", "psutil", "py-cpuinfo", "pybase64",
    "pyzmq", "regex", "requests", "transformers", "uvloop",
)
# xgrammar is imported too, but its requirements pull triton (1 GB) that the import never
# needs: it goes in with --no-deps, with what its import does need.
NO_DEPS = ("xgrammar", "apache-tvm-ffi")
# Generous: the first build downloads the 340 MB vllm wheel and ~300 MB of torch.
BUILD_TIMEOUT = 1800.0
STAMP = ".lmkv-installed"

REPO = Path(__file__).resolve().parents[2]


class VenvUnavailable(RuntimeError):
    """The venv could not be built (typically: no package index reachable)."""


def venv_dir() -> Path:
    return Path(os.environ.get("LMKV_VLLM033_VENV") or Path.home() / ".cache" / "lmkv" / f"vllm-{VLLM_VERSION}-venv")


def _lmkv_requirements() -> list[str]:
    """lmkv_mp's runtime dependencies from pyproject.toml, less torch (pinned above)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if Requirement(d).name != "torch"]


def _plan() -> dict[str, object]:
    """Everything the build installs; its digest is the stamp."""
    return {"python": sys.version.split()[0], "torch": TORCH, "vllm": VLLM_VERSION,
            "vllm_deps": list(VLLM_IMPORT_DEPS), "no_deps": list(NO_DEPS), "lmkv": _lmkv_requirements()}


def _stamp_text() -> str:
    return hashlib.sha256(json.dumps(_plan(), sort_keys=True).encode()).hexdigest()


def _pinned_by_vllm(python: Path, names: tuple[str, ...]) -> list[str]:
    """``names`` with the version specifiers that the installed vllm's metadata gives them."""
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    dist = Distribution.at(Path(site) / f"vllm-{VLLM_VERSION}.dist-info")
    wanted = {Requirement(n).name.lower().replace("_", "-"): n for n in names}
    found: dict[str, str] = {}
    for line in dist.requires or ():
        req = Requirement(line)
        key = req.name.lower().replace("_", "-")
        if key in wanted and (req.marker is None or req.marker.evaluate({"extra": ""})):
            found[key] = f"{req.name}{req.specifier}"
    return [found.get(key, name) for key, name in wanted.items()]


def _run(log: list[str], *argv: str, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise VenvUnavailable(f"building the vLLM {VLLM_VERSION} venv took over {BUILD_TIMEOUT:g}s")
    log.append("$ " + " ".join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired as e:
        raise VenvUnavailable(f"timed out after {BUILD_TIMEOUT:g}s: {' '.join(argv)}") from e
    log.append(proc.stdout + proc.stderr)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise VenvUnavailable(f"{' '.join(argv[:6])} ... exited {proc.returncode}:\n{tail}")


def _build(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUILD_TIMEOUT
    log: list[str] = []
    python = root / "bin" / "python"
    pip = (str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check")
    try:
        _run(log, sys.executable, "-m", "venv", str(root), deadline=deadline)
        _run(log, *pip, TORCH, deadline=deadline)
        _run(log, *pip, "--no-deps", f"vllm=={VLLM_VERSION}", deadline=deadline)
        # The constraint keeps torch where it is: a dependency asking for another torch fails
        # the install instead of replacing the CPU wheel with a CUDA one.
        constraint = root / "torch-constraint.txt"
        constraint.write_text(TORCH + "\n")
        _run(log, *pip, "-c", str(constraint), *_pinned_by_vllm(python, VLLM_IMPORT_DEPS), *_lmkv_requirements(),
             deadline=deadline)
        _run(log, *pip, "--no-deps", *_pinned_by_vllm(python, NO_DEPS), deadline=deadline)
    finally:
        (root.parent / f"{root.name}.log").write_text("\n".join(log))
    (root / STAMP).write_text(_stamp_text())


def ensure_venv(rebuild: bool = False) -> Path:
    """The venv's python, building the venv first unless its stamp is current.

    Raises :class:`VenvUnavailable` when it cannot be built; the pip output of the last try
    is kept beside the venv (``<venv>.log``). Concurrent callers wait for one build."""
    root = venv_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = root / STAMP
        if rebuild or not stamp.exists() or stamp.read_text() != _stamp_text():
            try:
                _build(root)
            except OSError as e:
                raise VenvUnavailable(f"cannot build {root}: {e}") from e
    return root / "bin" / "python"


def main() -> None:
    start = time.monotonic()
    python = ensure_venv(rebuild="--rebuild" in sys.argv[1:])
    print(json.dumps({"python": str(python), "seconds": round(time.monotonic() - start, 1)}))


if __name__ == "__main__":
    main()
