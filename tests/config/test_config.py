"""Tests for lmkv_mp.config: parsing, defaults, precedence and one-line errors.

Nothing here reads the real machine: meminfo comes from fake files, run dirs from tmp_path
(except the /tmp/lmkv-<uid> default, which is only computed, never touched).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest

from lmkv_mp.config import (
    DEFAULT_HASH_KEY,
    GiB,
    KiB,
    MiB,
    TiB,
    ClientConfig,
    ConfigError,
    SidecarConfig,
    build_arg_parser,
    default_endpoint,
    default_host_pool_size,
    default_run_dir,
    default_stats_endpoint,
    format_size,
    is_loopback_endpoint,
    load_client_config,
    load_sidecar_config,
    parse_duration,
    parse_size,
    sidecar_main_config,
)


@pytest.fixture
def meminfo(tmp_path: Path) -> str:
    """A fake /proc/meminfo with 10 GiB available: the default host pool is 2GiB."""
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:       16777216 kB\nMemFree:         1000 kB\n"
                    "MemAvailable:   10485760 kB\n")
    return str(path)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment whose default run dir lies in tmp_path."""
    return {"XDG_RUNTIME_DIR": str(tmp_path)}


def load(argv: list[str], env: dict[str, str], meminfo: str) -> SidecarConfig:
    return load_sidecar_config(argv, env, meminfo_path=meminfo)


def load_error(argv: list[str], env: dict[str, str], meminfo: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(argv, env, meminfo)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("1_000_000", 1_000_000),
        ("512B", 512),
        ("64KiB", 64 * KiB),
        ("512MiB", 512 * MiB),
        ("8GiB", 8 * GiB),
        ("1TiB", TiB),
        ("1G", GiB),
        ("2k", 2 * KiB),
        ("3t", 3 * TiB),
        ("512Mi", 512 * MiB),
        ("1KB", 1000),
        ("2mb", 2_000_000),
        ("1GB", 10**9),
        ("1TB", 10**12),
        ("8 gib", 8 * GiB),
        ("  64MIB  ", 64 * MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("1.3KiB", 1331),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "-1", "-1GiB", "12XB", "GiB", "1.5", "1e3", "1__0", "_1", "1_", "1 2",
     "abc", "0x10", "+5", "1 GiB GiB", "5 petabytes", "\u0661MiB", "99999999TiB"],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert repr(text) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0B"), (1000, "1000B"), (1536, "1536B"), (3 * KiB, "3KiB"),
     (536870912, "512MiB"), (1536 * MiB, "1536MiB"), (8 * GiB, "8GiB"), (2 * TiB, "2TiB")],
)
def test_format_size_is_exact_and_round_trips(n: int, text: str) -> None:
    assert format_size(n) == text
    assert parse_size(format_size(n)) == n


def test_format_size_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_size(-1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5", 5.0), ("0.5", 0.5), (".25", 0.25), ("5s", 5.0), ("250ms", 0.25), ("2m", 120.0),
     ("2min", 120.0), ("1h", 3600.0), ("500us", 0.0005), ("1.5 S", 1.5), (" 10ms ", 0.01)],
)
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "-1", "-5s", "5x", "five", "inf", "nan", "1e3", "1 2", "9" * 400])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert "\n" not in str(info.value)


def test_parse_duration_zero_only_when_allowed() -> None:
    with pytest.raises(ValueError, match="above 0"):
        parse_duration("0s")
    assert parse_duration("0", allow_zero=True) == 0.0


