"""cuda-python for lmkv's CUDA code (kernels.py, memory/gpu.py): imported on first use,
every ``(status, *values)`` result checked, failures raised as the caller's error type with
a message that names the call and the status. ``import lmkv_mp.memory.cuda_api`` loads nothing."""

from __future__ import annotations

from typing import Any


def bindings(error: type[Exception]) -> tuple[Any, Any]:
    """cuda-python's driver and NVRTC modules; ``error`` when cuda-python is not installed.
    (Importing them loads no library: the driver and NVRTC load at their first call.)"""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        try:  # cuda-python < 12.6 spells the modules cuda.cuda and cuda.nvrtc
            from cuda import cuda as driver  # type: ignore[no-redef]
            from cuda import nvrtc
        except ImportError as e:
            raise error(f"cuda-python is not installed ({e}): pip install 'lmkv_mp[gpu]'") from None
    return driver, nvrtc


def status_name(status: Any) -> str:
    """A driver or NVRTC status as its name and description."""
    driver, nvrtc = bindings(RuntimeError)
    if isinstance(status, nvrtc.nvrtcResult):
        return nvrtc.nvrtcGetErrorString(status)[1].decode()
    name = driver.cuGetErrorName(status)[1]
    desc = driver.cuGetErrorString(status)[1]
    return (name.decode() if name else str(int(status))) + (f" ({desc.decode()})" if desc else "")


def check(result: Any, what: str, error: type[Exception], fix: str = "") -> Any:
    """The value(s) of a cuda-python call's ``(status, *values)``; ``error`` on a bad status."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise error(f"{what} failed: {status_name(status)}" + (f"; {fix}" if fix else ""))
    return values[0] if len(values) == 1 else tuple(values) or None


def init_driver(driver: Any, error: type[Exception], fix: str) -> None:
    """``cuInit``; ``error`` (with ``fix``) when it fails or no driver library can be loaded,
    which cuda-python reports with its own exception types."""
    try:
        check(driver.cuInit(0), "cuInit", error, fix)
    except error:
        raise
    except Exception as e:
        raise error(f"the NVIDIA driver cannot be loaded ({e}); {fix}") from None
