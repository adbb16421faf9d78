"""Moved to :mod:`lmkv_mp.engine.client`; this path stays for one release."""
from lmkv_mp.engine.client import *  # noqa: F401,F403
