"""The package layout is the architecture (ARCHITECTURE.md §2): the folder says which process
a module runs in, and no import crosses between the sidecar's side and the engines' side."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lmkv_mp"
SIDECAR = ("lmkv_mp.sidecar",)
ENGINE = ("lmkv_mp.engine", "lmkv_mp.integration")
SHARED = ("lmkv_mp.wire", "lmkv_mp.memory", "lmkv_mp.config")


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every lmkv_mp module a file imports, at any depth (late imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lmkv_mp")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmkv_mp"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return found


MODULES = {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if under(m, SIDECAR + ENGINE + SHARED)))
def test_no_import_crosses_between_the_sidecar_and_the_engines(module: str) -> None:
    imported = MODULES[module]
    if under(module, SIDECAR):
        assert not [i for i in imported if under(i, ENGINE)], f"{module} (sidecar) imports the engine side"
    if under(module, ENGINE):
        assert not [i for i in imported if under(i, SIDECAR)], f"{module} (engine side) imports the sidecar"
    if under(module, SHARED):
        assert not [i for i in imported if under(i, SIDECAR + ENGINE)], f"{module} (shared) imports one side"


def test_every_folder_is_a_package() -> None:
    """A folder without __init__.py is left out of a wheel by setuptools' find_packages."""
    missing = [str(d) for d in PKG.rglob("*") if d.is_dir() and any(d.glob("*.py"))
               and not (d / "__init__.py").exists()]
    assert not missing


@pytest.mark.parametrize("old, new, name", [
    ("lmkv_mp.client", "lmkv_mp.engine.client", "SidecarClient"),
    ("lmkv_mp.transfer", "lmkv_mp.engine.paged", "PagedKV"),
    ("lmkv_mp.protocol", "lmkv_mp.wire.protocol", "encode_reply"),
])
def test_old_import_paths_still_work_for_one_release(old: str, new: str, name: str) -> None:
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)
