"""Checks a KV connector class against the vLLM installed in the interpreter that runs this
script, without building an engine: ``python vllm_api_check.py [MODULE [CLASS]]`` (default
``lmkv_mp.integration.vllm LMKVConnector``) prints one JSON object as its last stdout line.

Found and reported:

- ``signature_problems``: {name: [problem, ...]} for each attribute that one of the
  connector's own classes (those not from vLLM) defines and that a vLLM class in its MRO
  defines too, where the two differ in kind (method, classmethod, staticmethod, property) or
  in signature. Compatible means: the base's parameters, in order, with the same names,
  kinds and optionality (``*args``/``**kwargs`` match by kind); the override may add
  parameters only if they have defaults and come after the base's positional ones.
- ``unknown_public``: public attributes the connector defines that no vLLM base has (a hook
  that this vLLM renamed or dropped; vLLM would never call it).
- ``abstract_left``: abstract methods still unimplemented.
- ``not_overridden``: the bases' public methods and properties the connector leaves as they are.
- ``factory``: what ``KVConnectorFactory.get_connector_class`` resolves for
  ``kv_connector=CLASS, kv_connector_module_path=MODULE`` (the same call
  ``create_connector`` makes before it constructs the connector), or the error it raised.

An import failure is reported as ``{"import_error": ...}``: it is a finding, not a crash.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import traceback
from typing import Any

VAR = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def is_vllm(cls: type) -> bool:
    return cls.__module__ == "vllm" or cls.__module__.startswith("vllm.")


def kind_of(attr: Any) -> str:
    if isinstance(attr, staticmethod):
        return "staticmethod"
    if isinstance(attr, classmethod):
        return "classmethod"
    if isinstance(attr, property):
        return "property"
    if inspect.isfunction(attr):
        return "method"
    return type(attr).__name__


def parameters(attr: Any, kind: str) -> list[inspect.Parameter]:
    """The parameters a caller passes (without self or cls)."""
    params = list(inspect.signature(getattr(attr, "__func__", attr)).parameters.values())
    return params[1:] if kind in ("method", "classmethod") else params


def describe(params: list[inspect.Parameter]) -> str:
    """Names, kinds and defaults; annotations are left out (many are strings here)."""
    return "(" + ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in params) + ")"


def signature_problems(ours: list[inspect.Parameter], base: list[inspect.Parameter]) -> list[str]:
    problems = []
    base_names = {p.name for p in base if p.kind not in VAR}
    base_vars = {p.kind for p in base if p.kind in VAR}
    extra = [p for p in ours if p.kind not in VAR and p.name not in base_names]
    for p in extra:
        if p.default is inspect.Parameter.empty:
            problems.append(f"extra parameter {p.name!r} has no default")
    # What a caller of the base's signature binds to: the base's own names and the var kinds
    # it has; the override's extra optional parameters and extra *args/**kwargs are left out.
    kept = [p for p in ours if (p.name in base_names and p.kind not in VAR) or p.kind in base_vars]
    if [(p.kind, p.name if p.kind not in VAR else "*") for p in kept] != \
            [(p.kind, p.name if p.kind not in VAR else "*") for p in base]:
        problems.append(f"parameters {describe(ours)} do not match the base's {describe(base)}")
    last_positional = max((ours.index(p) for p in kept if p.kind in POSITIONAL), default=-1)
    for p in extra:
        if p.kind in POSITIONAL and ours.index(p) < last_positional:
            problems.append(f"extra parameter {p.name!r} comes before the base's positional parameters")
    by_name = {p.name: p for p in ours}
    for b in base:
        o = by_name.get(b.name)
        if b.kind not in VAR and b.default is not inspect.Parameter.empty and o is not None \
                and o.default is inspect.Parameter.empty:
            problems.append(f"parameter {b.name!r} is optional in the base but required here")
    return problems


def check(module_path: str, class_name: str) -> dict[str, Any]:
    import vllm
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    module = importlib.import_module(module_path)
    cls = getattr(module, class_name)
    ours = [c for c in cls.__mro__ if not is_vllm(c) and c.__module__ not in ("builtins", "abc", "typing")]
    bases = [c for c in cls.__mro__ if is_vllm(c)]

    def base_attr(name: str) -> tuple[type, Any] | None:
        return next(((b, b.__dict__[name]) for b in bases if name in b.__dict__), None)

    found: dict[str, Any] = {
        "vllm_version": vllm.__version__, "vllm_file": vllm.__file__, "connector_file": inspect.getfile(cls),
        "connector_is_v1": issubclass(cls, KVConnectorBase_V1), "our_classes": [c.__qualname__ for c in ours],
        "vllm_bases": [f"{b.__module__}.{b.__qualname__}" for b in bases],
        "overrides": {}, "signature_problems": {}, "unknown_public": [], "not_overridden": [],
    }
    defined: set[str] = set()
    for our in ours:
        for name, attr in our.__dict__.items():
            if name in defined or (name.startswith("__") and name != "__init__"):
                continue
            kind = kind_of(attr)
            if kind not in ("method", "classmethod", "staticmethod", "property"):
                continue
            defined.add(name)
            hit = base_attr(name)
            if hit is None:
                if not name.startswith("_"):
                    found["unknown_public"].append(name)
                continue
            base_cls, battr = hit
            bkind = kind_of(battr)
            entry = {"base": base_cls.__qualname__, "kind": kind}
            problems = [] if kind == bkind else [f"is a {kind} here but a {bkind} in {base_cls.__qualname__}"]
            if not problems and kind != "property":
                ours_p, base_p = parameters(attr, kind), parameters(battr, bkind)
                entry.update(ours=describe(ours_p), base_signature=describe(base_p))
                problems = signature_problems(ours_p, base_p)
            found["overrides"][name] = entry
            if problems:
                found["signature_problems"][name] = problems
    found["not_overridden"] = sorted(
        {name for b in bases for name, attr in b.__dict__.items()
         if not name.startswith("_") and name not in defined
         and kind_of(attr) in ("method", "classmethod", "staticmethod", "property")})
    found["abstract_left"] = sorted(getattr(cls, "__abstractmethods__", ()))

    try:
        ktc = KVTransferConfig(kv_connector=class_name, kv_connector_module_path=module_path, kv_role="kv_both")
        resolved = KVConnectorFactory.get_connector_class(ktc)
        found["factory"] = {"resolved": f"{resolved.__module__}.{resolved.__qualname__}",
                            "is_class": resolved is cls,
                            "supports_hma": bool(KVConnectorFactory.supports_hma_config(ktc))}
    except Exception as e:  # the finding is the error itself
        found["factory"] = {"error": f"{type(e).__name__}: {e}"}
    return found


def main(argv: list[str]) -> None:
    module_path = argv[0] if argv else "lmkv_mp.integration.vllm"
    class_name = argv[1] if len(argv) > 1 else "LMKVConnector"
    try:
        found = check(module_path, class_name)
    except ImportError:
        found = {"import_error": traceback.format_exc()}
    print(json.dumps(found))


if __name__ == "__main__":
    main(sys.argv[1:])
