"""The connector against vLLM 0.33.0's connector API, with no engine: 0.33.0 is a CUDA
release that cannot run here, so its wheel sits in a venv of its own
(tests/integration/vllm033.py) and tests/integration/vllm_api_check.py inspects our class
there. Every hook we override must keep the base's signature, none may be left abstract, and
vLLM's factory must resolve the class from ``kv_connector_module_path``.

Without a package index the venv cannot be built: the tests skip, except in CI (CI=true),
where they fail. The first build takes a minute or more; later runs reuse the venv.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.vllm033 import REPO, VLLM_VERSION, VenvUnavailable, ensure_venv

pytestmark = pytest.mark.slow

CHECKER = Path(__file__).resolve().parent / "vllm_api_check.py"
# A cold `import vllm` (with torch and transformers) has taken ~15 s on a busy 2-core box.
CHECK_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def vllm033_python() -> Path:
    try:
        return ensure_venv()
    except VenvUnavailable as e:
        msg = f"cannot build the vLLM {VLLM_VERSION} venv (needs a package index): {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def run_check(python: Path, *args: str, path: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The checker's findings for the class named by ``args`` (default: LMKVConnector), with
    this checkout (and ``path``) on PYTHONPATH and none of the caller's LMKV_* settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LMKV_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (*path, REPO))
    proc = subprocess.run([str(python), str(CHECKER), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=CHECK_TIMEOUT)
    assert proc.returncode == 0, f"checker exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "import_error" not in found, found["import_error"]
    return found


def test_connector_matches_the_vllm_033_connector_api(vllm033_python: Path) -> None:
    found = run_check(vllm033_python)
    assert found["vllm_version"] == VLLM_VERSION
    assert Path(found["connector_file"]).resolve().is_relative_to(REPO), "checked another copy of lmkv_mp"
    assert found["connector_is_v1"]
    assert found["signature_problems"] == {}
    assert found["unknown_public"] == [], "hooks that vLLM 0.33.0 never calls"
    assert found["abstract_left"] == []
    assert found["factory"] == {"resolved": "lmkv_mp.integration.vllm.LMKVConnector", "is_class": True,
                                "supports_hma": False}


BROKEN = '''
from lmkv_mp.integration.vllm import LMKVConnector


class BrokenConnector(LMKVConnector):
    def get_finished(self, done):  # renamed parameter
        return None, None

    def request_finished(self, request, block_ids, why):  # extra required parameter
        return False, None

    def get_num_new_matched_tokens(self, request, num_computed_tokens, hint=None):  # extra optional: fine
        return 0, False

    def reset_cache(self, everything=False):  # extra optional: fine
        return True

    @classmethod
    def shutdown(cls):  # classmethod where the base has a method
        return None

    def unregister_kv_cache(self):  # misspelt hook: vLLM never calls it
        return None
'''


def test_the_checker_reports_a_broken_override(vllm033_python: Path, tmp_path: Path) -> None:
    """The check can fail: a subclass with wrong overrides is reported, name by name."""
    (tmp_path / "broken_connector.py").write_text(BROKEN)
    found = run_check(vllm033_python, "broken_connector", "BrokenConnector", path=(tmp_path,))
    problems = found["signature_problems"]
    assert sorted(problems) == ["get_finished", "request_finished", "shutdown"], problems
    assert any("do not match" in p for p in problems["get_finished"])
    assert any("'why' has no default" in p for p in problems["request_finished"])
    assert "classmethod" in problems["shutdown"][0]
    assert found["unknown_public"] == ["unregister_kv_cache"]
    assert found["our_classes"] == ["BrokenConnector", "LMKVConnector"]
    assert found["factory"]["resolved"] == "broken_connector.BrokenConnector"
