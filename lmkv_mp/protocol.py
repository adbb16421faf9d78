"""Moved to :mod:`lmkv_mp.wire.protocol`; this path stays for one release."""
from lmkv_mp.wire.protocol import *  # noqa: F401,F403
