"""Checks that keep the files in ``launch/`` true.

Static: ``serve.sh`` parses (``bash -n``, and shellcheck where installed); the connector JSON
it hands vLLM names our connector; the YAML files parse; the Kubernetes manifests agree with
themselves (run dir, /dev/shm, UID, pool size vs memory, liveness probe) and with
:func:`lmkv_mp.config.load_sidecar_config`; the systemd unit's ExecStart and Environment= are
accepted by the same loader (and ``systemd-analyze verify`` finds nothing, where installed).

Live: ``launch/serve.sh`` is run for real with a fake ``vllm`` on PATH (a shell script that
records its arguments and asks the sidecar for stats): it starts a sidecar, wires vLLM to it
and stops it afterwards; it reuses and leaves alone a sidecar that was already running; it
forwards SIGTERM to vLLM; it fails cleanly when the sidecar cannot start.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

from lmkv_mp.config import load_sidecar_config, parse_size
from lmkv_mp.memory import shm_name_for
from tests.conftest import (
    BIN,
    READY_TIMEOUT,
    SidecarHandle,
    clean_env,
    stop_process,
    unlink_shm,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SERVE = LAUNCH / "serve.sh"
UNIT = LAUNCH / "lmkv-sidecar.service"
POD = LAUNCH / "k8s" / "vllm-with-lmkv.yaml"
DAEMONSET = LAUNCH / "k8s" / "lmkv-daemonset.yaml"
PROMETHEUS = LAUNCH / "prometheus-scrape.yml"
YAML_FILES = (POD, DAEMONSET, PROMETHEUS)

CONNECTOR = {"kv_connector": "LMKVConnector", "kv_connector_module_path": "lmkv_mp.integration.vllm",
             "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}

# serve.sh runs: a sidecar start (a Python start-up, slow on a loaded box), a few lmkv-stats
# calls, the fake vllm and the sidecar's stop.
SERVE_TIMEOUT = 3 * READY_TIMEOUT


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is not installed; the YAML checks need it")


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in _yaml().safe_load_all(path.read_text()) if d is not None]


# ---- serve.sh, static ----------------------------------------------------------------------


def test_serve_sh_parses() -> None:
    r = subprocess.run(["bash", "-n", str(SERVE)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(SERVE, os.X_OK), "launch/serve.sh must be executable"


def test_serve_sh_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    r = subprocess.run(["shellcheck", "-x", str(SERVE)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _serve_kv_transfer_config() -> dict[str, Any]:
    m = re.search(r"^readonly DEFAULT_KV_TRANSFER_CONFIG='([^']*)'$", SERVE.read_text(), re.MULTILINE)
    assert m, "serve.sh no longer defines DEFAULT_KV_TRANSFER_CONFIG='...'"
    return json.loads(m.group(1))


def test_serve_kv_transfer_config_names_the_connector() -> None:
    cfg = _serve_kv_transfer_config()
    assert cfg == CONNECTOR
    # The module path really holds the class (read, not imported: importing needs vllm).
    src = (ROOT / "lmkv_mp" / "integration" / "vllm.py").read_text()
    assert re.search(rf"^class {cfg['kv_connector']}\(", src, re.MULTILINE)


# ---- YAML ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path: Path) -> None:
    docs = _load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", [])}


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    """mountPath -> volume name."""
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def _uid(pod_spec: dict[str, Any], container: dict[str, Any]) -> int:
    return container.get("securityContext", {}).get("runAsUser", pod_spec.get("securityContext", {}).get("runAsUser"))


def _by_name(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(c for c in containers if c["name"] == name)


def _check_sidecar_container(c: dict[str, Any]) -> None:
    """Command, probes and memory of an lmkv-sidecar container; its settings load."""
    assert c["command"][0] == "lmkv-sidecar"
    cfg = load_sidecar_config(c["command"][1:] + c.get("args", []), _env(c))  # must not raise
    assert c["livenessProbe"]["exec"]["command"][:2] == ["lmkv-stats", "--json"]
    for res in ("requests", "limits"):
        memory = parse_size(c["resources"][res]["memory"])
        assert memory >= cfg.host_pool_size, f"the sidecar's memory {res} must count the pool"


def _check_vllm_container(c: dict[str, Any]) -> None:
    args = [*c["command"], *c.get("args", [])]
    assert args[:2] == ["vllm", "serve"]
    assert json.loads(args[args.index("--kv-transfer-config") + 1]) == CONNECTOR


def test_pod_sidecar_manifest_is_consistent() -> None:
    (deploy,) = _load_all(POD)
    spec = deploy["spec"]["template"]["spec"]
    containers = _containers(spec)
    side, vllm = _by_name(containers, "lmkv-sidecar"), _by_name(containers, "vllm")
    _check_sidecar_container(side)
    _check_vllm_container(vllm)
    volumes = {v["name"]: v for v in spec["volumes"]}

    # The same run dir in both, inside (not at) a shared emptyDir mount: the mount point is
    # root-owned, and the sidecar refuses a run dir it does not own.
    run_dir = _env(side)["LMKV_RUN_DIR"]
    assert _env(vllm)["LMKV_RUN_DIR"] == run_dir
    parent = str(Path(run_dir).parent)
    assert _mounts(side)[parent] == _mounts(vllm)[parent]
    assert "emptyDir" in volumes[_mounts(side)[parent]]

    # /dev/shm is one memory-backed emptyDir in both, big enough for the pool; no hostIPC.
    shm = _mounts(side)["/dev/shm"]
    assert _mounts(vllm)["/dev/shm"] == shm
    assert volumes[shm]["emptyDir"]["medium"] == "Memory"
    pool = parse_size(_env(side)["LMKV_HOST_POOL_SIZE"])
    assert parse_size(volumes[shm]["emptyDir"]["sizeLimit"]) >= pool
    assert not spec.get("hostIPC", False)

    # One UID for both (0600 pool and sockets).
    assert _uid(spec, side) == _uid(spec, vllm) is not None


def test_daemonset_manifest_is_consistent() -> None:
    ds, deploy = _load_all(DAEMONSET)
    assert ds["kind"] == "DaemonSet" and deploy["kind"] == "Deployment"
    ds_spec, vl_spec = ds["spec"]["template"]["spec"], deploy["spec"]["template"]["spec"]
    side, vllm = _by_name(ds_spec["containers"], "lmkv-sidecar"), _by_name(vl_spec["containers"], "vllm")
    _check_sidecar_container(side)
    _check_vllm_container(vllm)

    # The node's /dev/shm for both (hostIPC), the same hostPath run dir, the same UID.
    assert ds_spec["hostIPC"] is True and vl_spec["hostIPC"] is True
    run_dir = _env(side)["LMKV_RUN_DIR"]
    assert _env(vllm)["LMKV_RUN_DIR"] == run_dir

    def host_path(spec: dict[str, Any], c: dict[str, Any]) -> str:
        volumes = {v["name"]: v for v in spec["volumes"]}
        return volumes[_mounts(c)[run_dir]]["hostPath"]["path"]

    assert host_path(ds_spec, side) == host_path(vl_spec, vllm)
    assert _uid(ds_spec, side) == _uid(vl_spec, vllm) is not None
    # The hostPath is created root-owned: an init container hands it to the sidecar's UID.
    (init,) = ds_spec["initContainers"]
    assert f"chown {_uid(ds_spec, side)}:" in " ".join(init["command"])


def test_prometheus_scrape_config() -> None:
    (doc,) = _load_all(PROMETHEUS)
    targets = [t for job in doc["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "127.0.0.1:9187" in targets  # lmkv_mp.config's default metrics address
    served = "not served yet" not in (ROOT / "lmkv_mp" / "sidecar" / "server.py").read_text()
    planned = "PLANNED, NOT SERVED YET" in PROMETHEUS.read_text()
    assert served != planned, "launch/prometheus-scrape.yml's header must say whether /metrics is served"


# ---- systemd unit ----------------------------------------------------------------------------


def _unit() -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (a key may repeat, e.g. Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"not a unit file line: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _unit_env(service: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in service.get("Environment", []):
        for item in shlex.split(line):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def test_systemd_unit_execstart_is_accepted(tmp_path: Path) -> None:
    service = _unit()["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start.lstrip("@-:+!").replace("%t", str(tmp_path)).replace("%%", "%"))
    assert Path(argv[0]).name == "lmkv-sidecar" and Path(argv[0]).is_absolute()
    for env in ({}, _unit_env(service)):
        cfg = load_sidecar_config(argv[1:], env=env)  # must not raise
        # --run-dir is the RuntimeDirectory= systemd creates (and keeps).
        assert cfg.run_dir == tmp_path / service["RuntimeDirectory"][0]
    assert all(k.startswith("LMKV_") for k in _unit_env(service))
    assert service["Restart"] == ["always"] and service["RestartSec"] == ["1"]
    assert service["Type"] == ["simple"] and service["RuntimeDirectoryPreserve"] == ["yes"]
    assert service["LimitMEMLOCK"] == ["infinity"]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # ExecStart's binary must exist for verify: point it at this venv's.
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={BIN / 'lmkv-sidecar'}", UNIT.read_text(), flags=re.MULTILINE)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60)
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if UNIT.name in ln]
    assert not ours, "\n".join(ours)  # e.g. "Unknown key ... ignoring" (rc stays 0 for those)


# ---- serve.sh, live --------------------------------------------------------------------------

# The fake vllm: records its pid and argv (NUL-separated), asks the sidecar for a snapshot
# (proof that it is up while vLLM runs) and the sidecar's pid (from its lock file), then
# either exits with $FAKE_VLLM_RC or, with FAKE_VLLM_WAIT=1, waits for SIGTERM and exits 7.
FAKE_VLLM = r"""#!/usr/bin/env bash
set -u
out=$FAKE_VLLM_OUT
echo "$$" > "$out/pid"
printf '%s\0' "$@" > "$out/args"
lmkv-stats --json > "$out/stats.json" 2> "$out/stats.err" || true
cat "${LMKV_RUN_DIR}/lock" > "$out/sidecar_pid" 2>/dev/null || true
if [ "${FAKE_VLLM_WAIT:-0}" = 1 ]; then
    trap 'echo term > "$out/got_term"; exit 7' TERM
    touch "$out/waiting"
    while :; do sleep 0.05; done
