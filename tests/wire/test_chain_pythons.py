"""lmkv_mp/wire/_chain.c reads ints through CPython internals that differ by version (one-digit
``ob_digit`` before 3.12, the compact-value API from 3.12): built against every other
CPython 3.10+ found on this machine, it must pack and hash exactly as that interpreter's
struct and hashlib do. CI runs 3.11 alone; users run vLLM on 3.12 too. Skipped where no
other interpreter or no C compiler is found."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = r'''
import hashlib, os, random, struct, sys
sys.path.insert(0, sys.argv[1])
import _chain
rng = random.Random(1)
class MyInt(int):
    pass
bad = 0
for _ in range(2000):
    toks = [rng.choice([rng.randint(0, 200000), rng.randint(-(2**31), 2**31 - 1), -rng.randint(0, 2**30),
                        MyInt(rng.randint(0, 999)), True, 2**30, -(2**30) - 1, 2**31 - 1, -(2**31)])
            for _ in range(rng.randint(0, 200))]
    bad += _chain.pack_tokens(toks) != struct.pack(f"<{len(toks)}i", *toks)
for v in (2**31, -(2**31) - 1, 2**70):
    try:
        _chain.pack_tokens([1, v])
        bad += 1
    except OverflowError:
        pass
key = os.urandom(32)
for step in (4, 68, 1024):
    for n in range(12):
        raw, prev, out = os.urandom(step * n), os.urandom(16), b""
        first = prev
        for i in range(n):
            d = hashlib.blake2b(raw[i * step:(i + 1) * step], digest_size=32).digest()
            prev = hashlib.blake2b(prev + d, digest_size=16, key=key).digest()
            out += prev
        bad += sum(_chain.chain(raw, step, n, key, first, 16, lanes) != out for lanes in (8, 4, 1))
print("mismatches", bad)
'''


def other_pythons() -> list[str]:
    found: dict[str, str] = {}
    candidates = [shutil.which(f"python3.{m}") for m in range(10, 15)]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False).stdout.strip()
        candidates += [str(p) for p in sorted(Path(root, "versions").glob("3.1[0-9]*/bin/python"))] if root else []
    for exe in filter(None, candidates):
        probe = subprocess.run([exe, "-c", "import sys, sysconfig; print(sys.version_info[:2], "
                                "sysconfig.get_paths()['include'], sysconfig.get_config_var('EXT_SUFFIX'))"],
                               capture_output=True, text=True, check=False)
        if probe.returncode == 0 and not probe.stdout.startswith(str(tuple(sys.version_info[:2]))):
            found.setdefault(probe.stdout.split(")")[0], exe)
    return list(found.values())


PYTHONS = other_pythons()


@pytest.mark.skipif(not PYTHONS or shutil.which("gcc") is None, reason="no other CPython 3.10+ or no gcc here")
@pytest.mark.parametrize("python", PYTHONS or ["none"])
def test_chain_extension_is_exact_on_other_pythons(python: str, tmp_path: Path) -> None:
    include, suffix = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['include'], sysconfig.get_config_var('EXT_SUFFIX'))"],
        capture_output=True, text=True, check=True).stdout.split()
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", f"-I{include}",
                    str(ROOT / "lmkv_mp" / "wire" / "_chain.c"), "-o", str(tmp_path / f"_chain{suffix}")], check=True)
    run = subprocess.run([python, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["mismatches", "0"], run.stdout
