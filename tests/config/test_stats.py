"""lmkv_mp/config/stats.py: ``lmkv-stats`` finds the stats socket that ``lmkv-sidecar`` with
the same flags and environment binds."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmkv_mp.config import ConfigError, load_sidecar_config, load_stats_config


@pytest.fixture
def meminfo(tmp_path: Path) -> str:
    path = tmp_path / "meminfo"
    path.write_text("MemAvailable:   10485760 kB\n")
    return str(path)


@pytest.mark.parametrize(("argv", "env"), [
    ([], {}),
    (["--run-dir", "/r"], {}),
    ([], {"LMKV_RUN_DIR": "/r"}),
    (["--run-dir", "/a"], {"LMKV_RUN_DIR": "/b"}),
    (["--stats-endpoint", "ipc:///s/stats.sock"], {"LMKV_RUN_DIR": "/b"}),
    ([], {"LMKV_STATS_ENDPOINT": "tcp://127.0.0.1:7001"}),
    (["--run-dir", "/a"], {"LMKV_STATS_ENDPOINT": "ipc:///s/stats.sock"}),
    (["--stats-endpoint", "ipc:///f.sock"], {"LMKV_STATS_ENDPOINT": "ipc:///e.sock"}),
    ([], {"LMKV_ENDPOINT": "tcp://127.0.0.1:7000"}),  # the control socket moves, the stats one stays
])
def test_the_same_flags_and_env_name_the_sidecars_stats_socket(argv: list[str], env: dict[str, str],
                                                              tmp_path: Path, meminfo: str) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path), **env}
    sidecar = load_sidecar_config([*argv, "--host-pool-size", "1GiB"], env, meminfo_path=meminfo)
    assert load_stats_config(argv, env).client.endpoint == sidecar.stats_endpoint


def test_endpoint_asks_the_sidecars_control_socket_unless_a_stats_endpoint_is_given(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "LMKV_STATS_ENDPOINT": "ipc:///e.sock"}
    assert load_stats_config(["--endpoint", "tcp://127.0.0.1:7000"], env).client.endpoint == "tcp://127.0.0.1:7000"
    assert load_stats_config(["--endpoint", "tcp://127.0.0.1:7000", "--stats-endpoint", "ipc:///f.sock"],
                             env).client.endpoint == "ipc:///f.sock"


def test_timeout_watch_and_json() -> None:
    c = load_stats_config(["--timeout", "250ms", "--watch", "2", "--json"], {})
    assert (c.client.timeout, c.watch, c.json) == (0.25, 2.0, True)
    c = load_stats_config([], {})
    assert (c.client.timeout, c.watch, c.json) == (2.0, None, False)


@pytest.mark.parametrize(("argv", "env", "where", "needle"), [
    (["--stats-endpoint", "http://x"], {}, "--stats-endpoint (LMKV_STATS_ENDPOINT)", "not a ZeroMQ endpoint"),
    ([], {"LMKV_STATS_ENDPOINT": "tcp://*:7001"}, "--stats-endpoint (LMKV_STATS_ENDPOINT)", "no valid host"),
    (["--endpoint", "http://x"], {}, "--endpoint", "not a ZeroMQ endpoint"),
    (["--run-dir", "/" + "x" * 110], {}, "--run-dir (LMKV_RUN_DIR)", "107"),
    (["--timeout", "soon"], {}, "--timeout", "'soon'"),
    (["--watch", "0"], {}, "--watch", "above 0"),
    ([], {"LMKV_CLIENT_TIMEOUT": "soon"}, "timeout (LMKV_CLIENT_TIMEOUT)", "'soon'"),
])
def test_errors_are_one_line_naming_the_setting(argv: list[str], env: dict[str, str], where: str,
                                                needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_stats_config(argv, env)
    assert str(info.value).startswith(where + ":") and needle in str(info.value) and "\n" not in str(info.value)