fi
exit "${FAKE_VLLM_RC:-0}"
"""


class Serve:
    """One run of launch/serve.sh with the fake vllm, on its own short /tmp run dir."""

    def __init__(self, tmp: Path, run_dir: Path | None = None) -> None:
        self.bin = tmp / "bin"
        self.bin.mkdir()
        fake = self.bin / "vllm"
        fake.write_text(FAKE_VLLM)
        fake.chmod(0o755)
        self.out = tmp / "out"
        self.out.mkdir()
        self.own_run_dir = run_dir is None
        # Short: ipc socket paths must stay under 107 bytes, which tmp_path does not promise.
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
        self.log = tmp / "serve.log"
        self.proc: subprocess.Popen | None = None

    def env(self, **extra: str) -> dict[str, str]:
        settings = {
            "PATH": f"{self.bin}:{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "FAKE_VLLM_OUT": str(self.out),
            "LMKV_RUN_DIR": str(self.run_dir),
            "LMKV_HOST_POOL_SIZE": "64MiB",
            "LMKV_SLAB_SIZE": "4MiB",  # the default 64MiB slab does not fit a 64MiB pool
            "LMKV_METRICS_PORT": "0",
            "LMKV_UNLINK_ON_EXIT": "1",
            "LMKV_SERVE_READY_TIMEOUT": str(int(READY_TIMEOUT)),
        }
        return clean_env(**{**settings, **extra})

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([str(SERVE), *args], env=self.env(**env), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self.proc

    def wait(self, timeout: float = SERVE_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve.sh did not finish in {timeout:g}s:\n{self.text()}") from None

    def run(self, *args: str, **env: str) -> int:
        self.start(*args, **env)
        return self.wait()

    def text(self) -> str:
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        side = self.run_dir / "sidecar.log"
        if side.exists():
            log += "\n--- sidecar.log ---\n" + side.read_text(errors="replace")
        return log[-6000:]

    def vllm_args(self) -> list[str]:
        return (self.out / "args").read_bytes().decode().split("\0")[:-1]

    def sidecar_pid(self) -> int | None:
        p = self.out / "sidecar_pid"
        return int(p.read_text().split()[0]) if p.exists() and p.read_text().strip() else None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, grace=20.0)  # SIGTERM (serve.sh cleans up), then SIGKILL
        # What a broken serve.sh left behind (its children have their own process groups):
        # the fake vllm and a sidecar it started, each by pid and checked to still be it.
        fake = self.out / "pid"
        fake_pid = int(fake.read_text()) if fake.exists() else None
        if fake_pid is not None and _is_live(fake_pid, str(self.bin / "vllm").encode()):
            os.kill(fake_pid, signal.SIGKILL)
        pid = self.sidecar_pid()
        if self.own_run_dir and pid is not None and _is_sidecar(pid):
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not _is_sidecar(pid), 10, f"sidecar {pid} to die")
        if self.own_run_dir:
            unlink_shm(self.run_dir)
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _is_live(pid: int, marker: bytes) -> bool:
    """``pid`` is a live (not zombie) process whose command line contains ``marker``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z" and marker in cmdline


