"""redis-server for the tests: bench/redisproc.py's servers, plus the CI rule for a missing one.

On a developer's machine a test that needs redis-server skips without it; in CI
(``CI=true``, or ``LMKV_REQUIRE_REDIS=1``) a missing redis-server fails the test, so the
remote-tier tests can never silently not run (``.ci/run`` installs the Debian package,
which ships redis-cli too).
"""

from __future__ import annotations

import os
import shutil

import pytest

from bench.redisproc import RedisServer, free_port, redis_cluster, redis_server_path

__all__ = ["RedisServer", "free_port", "redis_cluster", "require_redis_cli", "require_redis_server"]


def _required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("LMKV_REQUIRE_REDIS") == "1"


def require_redis_server() -> None:
    if redis_server_path() is None:
        if _required():
            pytest.fail("redis-server is not installed, and CI must run the remote-tier tests "
                        "(apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)


def require_redis_cli() -> None:
    require_redis_server()
    if shutil.which("redis-cli") is None:
        if _required():
            pytest.fail("redis-cli is not installed (it ships with the redis-server package)")
        pytest.skip("redis-cli is not installed (it ships with the redis-server package)", allow_module_level=True)
