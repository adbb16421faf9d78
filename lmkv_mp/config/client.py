"""The settings of schedulers, workers and the vLLM connector: how they reach the sidecar."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from lmkv_mp.config.common import (
    DEFAULT_CLIENT_HEARTBEAT,
    DEFAULT_CLIENT_RETRY,
    DEFAULT_CLIENT_TIMEOUT,
    DEFAULT_PREFETCH_TIMEOUT,
    ENDPOINT_HINT,
    ConfigError,
    default_endpoint,
    default_run_dir,
    endpoint_problem,
    parse_bool,
    parse_int,
    parse_path,
    read_token,
)
from lmkv_mp.config.units import _show, parse_duration


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How a scheduler or worker reaches the sidecar.

    ``timeout`` bounds every call; while the sidecar is unreachable, calls return a miss at
    once and the client probes it every ``retry_interval``. All durations are > 0. The
    auth token is left out of repr(). ``copy_threads`` (1..64) is how many threads a worker
    splits each chunk's copy over (copy_threads.CopyThreads): 1 unless cores are to spare.
    ``store_output``: at the end of a request, the full chunks of its answer (prompt and
    output tokens) are stored too, so the next turn of a conversation finds them.
    """

    endpoint: str
    timeout: float
    heartbeat_interval: float
    retry_interval: float
    auth_token: bytes | None = field(repr=False)
    prefetch_timeout: float = DEFAULT_PREFETCH_TIMEOUT
    copy_threads: int = 1
    store_output: bool = True


# Override key (e.g. from vLLM's kv_connector_extra_config) -> its environment twin.
CLIENT_SETTINGS: Mapping[str, str] = {
    "endpoint": "LMKV_ENDPOINT",
    "timeout": "LMKV_CLIENT_TIMEOUT",
    "heartbeat_interval": "LMKV_CLIENT_HEARTBEAT",
    "retry_interval": "LMKV_CLIENT_RETRY",
    "prefetch_timeout": "LMKV_PREFETCH_TIMEOUT",
    "copy_threads": "LMKV_COPY_THREADS",
    "store_output": "LMKV_STORE_OUTPUT",
}
_CLIENT_DURATION_DEFAULTS: Mapping[str, float] = {
    "timeout": DEFAULT_CLIENT_TIMEOUT,
    "heartbeat_interval": DEFAULT_CLIENT_HEARTBEAT,
    "retry_interval": DEFAULT_CLIENT_RETRY,
    "prefetch_timeout": DEFAULT_PREFETCH_TIMEOUT,
}


def load_client_config(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None
) -> ClientConfig:
    """Build a validated :class:`ClientConfig`.

    Each setting comes from ``overrides`` (keys in :data:`CLIENT_SETTINGS`; a None value
    counts as absent), else its env twin (empty counts as unset), else its default. The
    endpoint defaults to the control socket in ``LMKV_RUN_DIR`` if set, else in
    :func:`default_run_dir`, so a sidecar and clients started with the same environment
    meet with no configuration. Durations are strings (``250ms``) or numbers of seconds.
    ``auth_token`` is the stripped contents of ``LMKV_TOKEN_FILE``. ``env`` defaults to
    ``os.environ``. Raises ConfigError (one line) on an unknown override key or a bad value.
    """
    env = os.environ if env is None else env
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in given:
        if key not in CLIENT_SETTINGS:
            raise ConfigError(str(key), None, f"{_show(key)} is not a client setting; "
                              f"use one of {', '.join(CLIENT_SETTINGS)}")

    def raw(key: str) -> object | None:
        return given[key] if key in given else (env.get(CLIENT_SETTINGS[key]) or None)

    def duration(key: str) -> float:
        value = raw(key)
        if value is None:
            return _CLIENT_DURATION_DEFAULTS[key]
        problem = f"{_show(value)} is not a duration; use e.g. 1s, 250ms or a number of seconds above 0"
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError as e:
                problem = str(e)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value) and value > 0:
                return float(value)
        raise ConfigError(key, CLIENT_SETTINGS[key], problem)

    endpoint = raw("endpoint")
    if endpoint is None:
        run_dir_text = env.get("LMKV_RUN_DIR") or ""
        try:
            run_dir = parse_path(run_dir_text) if run_dir_text else default_run_dir(env)
        except ValueError as e:
            raise ConfigError("LMKV_RUN_DIR", None, str(e)) from None
        endpoint = default_endpoint(run_dir)
    if not isinstance(endpoint, str):
        raise ConfigError("endpoint", CLIENT_SETTINGS["endpoint"],
                          f"{_show(endpoint)} is not a string; {ENDPOINT_HINT}")
    problem = endpoint_problem(endpoint, bind=False)
    if problem is not None:
        raise ConfigError("endpoint", CLIENT_SETTINGS["endpoint"], f"{_show(endpoint)} {problem}")

    copy_threads = raw("copy_threads")
    if copy_threads is None:
        copy_threads = 1
    else:
        try:  # overrides may be ints; strings go through the flags' integer parser
            if isinstance(copy_threads, bool) or not isinstance(copy_threads, (int, str)):
                raise ValueError
            copy_threads = parse_int(str(copy_threads), 1, 64)
        except ValueError:
            raise ConfigError("copy_threads", CLIENT_SETTINGS["copy_threads"],
                              f"{_show(copy_threads)} is not a thread count; use a whole number from 1 to 64") from None

    store_output = raw("store_output")
    if store_output is None:
        store_output = True
    elif not isinstance(store_output, bool):
        try:
            store_output = parse_bool(str(store_output))
        except ValueError as e:
            raise ConfigError("store_output", CLIENT_SETTINGS["store_output"], str(e)) from None

    token_file = env.get("LMKV_TOKEN_FILE") or None
    try:
        auth_token = read_token(token_file) if token_file else None
    except ValueError as e:
        raise ConfigError("LMKV_TOKEN_FILE", None, str(e)) from None

    return ClientConfig(
        endpoint=endpoint,
        timeout=duration("timeout"),
        heartbeat_interval=duration("heartbeat_interval"),
        retry_interval=duration("retry_interval"),
        auth_token=auth_token,
        prefetch_timeout=duration("prefetch_timeout"),
        copy_threads=copy_threads,
        store_output=store_output,
    )
