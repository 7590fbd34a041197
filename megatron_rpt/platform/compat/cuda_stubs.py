"""CUDA stand-ins for the CPU layer: patches P1, P2, P3, P4, P5 and P8.

These do not fix one Megatron-Core site: they replace what Megatron-Core assumes of a CUDA build
process-wide. P1 stubs `triton` (a GPU-only package imported unconditionally by 0.19.x) for the one
module that imports it; P2 maps the CUDA RNG onto the CPU generator; P3 and P5 replace
`torch.cuda.current_device/synchronize/set_device` and streams/events; P3 (`.cuda()`), P4 (device
literals) and P8 (`Tensor.type()` names) are features of the device mode (`device_mode.py`).

Each patch's docstring names its upstream sites (file:function in megatron-core) and the versions
it is gated on; `registry.py` is the table. See docs/megatron-core-on-cpu.md.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megatron_rpt.platform.compat.device_mode import enable_feature
from megatron_rpt.platform.compat.hooks import around_import, rebind_everywhere, set_attr, when_imported

_P1_TARGET = "megatron.core.transformer.moe.ops.paged_stash"


def _triton_stub_modules() -> dict[str, types.ModuleType]:
    """`triton` / `triton.language` stand-ins whose `jit` kernels raise when launched."""

    def _unavailable(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("triton is not installed (megatron_rpt CPU stub, patch P1)")

    class _Kernel:
        def __init__(self, fn: Callable) -> None:
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")
            self.__doc__ = getattr(fn, "__doc__", None)

        def __getitem__(self, _grid: Any) -> Callable:
            return _unavailable

        __call__ = _unavailable

    def jit(fn: Callable | None = None, **_kw: Any) -> Any:
        return _Kernel(fn) if fn is not None else _Kernel

    def _stub(name: str) -> types.ModuleType:
        mod = types.ModuleType(name, "megatron_rpt stub (patch P1): triton is not installed")
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__megatron_rpt_stub__ = True  # type: ignore[attr-defined]
        return mod

    triton = _stub("triton")
    language = _stub("triton.language")
    language.constexpr = type("constexpr", (), {})  # type: ignore[attr-defined]
    language.__getattr__ = lambda name: _unavailable  # type: ignore[attr-defined]
    triton.jit = jit  # type: ignore[attr-defined]
    triton.autotune = lambda *a, **k: (lambda fn: _Kernel(fn))  # type: ignore[attr-defined]
    triton.heuristics = triton.autotune  # type: ignore[attr-defined]
    triton.Config = lambda *a, **k: None  # type: ignore[attr-defined]
    triton.cdiv = lambda a, b: -(-a // b)  # type: ignore[attr-defined]
    triton.language = language  # type: ignore[attr-defined]
    return {"triton": triton, "triton.language": language}


def _p1_triton_stub(target: str = _P1_TARGET) -> None:
    """P1: `transformer/moe/ops/paged_stash.py` does an unconditional `import triton` (0.19.x):
    without triton every `import megatron.core` fails. Applies to megatron-core >=0.17,<0.20 when
    triton is not installed; checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). CPU only.

    The stub modules are in `sys.modules` only WHILE `target` executes, so that module binds them
    and nothing else ever sees them: a process-wide stub made `torch.utils._triton.has_triton_package()`
    true, and the next `import torch._inductor...` then failed on `import triton.backends.compiler`.
    """

    @contextlib.contextmanager
    def scoped_stub() -> Any:
        stubs = {} if "triton" in sys.modules else _triton_stub_modules()
        sys.modules.update(stubs)
        try:
            yield
        finally:
            for name, mod in stubs.items():
                if sys.modules.get(name) is mod:
                    del sys.modules[name]

    around_import("P1", target, scoped_stub)


_P1_VERSIONS = SpecifierSet(">=0.17,<0.20")  # the releases with the unconditional `import triton`


def _p1_applies(v: Version) -> bool:
    """P1's gate: megatron-core >=0.17,<0.20 and triton not installed."""
    import importlib.util

    if not _P1_VERSIONS.contains(v, prereleases=True):
        return False
    try:
        return importlib.util.find_spec("triton") is None
    except (ValueError, ImportError):
        return False


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


