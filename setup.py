"""Only the C extension lives here; everything else is in pyproject.toml.

``lmkv_mp._chain`` (keys.chain_hashes' token packing and hash chain) is optional: where
it cannot be built (no C compiler or Python headers) the install still succeeds and
keys.py uses its pure-Python path, several times slower per LOOKUP (one log line says so).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("lmkv_mp._chain", ["lmkv_mp/_chain.c"], optional=True,
                             extra_compile_args=["-O3", "-Wall", "-Wextra"])])
