"""The CPU device mode: one process-wide TorchFunctionMode instead of ~760 per-site edits.

Megatron-Core asks for CUDA tensors in hundreds of places (`device="cuda"`,
`device=torch.cuda.current_device()`, `.to("cuda")`, `.cuda()`, `pin_memory=True`) and compares
`tensor.type()` with `'torch.cuda.FloatTensor'`. `_CpuDeviceMode` sees every torch call that goes
through Python dispatch and rewrites those arguments to CPU, so no call site needs a patch. It
serves the patch ids in `_MODE_FEATURES` (P3's `.cuda()`, P4, P8; see `cuda_stubs.py`); a test that
undoes one of them turns that part off. Cost: ~1.3 us per torch call (tests/unit/test_platform.py).

Torch-function modes are thread-local: the mode is entered on the installing thread, inherited by
forked children, and entered by every thread started afterwards (a `threading.Thread` bootstrap
hook); `ensure_device_mode()` enters it in a thread that predates installation.
See docs/megatron-core-on-cpu.md.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

__all__ = ["ensure_device_mode", "device_mode_active", "enable_feature", "disable_feature"]

# Which patch ids the mode currently serves; a patch is "on" when its id is in this set.
_MODE_FEATURES: set[str] = set()


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


def _cpu_type_name(name: str) -> str:
    return name.replace("torch.cuda.", "torch.", 1) if name.startswith("torch.cuda.") else name


def _cuda_type_name(name: str) -> str:
    return name.replace("torch.", "torch.cuda.", 1) if name.startswith("torch.") and not name.startswith("torch.cuda.") else name


_T = torch.Tensor


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU for every torch call in this thread."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if kwargs is None:
            kwargs = {}
        feats = _MODE_FEATURES
        if func is _T.to or func is _T.cuda or func is _T.type or func is _T.pin_memory:
            return _special(func, args, kwargs, feats)
        if "P4" in feats:
            dev = kwargs.get("device")
            if dev is not None and _is_cuda_device(dev):
                kwargs = {**kwargs, "device": "cpu"}
            if kwargs.get("pin_memory"):  # pinning needs an accelerator
                kwargs = {**kwargs, "pin_memory": False}
        return func(*args, **kwargs)


def _special(func: Any, args: tuple, kwargs: dict, feats: set[str]) -> Any:
    if func is _T.cuda:
        if "P3" in feats:  # Tensor.cuda() / Module.cuda(): already where it should be
            return args[0]
    elif func is _T.to:
        if "P4" in feats:
            if len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
            if _is_cuda_device(kwargs.get("device")):
                kwargs = {**kwargs, "device": "cpu"}
    elif func is _T.type:
        if "P8" in feats:
            dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
            if dtype is None:  # query: Megatron compares with 'torch.cuda.FloatTensor'
                return _cuda_type_name(func(*args, **kwargs))
            if isinstance(dtype, str):  # conversion to a CUDA tensor type -> same CPU type
                kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
                return func(args[0], _cpu_type_name(dtype), **kwargs)
    elif func is _T.pin_memory:
        if "P4" in feats:
            return args[0]
    return func(*args, **kwargs)


_DEVICE_MODE: _CpuDeviceMode | None = None


def device_mode_active() -> bool:
    """True when the CPU device mode is on this thread's torch-function mode stack."""
    return _DEVICE_MODE is not None and any(m is _DEVICE_MODE for m in _get_current_function_mode_stack())


def ensure_device_mode() -> None:
    """Enter the device mode in the calling thread if it is not active (cheap; idempotent).

    Torch-function modes are thread-local. Forked children inherit the forking thread's stack;
    threads started after installation get it from the Thread bootstrap hook below.
    """
    if _DEVICE_MODE is not None and not device_mode_active():
        _DEVICE_MODE.__enter__()


def _install_device_mode() -> None:
    global _DEVICE_MODE
    if _DEVICE_MODE is not None:
        ensure_device_mode()
        return
    _DEVICE_MODE = _CpuDeviceMode()
    _DEVICE_MODE.__enter__()
    # New threads (dist-checkpoint writers, data loader threads) start with an empty mode stack.
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def _bootstrap_inner(self: threading.Thread) -> None:
        with contextlib.suppress(Exception):
            ensure_device_mode()
        original(self)

    threading.Thread._bootstrap_inner = _bootstrap_inner  # type: ignore[attr-defined]


def enable_feature(patch_id: str) -> None:
    """Install the mode (once per process) and let it serve `patch_id`."""
    _install_device_mode()
    _MODE_FEATURES.add(patch_id)


def disable_feature(patch_id: str) -> None:
    """Stop serving `patch_id` (tests: `registry.uninstall_patches`); the mode itself stays."""
    _MODE_FEATURES.discard(patch_id)
