"""Only the C extensions live here; everything else is in pyproject.toml.

``lmkv_mp.wire._chain`` (keys.chain_hashes' token packing and hash chain) is optional: where
it cannot be built (no C compiler or Python headers) the install still succeeds and
keys.py uses its pure-Python path, several times slower per LOOKUP (one log line says so).
``lmkv_mp.engine._rows`` (engine/paged.py's block-row copies with streaming stores) is optional too:
without it those copies take torch's ops, about a third slower on the host tier.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(f"lmkv_mp.{pkg}.{name}", [f"lmkv_mp/{pkg}/{name}.c"], optional=True,
                             extra_compile_args=["-O3", "-Wall", "-Wextra"])
                   for pkg, name in (("wire", "_chain"), ("engine", "_rows"))])
