"""One logger tree: every module of the package logs under ``lmkv`` (``lmkv.client``,
``lmkv.kernels``, ...), the logger the vLLM connector hands vLLM's handlers to. A module
logging under ``__name__`` (``lmkv_mp.*``) would go past them: in a vLLM process its
warnings (the kernels' fallback, the hashing C extension not built) were lost."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch

import lmkv_mp
from lmkv_mp.engine import kernels
from lmkv_mp.engine.kernels import KernelCopier
from tests.engine.test_paged import make

PACKAGE = Path(lmkv_mp.__file__).parent
ROOT = "lmkv"
# getLogger calls that are not a module's own logger, and why.
NOT_OURS = {
    ("integration/vllm.py", "vllm"),  # vLLM's logger: whose handlers lmkv's logs are given
}


def logger_names() -> list[tuple[str, str]]:
    """(module path, logger name) of every ``getLogger(...)`` call in the package; the name
    is the literal, or the source text where it is not one (``__name__``, say)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "getLogger":
                arg = node.args[0] if node.args else None
                name = arg.value if isinstance(arg, ast.Constant) else ast.unparse(arg) if arg else "<root>"
                found.append((path.relative_to(PACKAGE).as_posix(), str(name)))
    return found


def test_every_module_logs_under_the_one_tree() -> None:
    names = logger_names()
    assert ("engine/kernels.py", "lmkv.kernels") in names and ("wire/keys.py", "lmkv.keys") in names
    strays = [(m, n) for m, n in names
              if (m, n) not in NOT_OURS and not (n == ROOT or n.startswith(ROOT + "."))]
    assert strays == [], f"loggers outside the {ROOT!r} tree (name them {ROOT}.<area>)"


class _Caught(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_kernels_fallback_warning_reaches_a_handler_on_the_trees_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the connector sets up in a vLLM process: a handler on ``lmkv`` that does not
    propagate to the root logger."""
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "_logged", set())
    root, caught = logging.getLogger(ROOT), _Caught()
    monkeypatch.setattr(root, "propagate", False)
    root.addHandler(caught)
    try:
        paged = make("flash-hnd", torch.bfloat16, seed=8)
        paged.device = torch.device("cuda", 0)  # no GPU here: the copier falls back, once, with a warning
        assert not KernelCopier(paged).uses_kernels
    finally:
        root.removeHandler(caught)
    assert [r.name for r in caught.records] == ["lmkv.kernels"]
    assert "torch path" in caught.records[0].getMessage()