def test_default_run_dir(tmp_path: Path) -> None:
    assert default_run_dir({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "lmkv"
    fallback = Path(f"/tmp/lmkv-{os.getuid()}")
    assert default_run_dir({}) == fallback
    assert default_run_dir({"XDG_RUNTIME_DIR": ""}) == fallback
    assert default_run_dir({"XDG_RUNTIME_DIR": "relative/dir"}) == fallback


def test_default_endpoints(tmp_path: Path) -> None:
    assert default_endpoint(tmp_path) == f"ipc://{tmp_path}/control.sock"
    assert default_stats_endpoint(tmp_path) == f"ipc://{tmp_path}/stats.sock"


@pytest.mark.parametrize(
    ("available_kib", "expected"),
    [
        (10 * 1024 * 1024, 2 * GiB),  # 20% of 10GiB
        (100 * 1024 * 1024, 8 * GiB),  # capped
        (1_000_000, 256 * MiB),  # 195MiB: raised to the floor
        (5_000_000, 960 * MiB),  # 976.5MiB: rounded down to a multiple of 64MiB
        (0, 256 * MiB),
    ],
)
def test_default_host_pool_size(tmp_path: Path, available_kib: int, expected: int) -> None:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal: 999999999 kB\nMemAvailable: {available_kib} kB\nCached: 1 kB\n")
    assert default_host_pool_size(str(path)) == expected


def test_default_host_pool_size_without_meminfo(tmp_path: Path) -> None:
    assert default_host_pool_size(str(tmp_path / "missing")) == 256 * MiB
    (tmp_path / "old").write_text("MemTotal: 999999999 kB\nMemFree: 999999 kB\n")
    assert default_host_pool_size(str(tmp_path / "old")) == 256 * MiB


def test_defaults_with_empty_env(meminfo: str) -> None:
    c = load([], {}, meminfo)
    run_dir = Path(f"/tmp/lmkv-{os.getuid()}")
    assert c == SidecarConfig(
        run_dir=run_dir,
        endpoint=f"ipc://{run_dir}/control.sock",
        stats_endpoint=f"ipc://{run_dir}/stats.sock",
        stats_publish_endpoint=f"ipc://{run_dir}/stats-pub.sock",
        stats_interval=1.0,
        host_pool_size=2 * GiB,
        host_pool_path=None,
        slab_size=64 * MiB,
        chunk_tokens=256,
        gpu_pool_size=0,
        gpu_devices=(),
        disk_dir=None,
        disk_size=0,
        remote_url=None,
        remote_timeout=0.5,
        write_policy="write-back",
        lease_timeout=5.0,
        heartbeat_interval=1.0,
        verify=False,
        hash_key=DEFAULT_HASH_KEY,
        admin_token=None,
        metrics_host="127.0.0.1",
        metrics_port=9187,
        metrics_namespaces=10,
        log_level="info",
        unlink_on_exit=False,
        allow_group=None,
        allow_remote_clients=False,
        client_token=None,
        client_pool_share=0.5,
        client_max_inflight=128,
    )


def test_defaults_follow_xdg_runtime_dir(tmp_path: Path, env: dict[str, str], meminfo: str) -> None:
    c = load([], env, meminfo)
    assert c.run_dir == tmp_path / "lmkv"
    assert c.endpoint == f"ipc://{tmp_path}/lmkv/control.sock"
    assert c.stats_endpoint == f"ipc://{tmp_path}/lmkv/stats.sock"


def test_run_dir_moves_default_endpoints(tmp_path: Path, meminfo: str) -> None:
    c = load(["--run-dir", str(tmp_path / "r")], {}, meminfo)
    assert c.endpoint == f"ipc://{tmp_path}/r/control.sock"
    assert c.stats_endpoint == f"ipc://{tmp_path}/r/stats.sock"
    assert c.stats_publish_endpoint == f"ipc://{tmp_path}/r/stats-pub.sock"


def test_relative_paths_become_absolute(env: dict[str, str], meminfo: str) -> None:
    c = load(["--run-dir", "rd", "--disk-dir", "disk"], env, meminfo)
    assert c.run_dir == Path.cwd() / "rd" and c.disk_dir == Path.cwd() / "disk"


@pytest.mark.parametrize(
    ("flag", "value", "field", "expected"),
    [
        ("--endpoint", "tcp://127.0.0.1:5555", "endpoint", "tcp://127.0.0.1:5555"),
        ("--endpoint", "tcp://localhost:5555", "endpoint", "tcp://localhost:5555"),
        ("--stats-endpoint", "tcp://[::1]:5556", "stats_endpoint", "tcp://[::1]:5556"),
        ("--host-pool-size", "512MiB", "host_pool_size", 512 * MiB),
        ("--host-pool-path", "/dev/shm/pool", "host_pool_path", Path("/dev/shm/pool")),
        ("--slab-size", "2MiB", "slab_size", 2 * MiB),
        ("--chunk-tokens", "512", "chunk_tokens", 512),
        ("--gpu-pool-size", "4GiB", "gpu_pool_size", 4 * GiB),
        ("--remote-url", "redis+cluster://a:7000", "remote_url", "redis+cluster://a:7000"),
        ("--remote-url", "valkey://v:6379/1", "remote_url", "redis://v:6379/1"),
        ("--remote-url", "valkey+cluster://v:7000", "remote_url", "redis+cluster://v:7000"),
        ("--write-policy", "Write-Through", "write_policy", "write-through"),
        ("--lease-timeout", "30s", "lease_timeout", 30.0),
        ("--heartbeat-interval", "250ms", "heartbeat_interval", 0.25),
        ("--verify", "on", "verify", True),
        ("--metrics-host", "0.0.0.0", "metrics_host", "0.0.0.0"),
        ("--metrics-port", "0", "metrics_port", 0),
        ("--metrics-namespaces", "0", "metrics_namespaces", 0),
        ("--stats-publish-endpoint", "tcp://127.0.0.1:5557", "stats_publish_endpoint", "tcp://127.0.0.1:5557"),
        ("--stats-interval", "0", "stats_interval", 0.0),
        ("--stats-interval", "250ms", "stats_interval", 0.25),
        ("--log-level", "DEBUG", "log_level", "debug"),
        ("--allow-group", "kvcache", "allow_group", "kvcache"),
        ("--client-pool-share", "25%", "client_pool_share", 0.25),
        ("--client-pool-share", "1", "client_pool_share", 1.0),
        ("--client-max-inflight", "8", "client_max_inflight", 8),
    ],
)
def test_env_twin_and_flag_beats_env(
    flag: str, value: str, field: str, expected: object, env: dict[str, str], meminfo: str
) -> None:
    name = "LMKV_" + flag[2:].upper().replace("-", "_")
    assert getattr(load([], {**env, name: value}, meminfo), field) == expected
    assert getattr(load([flag, value], env, meminfo), field) == expected
    default = getattr(load([], env, meminfo), field)
    assert getattr(load([flag, value], {**env, name: "garbage@@"}, meminfo), field) == expected
    assert default != expected


def test_gpu_devices_from_flag_or_env_with_a_pool_size(env: dict[str, str], meminfo: str) -> None:
    sized = {**env, "LMKV_GPU_POOL_SIZE": "4GiB"}
    assert load([], {**sized, "LMKV_GPU_DEVICES": "0, 2"}, meminfo).gpu_devices == (0, 2)
    assert load(["--gpu-devices", "1"], {**sized, "LMKV_GPU_DEVICES": "0, 2"}, meminfo).gpu_devices == (1,)
    assert load([], sized, meminfo).gpu_devices == (), "no list: every visible device (resolved at start)"


def test_run_dir_env_twin(tmp_path: Path, env: dict[str, str], meminfo: str) -> None:
    c = load([], {**env, "LMKV_RUN_DIR": str(tmp_path / "e")}, meminfo)
    assert c.run_dir == tmp_path / "e"
    c = load(["--run-dir", str(tmp_path / "f")], {**env, "LMKV_RUN_DIR": str(tmp_path / "e")}, meminfo)
    assert c.run_dir == tmp_path / "f"


def test_help_names_every_env_twin_and_default() -> None:
    parser = build_arg_parser()
    assert parser.prog == "lmkv-sidecar"
    text = parser.format_help()
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings[0] != "-h"]
    assert len(flags) == 31
    for flag in flags:
        assert "LMKV_" + flag[2:].upper().replace("-", "_") in text
    assert text.count("default:") == len(flags)


def test_empty_env_counts_as_unset(env: dict[str, str], meminfo: str) -> None:
    c = load([], {**env, "LMKV_HOST_POOL_SIZE": "", "LMKV_REMOTE_URL": ""}, meminfo)
    assert c.host_pool_size == 2 * GiB and c.remote_url is None


def test_empty_flag_clears_optional_env(env: dict[str, str], meminfo: str) -> None:
    c = load(["--remote-url", ""], {**env, "LMKV_REMOTE_URL": "redis://h:6379/0"}, meminfo)
    assert c.remote_url is None


def test_unlink_on_exit(env: dict[str, str], meminfo: str) -> None:
    assert load(["--unlink-on-exit"], env, meminfo).unlink_on_exit is True
    for word in ("1", "true", "YES", "on"):
        assert load([], {**env, "LMKV_UNLINK_ON_EXIT": word}, meminfo).unlink_on_exit is True
    for word in ("0", "false", "no", "Off"):
        assert load([], {**env, "LMKV_UNLINK_ON_EXIT": word}, meminfo).unlink_on_exit is False
    on = {**env, "LMKV_UNLINK_ON_EXIT": "1"}
    assert load(["--no-unlink-on-exit"], on, meminfo).unlink_on_exit is False
    assert load_error([], {**env, "LMKV_UNLINK_ON_EXIT": "maybe"}, meminfo).flag == "--unlink-on-exit"


def test_disk_size_defaults_when_disk_dir_set(tmp_path: Path, env: dict[str, str], meminfo: str) -> None:
    c = load(["--disk-dir", str(tmp_path / "disk")], env, meminfo)
    assert c.disk_dir == tmp_path / "disk" and c.disk_size == 64 * GiB
    c = load(["--disk-dir", str(tmp_path), "--disk-size", "1TiB"], env, meminfo)
    assert c.disk_size == TiB


def test_secrets_from_files(tmp_path: Path, env: dict[str, str], meminfo: str) -> None:
    (tmp_path / "key").write_bytes(b"k" * 32 + b"\n")
    (tmp_path / "token").write_bytes(b"  s3cret\n")
    (tmp_path / "client-token").write_bytes(b"cl1ent\n")
    c = load(["--hash-key-file", str(tmp_path / "key"), "--client-token-file", str(tmp_path / "client-token")],
             {**env, "LMKV_ADMIN_TOKEN_FILE": str(tmp_path / "token")}, meminfo)
    assert c.hash_key == b"k" * 32 and c.admin_token == b"s3cret" and c.client_token == b"cl1ent"
    assert "s3cret" not in repr(c) and "kkkk" not in repr(c) and "cl1ent" not in repr(c)
    c = load([], {**env, "LMKV_CLIENT_TOKEN_FILE": str(tmp_path / "client-token")}, meminfo)
    assert c.client_token == b"cl1ent"


def test_remote_clients_need_the_flag_and_a_token(tmp_path: Path, env: dict[str, str], meminfo: str) -> None:
    (tmp_path / "client-token").write_text("t0ken\n")
    remote = ["--endpoint", "tcp://0.0.0.0:5555", "--client-token-file", str(tmp_path / "client-token")]
    assert load_error(remote, env, meminfo).flag == "--endpoint"
    c = load([*remote, "--allow-remote-clients"], env, meminfo)
    assert c.allow_remote_clients and c.endpoint == "tcp://0.0.0.0:5555" and c.client_token == b"t0ken"
    c = load(remote, {**env, "LMKV_ALLOW_REMOTE_CLIENTS": "on"}, meminfo)
    assert c.allow_remote_clients
    # Only the stats socket is remote: no HELLO happens there, so no token is needed.
    c = load(["--stats-endpoint", "tcp://*:5556", "--allow-remote-clients"], env, meminfo)
    assert c.client_token is None and c.stats_endpoint == "tcp://*:5556"
    assert load(["--endpoint", "tcp://127.0.0.1:5555"], env, meminfo).allow_remote_clients is False


@pytest.mark.parametrize(("endpoint", "loopback"), [
    ("ipc:///tmp/x.sock", True), ("tcp://127.0.0.1:1", True), ("tcp://127.9.8.7:1", True),
    ("tcp://localhost:1", True), ("tcp://LOCALHOST:1", True), ("tcp://[::1]:1", True),
    ("tcp://*:1", False), ("tcp://0.0.0.0:1", False), ("tcp://10.1.2.3:1", False), ("tcp://[::]:1", False),
    ("tcp://node1:1", False), ("tcp://127.0.0.1.evil:1", False), ("tcp://127.0.0.256:1", False),
])
def test_is_loopback_endpoint(endpoint: str, loopback: bool) -> None:
    assert is_loopback_endpoint(endpoint) is loopback


@pytest.mark.parametrize(
    ("content", "key"),
    [(b"k" * 16, b"k" * 16), (b"k" * 16 + b"\r\n", b"k" * 16), (b"k" * 64 + b"\n", b"k" * 64),
     (b"k" * 20 + b"\n\n", b"k" * 20 + b"\n"), (bytes(range(32)), bytes(range(32)))],
)
def test_hash_key_strips_one_line_ending(
    tmp_path: Path, env: dict[str, str], meminfo: str, content: bytes, key: bytes
) -> None:
    (tmp_path / "key").write_bytes(content)
    assert load(["--hash-key-file", str(tmp_path / "key")], env, meminfo).hash_key == key


def test_config_is_frozen(env: dict[str, str], meminfo: str) -> None:
    c = load([], env, meminfo)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.slab_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("argv", "extra_env", "flag", "needles"),
    [
        (["--host-pool-size", "12XB"], {}, "--host-pool-size", ["'12XB' is not a size", "512MiB"]),
        ([], {"LMKV_HOST_POOL_SIZE": "-1G"}, "--host-pool-size", ["'-1G' is negative"]),
        (["--host-pool-size", "0"], {}, "--host-pool-size", ["cannot hold one slab"]),
        (["--host-pool-size", "32MiB"], {}, "--host-pool-size", ["--slab-size"]),
        (["--slab-size", "1000000"], {}, "--slab-size", ["4KiB"]),
        (["--slab-size", "512KiB"], {}, "--slab-size", ["1MiB"]),
        (["--chunk-tokens", "0"], {}, "--chunk-tokens", ["'0'"]),
        (["--chunk-tokens", "12.5"], {}, "--chunk-tokens", ["not an integer"]),
        (["--gpu-pool-size", "1MiB"], {}, "--gpu-pool-size", ["slab"]),
        (["--gpu-devices", "0,x"], {}, "--gpu-devices", ["e.g. 0,1"]),
        (["--gpu-devices", "1,1"], {}, "--gpu-devices", ["twice"]),
        (["--gpu-devices", "0"], {}, "--gpu-pool-size", ["is 0", "e.g. 8GiB"]),
        (["--gpu-pool-size", "1GiB", "--verify", "on"], {}, "--gpu-pool-size", ["--verify on", "choose one"]),
        (["--gpu-pool-size", "1GiB", "--run-dir", "/" + "r" * 91], {}, "--run-dir", ["gpu-handles.sock", "107"]),
        (["--gpu-pool-size", "1GiB", "--gpu-devices", ",".join(map(str, range(65)))], {}, "--gpu-devices",
         ["at most 64"]),
        (["--disk-size", "1GiB"], {}, "--disk-size", ["--disk-dir (LMKV_DISK_DIR)"]),
        (["--disk-dir", "/d", "--disk-size", "0"], {}, "--disk-size", ["above 0"]),
        (["--remote-url", "http://h:6379"], {}, "--remote-url", ["redis://", "rediss://", "unix://", "redis+cluster://"]),
        (["--remote-url", "redis://"], {}, "--remote-url", ["not a remote URL"]),
        (["--write-policy", "write-around"], {}, "--write-policy", ["'write-around'", "write-through|write-back"]),
        (["--lease-timeout", "0"], {}, "--lease-timeout", ["above 0"]),
        (["--heartbeat-interval", "5s"], {}, "--heartbeat-interval", ["--lease-timeout (LMKV_LEASE_TIMEOUT) 5s"]),
        (["--lease-timeout", "2s"], {"LMKV_HEARTBEAT_INTERVAL": "3s"}, "--heartbeat-interval", ["--lease-timeout"]),
        (["--verify", "sometimes"], {}, "--verify", ["on|off"]),
        (["--metrics-port", "65536"], {}, "--metrics-port", ["'65536'", "0..65535"]),
        ([], {"LMKV_METRICS_PORT": "http"}, "--metrics-port", ["'http'"]),
        (["--metrics-host", "a b"], {}, "--metrics-host", ["not a host"]),
        (["--log-level", "trace"], {}, "--log-level", ["debug|info|warning|error"]),
        (["--endpoint", "http://x"], {}, "--endpoint", ["ipc://PATH or tcp://HOST:PORT"]),
        (["--endpoint", "tcp://host"], {}, "--endpoint", ["port"]),
        (["--endpoint", "tcp://host:0"], {}, "--endpoint", ["1..65535"]),
        (["--endpoint", "ipc://"], {}, "--endpoint", ["no socket path"]),
        (["--endpoint", "ipc:///" + "x" * 120], {}, "--endpoint", ["107"]),
        (["--run-dir", "/" + "x" * 110], {}, "--run-dir", ["--endpoint", "107"]),
        (["--stats-endpoint", "tcp://h:1", "--endpoint", "tcp://h:1"], {}, "--stats-endpoint", ["also the --endpoint"]),
        (["--stats-publish-endpoint", "tcp://h:1", "--stats-endpoint", "tcp://h:1"], {}, "--stats-publish-endpoint",
         ["also the --stats-endpoint"]),
        ([], {"LMKV_STATS_INTERVAL": "-1s"}, "--stats-interval", ["negative"]),
        (["--metrics-namespaces", "1001"], {}, "--metrics-namespaces", ["0..1000"]),
        (["--run-dir", ""], {}, "--run-dir", ["not a path"]),
        (["--endpoint", "tcp://*:5555"], {}, "--endpoint", ["other hosts can reach", "--allow-remote-clients"]),
        (["--endpoint", "tcp://10.0.0.5:5555"], {}, "--endpoint", ["--client-token-file"]),
        (["--stats-endpoint", "tcp://0.0.0.0:5556"], {}, "--stats-endpoint", ["--allow-remote-clients"]),
        (["--stats-publish-endpoint", "tcp://node1:5557"], {}, "--stats-publish-endpoint", ["127.0.0.1"]),
        (["--endpoint", "tcp://*:5555", "--allow-remote-clients"], {}, "--client-token-file",
         ["every HELLO must present a token"]),
        (["--client-pool-share", "0"], {}, "--client-pool-share", ["50%"]),
        (["--client-pool-share", "150%"], {}, "--client-pool-share", ["at most 1"]),
        (["--client-pool-share", "half"], {}, "--client-pool-share", ["'half'"]),
        (["--client-max-inflight", "0"], {}, "--client-max-inflight", ["1..1000000"]),
    ],
)
def test_validation_errors_name_the_flag(
    argv: list[str], extra_env: dict[str, str], flag: str, needles: list[str],
    env: dict[str, str], meminfo: str,
) -> None:
    err = load_error(argv, {**env, **extra_env}, meminfo)
    assert err.flag == flag
    assert str(err).startswith(f"{flag} (LMKV_{flag[2:].upper().replace('-', '_')}): ")
    for needle in needles:
        assert needle in str(err)


