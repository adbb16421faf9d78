"""What a user gets from a plain (non-editable) install: a wheel built from this tree and
installed into a fresh venv carries every subpackage, both C extensions and the CUDA kernel
sources that engine/kernels.py compiles with NVRTC where no prebuilt cubin matches."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import need_c_extension

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib, json, pkgutil, sys
import lmkv_mp
from lmkv_mp.engine import kernels
names = [m.name for m in pkgutil.walk_packages(lmkv_mp.__path__, "lmkv_mp.")
         if not m.name.endswith("__main__") and not m.name.startswith("lmkv_mp.integration.vllm")]
for name in names:
    importlib.import_module(name)
from lmkv_mp.wire import keys
from lmkv_mp.engine import paged
print(json.dumps({"file": lmkv_mp.__file__, "cuda_dir": str(kernels.CUDA_DIR),
                  "sources": sorted(p.name for p in kernels.CUDA_DIR.iterdir()),
                  "source_hash": kernels.source_hash(), "modules": len(names),
                  "chain_c": keys._chain is not None, "rows_c": paged._rows is not None}))
"""


def test_a_wheel_installed_into_a_fresh_venv_has_the_whole_package(tmp_path: Path) -> None:
    src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    # Built from a copy of the files git knows (a clone's), so no build/ or built .so of
    # this checkout can stand in for what the wheel lacks.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(src)], check=True, timeout=300)
    wheel = next(dist.glob("lmkv_mp-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies come from this interpreter's site-packages (a path, not a site dir, so
    # its .pth files, this checkout's editable install among them, are not read).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True, timeout=300)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK], check=True, capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(site)), got["file"]  # the installed copy, not this checkout
    assert {"gather.cu", "scatter.cu", "paged_copy.cuh"} <= set(got["sources"])
    sys.path.insert(0, str(ROOT))
    try:
        from lmkv_mp.engine import kernels
        assert got["source_hash"] == kernels.source_hash()
    finally:
        sys.path.remove(str(ROOT))
    need_c_extension("wire._chain", got["chain_c"])
    need_c_extension("engine._rows", got["rows_c"])
