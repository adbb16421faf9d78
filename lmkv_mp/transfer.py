"""Moved to :mod:`lmkv_mp.engine.paged`; this path stays for one release."""
from lmkv_mp.engine.paged import *  # noqa: F401,F403