def test_error_message_matches_the_documented_example(env: dict[str, str], meminfo: str) -> None:
    err = load_error(["--host-pool-size", "12XB"], env, meminfo)
    assert str(err) == ("--host-pool-size (LMKV_HOST_POOL_SIZE): '12XB' is not a size; "
                        "use e.g. 512MiB, 8GiB or a byte count")


def test_config_error_copies_whole() -> None:
    err = copy.copy(ConfigError("--verify", "LMKV_VERIFY", "'x' is not on or off"))
    assert (err.flag, err.env, str(err)) == ("--verify", "LMKV_VERIFY", "--verify (LMKV_VERIFY): 'x' is not on or off")


def test_heartbeat_error_names_both_flags(env: dict[str, str], meminfo: str) -> None:
    err = load_error(["--heartbeat-interval", "5s", "--lease-timeout", "5s"], env, meminfo)
    assert "--heartbeat-interval (LMKV_HEARTBEAT_INTERVAL)" in str(err)
    assert "--lease-timeout (LMKV_LEASE_TIMEOUT)" in str(err)


def test_remote_url_error_hides_password(env: dict[str, str], meminfo: str) -> None:
    err = load_error(["--remote-url", "http://user:hunter2@h:6379"], env, meminfo)
    assert "hunter2" not in str(err) and "***@h:6379" in str(err)