class _SameGeneratorWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _p2_rng() -> None:
    """P2: CUDA RNG of `tensor_parallel/random.py`: `_get_cuda_rng_state`, `_set_cuda_rng_state`
    (used by `CudaRNGStatesTracker.add/fork` and `CheckpointFunction`) and
    `model_parallel_cuda_manual_seed` calling `torch.cuda.get_rng_state/manual_seed`
    Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). CPU only.

    torch.cuda RNG get/set/manual_seed map to the CPU default generator. Megatron's own
    `_set_cuda_rng_state` is redirected too: on a CPU build it queues its work with
    `torch.cuda._lazy_call`, which never runs, so the tracker would silently not restore state.
    """
    cuda = torch.cuda
    set_attr("P2", cuda, "get_rng_state", _cpu_get_rng_state)
    set_attr("P2", cuda, "set_rng_state", _cpu_set_rng_state)
    set_attr("P2", cuda, "manual_seed", _cpu_manual_seed)
    set_attr("P2", cuda, "manual_seed_all", _cpu_manual_seed)
    set_attr("P2", cuda.random, "get_rng_state", _cpu_get_rng_state)
    set_attr("P2", cuda.random, "set_rng_state", _cpu_set_rng_state)

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    def fix(mod: types.ModuleType) -> None:
        # The tracker warns when the CPU RNG moves inside fork(); here the "CUDA" RNG IS the CPU
        # RNG, so it would warn on every dropout. Drop exactly that message.
        logger = logging.getLogger(mod.__name__)
        if not any(isinstance(f, _SameGeneratorWarningFilter) for f in logger.filters):
            logger.addFilter(_SameGeneratorWarningFilter())
        rebind_everywhere("P2", mod, "_get_cuda_rng_state", get_state)
        rebind_everywhere("P2", mod, "_set_cuda_rng_state", set_state)

    when_imported("P2", "megatron.core.tensor_parallel.random", fix)


class _NoStream:
    """Stand-in for torch.cuda.Stream on CPU: every operation is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_NoEvent":
        return event if event is not None else _NoEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "_NoStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _NoEvent:
    """Stand-in for torch.cuda.Event on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


_DEFAULT_STREAM = _NoStream()


def _p3_current_device() -> None:
    """P3: `torch.cuda.current_device()` in `utils.py:GlobalMemoryBuffer.get_tensor`,
    `tensor_parallel/mappings.py`, `tensor_parallel/layers.py`, `pipeline_parallel/p2p_communication.py`,
    `transformer/moe/router.py`, `distributed/param_and_grad_buffer.py`,
    `dist_checkpointing/strategies/state_dict_saver.py`, `optimizer/distrib_optimizer.py`,
    `transformer/attention.py`, text_generation_controller; `torch.cuda.synchronize()` in
    p2p_communication / filesystem_async; `.cuda()` in distrib_optimizer.
    Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). CPU only.

    current_device() -> "cpu" (every use is a device argument); synchronize/set_device are no-ops;
    Tensor.cuda() returns the tensor (through the device mode).
    """
    cuda = torch.cuda
    set_attr("P3", cuda, "current_device", lambda: "cpu")
    set_attr("P3", cuda, "synchronize", lambda device=None: None)
    set_attr("P3", cuda, "set_device", lambda device: None)
    enable_feature("P3")


def _p4_device_literals() -> None:
    """P4: `device="cuda"` literals in `pipeline_parallel/schedules.py` (loss/num-tokens tensors),
    `optimizer/clip_grads.py`, `optimizer/optimizer.py`, `utils.py`, `transformer/utils.py`,
    `local_multi_tensor_l2_norm`. Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). CPU only.

    The device mode rewrites a CUDA `device=` argument, `.to("cuda")` and `pin_memory=True` to CPU.
    """
    enable_feature("P4")


def _p5_streams() -> None:
    """P5: CUDA streams/events in `transformer/moe/token_dispatcher.py` (alltoall),
    `distributed/param_and_grad_buffer.py` (`current_stream`), text_generation_controller (Event)
    Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). CPU only.

    torch.cuda.Stream/Event/stream()/current_stream()/default_stream() become no-op objects and
    Tensor.record_stream a no-op (CPU tensors have no stream to record on).
    """
    cuda = torch.cuda
    set_attr("P5", cuda, "Stream", _NoStream)
    set_attr("P5", cuda, "Event", _NoEvent)
    set_attr("P5", cuda, "stream", lambda stream=None: contextlib.nullcontext(stream))
    set_attr("P5", cuda, "current_stream", lambda device=None: _DEFAULT_STREAM)
    set_attr("P5", cuda, "default_stream", lambda device=None: _DEFAULT_STREAM)
    # Not through the device mode: the C++ argument parser rejects a non-Stream argument before
    # torch-function dispatch happens.
    set_attr("P5", torch.Tensor, "record_stream", lambda self, stream: None)



def _p8_type_names() -> None:
    """P8: string checks `param.grad.type() == 'torch.cuda.FloatTensor'` in
    `optimizer/clip_grads.py:get_grad_norm_fp32/clip_grad_by_total_norm_fp32`,
    `optimizer/distrib_optimizer.py`, `optimizer/optimizer.py`. Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). CPU only.

    Inside the device mode `Tensor.type()` reports `torch.cuda.*` names and
    `Tensor.type('torch.cuda.X')` converts to the CPU type X.
    """
    enable_feature("P8")