def _is_sidecar(pid: int) -> bool:
    return _is_live(pid, b"lmkv-sidecar")


def _shm_exists(run_dir: Path) -> bool:
    try:
        posix_ipc.SharedMemory(shm_name_for(run_dir)).close_fd()
    except posix_ipc.ExistentialError:
        return False
    return True


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    made: list[Serve] = []

    def make(run_dir: Path | None = None) -> Serve:
        sub = tmp_path / f"serve{len(made)}"
        sub.mkdir()
        s = Serve(sub, run_dir)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_serve_starts_wires_and_stops_the_sidecar(serve: Callable[..., Serve]) -> None:
    s = serve()
    rc = s.run("tiny-model", "--max-model-len", "512", FAKE_VLLM_RC="3")
    assert rc == 3, f"serve.sh must exit with vllm's status:\n{s.text()}"

    # vllm got `serve MODEL ARGS... --kv-transfer-config JSON`, and the sidecar answered then.
    args = s.vllm_args()
    assert args[:4] == ["serve", "tiny-model", "--max-model-len", "512"]
    assert args[4] == "--kv-transfer-config" and json.loads(args[5]) == CONNECTOR
    snap = json.loads((s.out / "stats.json").read_text())
    assert snap["tiers"]["host"]["capacity_bytes"] > 0, (s.out / "stats.err").read_text()
    # The log went to the run dir.
    assert "lmkv start:" in (s.run_dir / "sidecar.log").read_text()

    # Afterwards: no sidecar left (stopped and reaped by serve.sh) and, since it stopped
    # cleanly with LMKV_UNLINK_ON_EXIT=1, no pool left in /dev/shm.
    pid = s.sidecar_pid()
    assert pid is not None, s.text()
    wait_for(lambda: not _is_sidecar(pid), 10, f"sidecar {pid} to be gone")
    assert not _shm_exists(s.run_dir), f"the pool was not unlinked: sidecar not stopped cleanly?\n{s.text()}"