def test_bad_value_with_newline_stays_one_line(env: dict[str, str], meminfo: str) -> None:
    err = load_error(["--log-level", "info\nwarning"], env, meminfo)
    assert "'info\\nwarning'" in str(err)


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"short", "holds 5 bytes"), (b"k" * 65, "over 64"), (b"k" * 15 + b"\n", "holds 15 bytes")],
)
def test_bad_hash_key_file_length(
    tmp_path: Path, env: dict[str, str], meminfo: str, content: bytes, needle: str
) -> None:
    (tmp_path / "key").write_bytes(content)
    err = load_error(["--hash-key-file", str(tmp_path / "key")], env, meminfo)
    assert err.flag == "--hash-key-file" and needle in str(err) and "16..64" in str(err)


def test_unreadable_secret_files(tmp_path: Path, env: dict[str, str], meminfo: str) -> None:
    err = load_error(["--hash-key-file", str(tmp_path / "missing")], env, meminfo)
    assert err.flag == "--hash-key-file" and "cannot read" in str(err)
    err = load_error(["--admin-token-file", str(tmp_path)], env, meminfo)
    assert err.flag == "--admin-token-file" and "cannot read" in str(err)
    (tmp_path / "blank").write_text(" \n")
    err = load_error(["--admin-token-file", str(tmp_path / "blank")], env, meminfo)
    assert err.flag == "--admin-token-file" and "empty" in str(err)


