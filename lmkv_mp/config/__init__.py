"""Every setting of lmkv_mp, parsed and validated in one place.

The sidecar reads its command-line flags and their ``LMKV_*`` twins with
:func:`load_sidecar_config` (``sidecar.py``; its flag table is ``flags.py``); schedulers,
workers and the vLLM connector read theirs with :func:`load_client_config` (``client.py``);
``lmkv-stats`` reads its own with :func:`load_stats_config` (``stats.py``), naming a sidecar
with the sidecar's own flags; what all share (ConfigError, defaults, endpoints, value
parsers) is in ``common.py``. Nothing else in the package reads ``os.environ``.

Loading has no side effects: nothing is created, bound or written. The only files read are
the secret files named by settings and, when no host pool size is given, the meminfo file.
"""

from lmkv_mp.config.client import (
                                   CLIENT_SETTINGS,
                                   ClientConfig,
                                   load_client_config,
)
from lmkv_mp.config.common import (
                                   DEFAULT_CLIENT_MAX_INFLIGHT,
                                   DEFAULT_CLIENT_POOL_SHARE,
                                   DEFAULT_HASH_KEY,
                                   DEFAULT_PREFETCH_TIMEOUT,
                                   ConfigError,
                                   default_endpoint,
                                   default_run_dir,
                                   default_stats_endpoint,
                                   default_stats_publish_endpoint,
                                   is_loopback_endpoint,
                                   redact_url,
)
from lmkv_mp.config.sidecar import (
                                   SidecarConfig,
                                   build_arg_parser,
                                   default_host_pool_size,
                                   load_sidecar_config,
                                   sidecar_main_config,
)
from lmkv_mp.config.stats import StatsConfig, build_stats_parser, load_stats_config, stats_main_config
from lmkv_mp.config.units import GiB, KiB, MiB, TiB, format_size, parse_duration, parse_size

__all__ = [
    "CLIENT_SETTINGS", "DEFAULT_CLIENT_MAX_INFLIGHT", "DEFAULT_CLIENT_POOL_SHARE", "DEFAULT_HASH_KEY",
    "DEFAULT_PREFETCH_TIMEOUT", "ClientConfig", "ConfigError", "GiB", "KiB", "MiB", "SidecarConfig", "StatsConfig",
    "TiB", "build_arg_parser", "build_stats_parser", "default_endpoint", "default_host_pool_size", "default_run_dir",
    "default_stats_endpoint", "default_stats_publish_endpoint", "format_size", "is_loopback_endpoint",
    "load_client_config", "load_sidecar_config", "load_stats_config", "parse_duration", "parse_size", "redact_url",
    "sidecar_main_config", "stats_main_config",
]