def test_serve_reuses_and_keeps_a_running_sidecar(serve: Callable[..., Serve],
                                                 sidecar: Callable[..., SidecarHandle]) -> None:
    handle = sidecar()
    s = serve(handle.run_dir)
    assert s.run("tiny-model") == 0, s.text()
    # vllm was exec'd: it ran as serve.sh's own pid, with the connector config.
    assert int((s.out / "pid").read_text()) == s.proc.pid  # type: ignore[union-attr]
    assert json.loads(s.vllm_args()[-1]) == CONNECTOR
    assert s.sidecar_pid() == handle.pid
    assert handle.alive(), "serve.sh stopped a sidecar it did not start"
    assert "already answers" in s.text()


def test_serve_keeps_a_kv_transfer_config_given_to_it(serve: Callable[..., Serve]) -> None:
    s = serve()
    mine = json.dumps({**CONNECTOR, "kv_connector_extra_config": {"lmkv.tenant": "a"}})
    assert s.run("tiny-model", "--kv-transfer-config", mine) == 0, s.text()
    assert s.vllm_args() == ["serve", "tiny-model", "--kv-transfer-config", mine]


def test_serve_forwards_sigterm_then_stops_the_sidecar(serve: Callable[..., Serve]) -> None:
    s = serve()
    proc = s.start("tiny-model", FAKE_VLLM_WAIT="1")
    wait_for(lambda: (s.out / "waiting").exists() or proc.poll() is not None, SERVE_TIMEOUT, "the fake vllm")
    assert proc.poll() is None, s.text()
    pid = s.sidecar_pid()
    assert pid is not None and _is_sidecar(pid)
    proc.send_signal(signal.SIGTERM)
    # The fake exits at once on SIGTERM; then serve.sh stops the sidecar (<= 15s grace).
    assert s.wait(60) == 7, f"serve.sh must exit with vllm's status after forwarding SIGTERM:\n{s.text()}"
    assert (s.out / "got_term").exists()
    wait_for(lambda: not _is_sidecar(pid), 10, f"sidecar {pid} to be gone")
    assert not _shm_exists(s.run_dir)


def test_serve_fails_when_the_sidecar_cannot_start(serve: Callable[..., Serve]) -> None:
    s = serve()
    rc = s.run("tiny-model", LMKV_HOST_POOL_SIZE="12XB")
    assert rc == 1, s.text()
    assert not (s.out / "args").exists(), "vllm must not run without the sidecar serve.sh meant to start"
    assert "LMKV_HOST_POOL_SIZE" in s.text()  # the sidecar's own error, from its log


def test_serve_usage() -> None:
    r = subprocess.run([str(SERVE)], check=False, capture_output=True, text=True, env=clean_env(), timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


# ---- prefill/decode: serve-pd.sh and pd_proxy.py (the live test is tests/e2e/test_pd.py) -----


def test_serve_pd_sh_parses_and_runs_both_roles_through_serve_sh() -> None:
    script = LAUNCH / "serve-pd.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK), "launch/serve-pd.sh must be executable"
    text = script.read_text()
    assert "kv_producer" in text and "kv_consumer" in text and '"$here/serve.sh"' in text
    if shutil.which("shellcheck") is not None:
        r = subprocess.run(["shellcheck", "-x", str(script)], check=False, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_pd_proxy_help_names_its_instances() -> None:
    r = subprocess.run([sys.executable, str(LAUNCH / "pd_proxy.py"), "--help"], check=True, capture_output=True,
                       text=True, timeout=60)
    assert "--prefill" in r.stdout and "--decode" in r.stdout and "--prefill-timeout" in r.stdout