def test_first_bad_value_wins(env: dict[str, str], meminfo: str) -> None:
    err = load_error(["--log-level", "x", "--endpoint", "x"], env, meminfo)
    assert err.flag == "--endpoint"


def test_unknown_flag_exits_2(env: dict[str, str], meminfo: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load(["--host-pool-sz", "1GiB"], env, meminfo)
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_sidecar_main_config_bad_value_exits_2_with_one_line(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        sidecar_main_config(["--host-pool-size", "1GiB", "--write-policy", "sometimes"], env)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("lmkv-sidecar: error: --write-policy (LMKV_WRITE_POLICY): 'sometimes'")


def test_sidecar_main_config_ok(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    c = sidecar_main_config(["--host-pool-size", "1GiB"], {**env, "LMKV_CHUNK_TOKENS": "128"})
    assert c.host_pool_size == GiB and c.chunk_tokens == 128
    assert capsys.readouterr().err == ""


def test_client_defaults(tmp_path: Path) -> None:
    assert load_client_config({}) == ClientConfig(
        endpoint=f"ipc:///tmp/lmkv-{os.getuid()}/control.sock",
        timeout=1.0, heartbeat_interval=1.0, retry_interval=1.0, auth_token=None,
    )
    assert load_client_config({"XDG_RUNTIME_DIR": str(tmp_path)}).endpoint == \
        f"ipc://{tmp_path}/lmkv/control.sock"


def test_client_meets_a_sidecar_started_with_the_same_env(tmp_path: Path, meminfo: str) -> None:
    for env in ({"XDG_RUNTIME_DIR": str(tmp_path)}, {"LMKV_RUN_DIR": str(tmp_path / "r")},
                {"LMKV_ENDPOINT": "tcp://127.0.0.1:7000"}):
        assert load_client_config(env).endpoint == load(["--host-pool-size", "1GiB"], env, meminfo).endpoint


def test_client_from_env(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok\n")
    c = load_client_config({
        "LMKV_ENDPOINT": "tcp://10.0.0.5:5555",
        "LMKV_CLIENT_TIMEOUT": "250ms",
        "LMKV_CLIENT_HEARTBEAT": "2s",
        "LMKV_CLIENT_RETRY": "0.5",
        "LMKV_TOKEN_FILE": str(tmp_path / "token"),
        "LMKV_COPY_THREADS": "3",
    })
    assert c == ClientConfig("tcp://10.0.0.5:5555", 0.25, 2.0, 0.5, b"tok", copy_threads=3)
    assert "tok" not in repr(c)


def test_client_overrides_win_over_env() -> None:
    env = {"LMKV_ENDPOINT": "tcp://a:1", "LMKV_CLIENT_TIMEOUT": "5s", "LMKV_CLIENT_RETRY": "3s",
           "LMKV_COPY_THREADS": "4"}
    c = load_client_config(env, {"endpoint": "ipc:///run/x.sock", "timeout": 0.1,
                                 "heartbeat_interval": "100ms", "retry_interval": None, "copy_threads": 2})
    assert (c.endpoint, c.timeout, c.heartbeat_interval, c.retry_interval, c.copy_threads) == \
        ("ipc:///run/x.sock", 0.1, 0.1, 3.0, 2)


@pytest.mark.parametrize(
    ("env", "overrides", "flag", "needle"),
    [
        ({"LMKV_CLIENT_TIMEOUT": "soon"}, None, "timeout", "'soon' is not a duration"),
        ({}, {"timeout": 0}, "timeout", "above 0"),
        ({}, {"timeout": float("inf")}, "timeout", "inf"),
        ({}, {"retry_interval": True}, "retry_interval", "True"),
        ({}, {"heartbeat_interval": "-1s"}, "heartbeat_interval", "negative"),
        ({"LMKV_ENDPOINT": "tcp://*:5555"}, None, "endpoint", "not *"),
        ({}, {"endpoint": 5555}, "endpoint", "not a string"),
        ({}, {"time_out": 1}, "time_out", "endpoint, timeout, heartbeat_interval, retry_interval"),
        ({"LMKV_TOKEN_FILE": "/nonexistent/lmkv-token"}, None, "LMKV_TOKEN_FILE", "cannot read"),
        ({"LMKV_RUN_DIR": "/" + "x" * 110}, None, "endpoint", "107"),
        ({"LMKV_COPY_THREADS": "two"}, None, "copy_threads", "'two' is not a thread count"),
        ({"LMKV_COPY_THREADS": "0"}, None, "copy_threads", "1 to 64"),
        ({"LMKV_COPY_THREADS": "²"}, None, "copy_threads", "not a thread count"),
        ({}, {"copy_threads": 65}, "copy_threads", "65"),
        ({}, {"copy_threads": True}, "copy_threads", "True"),
        ({}, {"copy_threads": 1.5}, "copy_threads", "1.5"),
    ],
)
def test_client_errors(env: dict[str, str], overrides: dict[str, object] | None, flag: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_client_config(env, overrides)
    assert info.value.flag == flag
    assert needle in str(info.value) and "\n" not in str(info.value)
