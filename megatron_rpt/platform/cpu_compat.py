"""Megatron-Core on CPU: the compatibility layer (patch ids P1..P16, W1 of notes/megatron-core-on-cpu.md).

Megatron-Core assumes CUDA in ~760 source lines. Rather than editing call sites, this module
redirects the CUDA runtime API it uses (torch.cuda.current_device/synchronize/Stream/Event/RNG)
and installs a process-wide `TorchFunctionMode` that rewrites CUDA device arguments to CPU
(`device="cuda"`, `.to("cuda")`, `.cuda()`) and makes `Tensor.type()` report `torch.cuda.*`
names where Megatron compares them. The few remaining upstream sites are patched one by one.

Every patch is a small function whose docstring names the upstream site (file:function) and the
megatron-core versions it is gated on. Patches to Megatron-Core modules are applied when the
module is imported (a post-import hook), so `install_cpu_compat()` works before and after
`import megatron.core`, and names other modules import with `from x import f` see the fix.

Only `megatron_rpt.platform.setup_platform` should call `install_cpu_compat()`. P9, P10 (and P13)
fix upstream bugs of the torch-optimizer fallback that also hit CUDA runs without Apex/TE; they
are the only ones `install_upstream_fixes()` applies on CUDA. W1 is not CPU-specific (it hits any
run without Apex/TE): it lives in `megatron_rpt.training.checkpointing.prepare_optimizer_for_load`.

Tests may disable patches in a forked worker with `uninstall_patches({...})` to show the failure
each one fixes; never do that in a process that goes on to do real work.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
import types
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
from packaging.version import Version
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

__all__ = [
    "install_cpu_compat",
    "install_upstream_fixes",
    "installed_patches",
    "uninstall_patches",
    "ensure_device_mode",
    "device_mode_active",
    "PATCH_IDS",
]


def _mcore_version() -> Version:
    try:
        return Version(metadata.version("megatron-core"))
    except metadata.PackageNotFoundError:
        return Version("0")


# ---------------------------------------------------------------------------------------------
# Bookkeeping: applied patches, originals (for uninstall in tests), post-import hooks.
# ---------------------------------------------------------------------------------------------

_APPLIED: list[str] = []
_DISABLED: set[str] = set()
_ORIGINALS: dict[str, list[tuple[Any, str, Any, Any]]] = {}  # id -> (obj, attr, old, new)
_LOCK = threading.RLock()


def _set_attr(patch_id: str, obj: Any, name: str, value: Any) -> None:
    """setattr that remembers the original so a test can undo the patch."""
    _ORIGINALS.setdefault(patch_id, []).append((obj, name, getattr(obj, name, _MISSING), value))
    setattr(obj, name, value)


class _Missing:
    pass


_MISSING = _Missing()


def _rebind_everywhere(patch_id: str, module: types.ModuleType, name: str, new: Any) -> None:
    """Replace module.name and every `from module import name` copy in loaded megatron modules.

    Needed when megatron.core was imported before the layer was installed.
    """
    old = getattr(module, name, _MISSING)
    _set_attr(patch_id, module, name, new)
    if old is _MISSING:
        return
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod is module or not mod_name.startswith("megatron."):
            continue
        if getattr(mod, name, None) is old:
            _set_attr(patch_id, mod, name, new)


class _PostImportHooks(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a named module has executed (before importers bind names)."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[Callable[[types.ModuleType], None]]] = {}
        # Context managers wrapped around a module's execution (P1 scopes its stub to one import).
        self.around: dict[str, list[Callable[[], Any]]] = {}

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.hooks and fullname not in self.around:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            with contextlib.ExitStack() as stack:
                for make_context in self.around.get(fullname, ()):
                    stack.enter_context(make_context())
                original_exec(module)
            for hook in self.hooks.get(fullname, ()):
                hook(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_HOOKS = _PostImportHooks()


def _when_imported(patch_id: str, module_name: str, fn: Callable[[types.ModuleType], None]) -> None:
    """Apply fn(module) now if module_name is loaded, else right after it is imported."""

    def guarded(module: types.ModuleType) -> None:
        if patch_id not in _DISABLED:
            fn(module)

    if _HOOKS not in sys.meta_path:
        sys.meta_path.insert(0, _HOOKS)
    _HOOKS.hooks.setdefault(module_name, []).append(guarded)
    if module_name in sys.modules:
        guarded(sys.modules[module_name])


# ---------------------------------------------------------------------------------------------
# The device mode (P3 `.cuda()`, P4, P8): one TorchFunctionMode for everything
# that goes through torch's Python dispatch.
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Patches. Each: id, docstring with upstream site + version gate, idempotent apply.
# ---------------------------------------------------------------------------------------------


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
    """P1: `transformer/moe/ops/paged_stash.py` does an unconditional `import triton` (0.19.x;
    gated on megatron-core >= 0.17 and triton not installed).

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

    if _HOOKS not in sys.meta_path:
        sys.meta_path.insert(0, _HOOKS)
    _HOOKS.around.setdefault(target, []).append(scoped_stub)
    _ORIGINALS.setdefault("P1", []).append((_HOOKS.around, "__around__", (target, scoped_stub), None))


def _p1_applies(v: Version) -> bool:
    import importlib.util

    if v < Version("0.17"):
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
    (all versions; 0.16.x, 0.19.x).

    torch.cuda RNG get/set/manual_seed map to the CPU default generator. Megatron's own
    `_set_cuda_rng_state` is redirected too: on a CPU build it queues its work with
    `torch.cuda._lazy_call`, which never runs, so the tracker would silently not restore state.
    """
    cuda = torch.cuda
    _set_attr("P2", cuda, "get_rng_state", _cpu_get_rng_state)
    _set_attr("P2", cuda, "set_rng_state", _cpu_set_rng_state)
    _set_attr("P2", cuda, "manual_seed", _cpu_manual_seed)
    _set_attr("P2", cuda, "manual_seed_all", _cpu_manual_seed)
    _set_attr("P2", cuda.random, "get_rng_state", _cpu_get_rng_state)
    _set_attr("P2", cuda.random, "set_rng_state", _cpu_set_rng_state)

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
        _rebind_everywhere("P2", mod, "_get_cuda_rng_state", get_state)
        _rebind_everywhere("P2", mod, "_set_cuda_rng_state", set_state)

    _when_imported("P2", "megatron.core.tensor_parallel.random", fix)


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
    p2p_communication / filesystem_async; `.cuda()` in distrib_optimizer (all versions).

    current_device() -> "cpu" (every use is a device argument); synchronize/set_device are no-ops;
    Tensor.cuda() returns the tensor (through the device mode).
    """
    cuda = torch.cuda
    _set_attr("P3", cuda, "current_device", lambda: "cpu")
    _set_attr("P3", cuda, "synchronize", lambda device=None: None)
    _set_attr("P3", cuda, "set_device", lambda device: None)
    _install_device_mode()
    _MODE_FEATURES.add("P3")


def _p4_device_literals() -> None:
    """P4: `device="cuda"` literals in `pipeline_parallel/schedules.py` (loss/num-tokens tensors),
    `optimizer/clip_grads.py`, `optimizer/optimizer.py`, `utils.py`, `transformer/utils.py`,
    `local_multi_tensor_l2_norm` (all versions).

    The device mode rewrites a CUDA `device=` argument, `.to("cuda")` and `pin_memory=True` to CPU.
    """
    _install_device_mode()
    _MODE_FEATURES.add("P4")


def _p5_streams() -> None:
    """P5: CUDA streams/events in `transformer/moe/token_dispatcher.py` (alltoall),
    `distributed/param_and_grad_buffer.py` (`current_stream`), text_generation_controller (Event)
    (all versions).

    torch.cuda.Stream/Event/stream()/current_stream()/default_stream() become no-op objects and
    Tensor.record_stream a no-op (CPU tensors have no stream to record on).
    """
    cuda = torch.cuda
    _set_attr("P5", cuda, "Stream", _NoStream)
    _set_attr("P5", cuda, "Event", _NoEvent)
    _set_attr("P5", cuda, "stream", lambda stream=None: contextlib.nullcontext(stream))
    _set_attr("P5", cuda, "current_stream", lambda device=None: _DEFAULT_STREAM)
    _set_attr("P5", cuda, "default_stream", lambda device=None: _DEFAULT_STREAM)
    # Not through the device mode: the C++ argument parser rejects a non-Stream argument before
    # torch-function dispatch happens.
    _set_attr("P5", torch.Tensor, "record_stream", lambda self, stream: None)


def _p6_split_sizes_to_numpy() -> None:
    """P6: `transformer/moe/moe_utils.py:maybe_move_tensor_to_cpu` converts to numpy only for
    CUDA tensors, so the alltoall dispatcher passes a tensor as split sizes to
    `all_to_all_single` ("incompatible function arguments") (0.16.x and later).
    """

    def fix(mod: types.ModuleType) -> None:
        original = mod.maybe_move_tensor_to_cpu

        def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
            if torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.numpy() if as_numpy else tensor
            return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

        _rebind_everywhere("P6", mod, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)

    _when_imported("P6", "megatron.core.transformer.moe.moe_utils", fix)


def _p7_torch_norm_sequence_parallel() -> None:
    """P7: `transformer/torch_norm.py:WrappedTorchNorm.__new__` asserts sequence parallel is off,
    but MoE with TP>1 requires sequence parallel (all versions without TE).

    Builds the torch norm anyway and tags its parameters `sequence_parallel=True`, so
    `finalize_model_grads` all-reduces their (partial, per-sequence-shard) grads over TP.
    """

    def fix(mod: types.ModuleType) -> None:
        cls = mod.WrappedTorchNorm
        original_new = cls.__new__

        def __new__(klass: type, config: Any, hidden_size: int, eps: float = 1e-5, *args: Any, **kwargs: Any) -> Any:
            if not getattr(config, "sequence_parallel", False):
                return original_new(klass, config, hidden_size, eps, *args, **kwargs)
            config.sequence_parallel = False  # only to pass the assert; restored below
            try:
                norm = original_new(klass, config, hidden_size, eps, *args, **kwargs)
            finally:
                config.sequence_parallel = True
            for p in norm.parameters():
                p.sequence_parallel = True
            return norm

        _set_attr("P7", cls, "__new__", staticmethod(__new__))

    _when_imported("P7", "megatron.core.transformer.torch_norm", fix)


def _p9_optimizer_state_copy() -> None:
    """P9: `optimizer/distrib_optimizer.py:DistributedOptimizer._set_main_param_and_optimizer_states`
    (0.19.2 lines 1219-1225) with the torch AdamW fallback (no Apex/TE, GPU too): copies every key
    of the live state, including `step` that the checkpoint lacks (KeyError: 'step'), and writes
    in place into a leaf that requires grad (all versions).

    Copies only the keys the checkpoint has, under no_grad.
    """

    def fix(mod: types.ModuleType) -> None:
        cls = mod.DistributedOptimizer
        original = cls._set_main_param_and_optimizer_states

        def _set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict) -> None:
            if getattr(self.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
                return original(self, model_param, tensors)
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **self.optimizer.state[main_param]}
            with torch.no_grad():
                for key, value in tensors.items():
                    if key in dst:
                        dst[key].copy_(value)

        _set_attr("P9", cls, "_set_main_param_and_optimizer_states", _set_main_param_and_optimizer_states)

    _when_imported("P9", "megatron.core.optimizer.distrib_optimizer", fix)


def _p10_unshare_step() -> None:
    """P10: `optimizer/distrib_optimizer.py:DistributedOptimizer.load_state_dict` (0.19.2 lines
    1025-1031) gives every param state ONE shared `step` tensor with the torch AdamW fallback;
    torch AdamW increments it in place once per param, so after a resume bias correction uses a
    wrong step. Silent: resumed runs diverge (all versions).

    Gives each param its own copy of `step` after loading.
    """

    def fix(mod: types.ModuleType) -> None:
        cls = mod.DistributedOptimizer
        original = cls.load_state_dict

        def load_state_dict(self: Any, state_dict: dict) -> Any:
            out = original(self, state_dict)
            for state in self.optimizer.state.values():
                step = state.get("step")
                if torch.is_tensor(step):
                    state["step"] = step.detach().clone()
            return out

        _set_attr("P10", cls, "load_state_dict", load_state_dict)

    _when_imported("P10", "megatron.core.optimizer.distrib_optimizer", fix)


def _p8_type_names() -> None:
    """P8: string checks `param.grad.type() == 'torch.cuda.FloatTensor'` in
    `optimizer/clip_grads.py:get_grad_norm_fp32/clip_grad_by_total_norm_fp32`,
    `optimizer/distrib_optimizer.py`, `optimizer/optimizer.py` (all versions).

    Inside the device mode `Tensor.type()` reports `torch.cuda.*` names and
    `Tensor.type('torch.cuda.X')` converts to the CPU type X.
    """
    _install_device_mode()
    _MODE_FEATURES.add("P8")


def _p13_te_general_gemm() -> None:
    """P13: `transformer/moe/moe_utils.py:router_gating_linear` (0.16.1 line 1192) reads
    `te_general_gemm`, which is only defined when Transformer Engine imports -> NameError in every
    MoE router without TE (gated on megatron-core < 0.17).

    Defines it as None when missing.
    """

    def fix(mod: types.ModuleType) -> None:
        if not hasattr(mod, "te_general_gemm"):
            _set_attr("P13", mod, "te_general_gemm", None)

    _when_imported("P13", "megatron.core.transformer.moe.moe_utils", fix)


def _p14_fork_results_queue() -> None:
    """P14 (new; speed, not correctness): `dist_checkpointing/strategies/filesystem_async.py:
    _get_write_results_queue` (0.16.x; `get_write_results_queue(mp_mode)` in 0.19.x) starts a multiprocessing Manager with the *spawn* context on the
    first save of every process: a fresh interpreter importing torch, 4-13 s per rank on 2 cores
    (the "first save 4-7 s warm-up" of the note). Spawn protects CUDA state; a CPU process has
    none, so the Manager is started with fork (~0.05 s). Same queue type (all versions).
    """
    import multiprocessing as mp

    def fix(mod: types.ModuleType) -> None:
        def get_write_results_queue(mp_mode: str = "fork") -> Any:  # noqa: ARG001 - always fork on CPU
            if mod._results_queue is None:
                mod._results_queue = mp.get_context("fork").Manager().Queue()
            return mod._results_queue

        # 0.16.x: `_get_write_results_queue()`; 0.19.x: `get_write_results_queue(mp_mode="spawn")`.
        names = [n for n in ("get_write_results_queue", "_get_write_results_queue") if hasattr(mod, n)]
        if not names:
            raise RuntimeError(f"P14: {mod.__name__} has no (_)get_write_results_queue; update the patch "
                               "for this megatron-core version")
        for name in names:
            _rebind_everywhere("P14", mod, name, get_write_results_queue)

    _when_imported("P14", "megatron.core.dist_checkpointing.strategies.filesystem_async", fix)


def _p15_expert_cpu_init() -> None:
    """P15 (new): `tensor_parallel/layers.py` `ColumnParallelLinear.__init__` / `RowParallelLinear.__init__`
    with `use_cpu_initialization` build every weight from the default torch generator, also for
    experts (`is_expert=True`), where the GPU path (`_initialize_affine_weight_gpu`) forks the
    expert-parallel RNG stream. All EP ranks seed that generator alike, so at EP=N each rank's
    local experts are copies of rank 0's (measured: EP=2 experts 4..7 == 0..3). All versions.

    Expert layers are initialised inside `get_cuda_rng_tracker().fork(expert-parallel name)`
    (P2 makes the tracker drive the CPU generator), as on GPU.
    """

    def fix(mod: types.ModuleType) -> None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

        for cls_name in ("ColumnParallelLinear", "RowParallelLinear"):
            cls = getattr(mod, cls_name)
            original = cls.__init__

            def __init__(self, *args, __original=original, **kwargs):
                config = kwargs.get("config")
                tracker, name = get_cuda_rng_tracker(), get_expert_parallel_rng_tracker_name()
                # Only once the seeds are set (model_parallel_cuda_manual_seed adds the expert stream).
                if kwargs.get("is_expert") and config is not None and config.use_cpu_initialization \
                        and name in tracker.get_states():
                    with tracker.fork(name):
                        return __original(self, *args, **kwargs)
                return __original(self, *args, **kwargs)

            _set_attr("P15", cls, "__init__", __init__)

    _when_imported("P15", "megatron.core.tensor_parallel.layers", fix)


def _p16_uneven_gather_scatter() -> None:
    """P16 (new): `tensor_parallel/mappings.py` `_gather_along_first_dim(output_split_sizes=...)` and
    `_reduce_scatter_along_first_dim(input_split_sizes=...)` call `all_gather` / `reduce_scatter`
    with uneven tensor lists; gloo rejects them ("ProcessGroupGloo::allgather: invalid tensor size")
    and has no reduce_scatter. Hit by the alltoall MoE dispatcher with expert TP > 1
    (`token_dispatcher.py` dispatch_postprocess / combine_preprocess). All versions.

    Uneven gather: pad every rank's part to the largest, all-gather, drop the padding. Uneven
    reduce-scatter: all-reduce the whole input and keep this rank's part (more traffic, same sums).
    Even (split sizes None) calls are untouched.
    """

    def fix(mod: types.ModuleType) -> None:
        gather, scatter = mod._gather_along_first_dim, mod._reduce_scatter_along_first_dim

        def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
            if output_split_sizes is None or group is None or group.size() == 1:
                return gather(input_, group, output_split_sizes, use_global_buffer)
            sizes = [int(n) for n in output_split_sizes]
            biggest = max(sizes)
            padded = input_.new_zeros((biggest,) + tuple(input_.shape[1:]))
            padded[: input_.shape[0]] = input_
            parts = [torch.empty_like(padded) for _ in sizes]
            torch.distributed.all_gather(parts, padded.contiguous(), group=group)
            return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)

        def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
            if input_split_sizes is None or group is None or group.size() == 1:
                return scatter(input_, group, input_split_sizes, use_global_buffer)
            total = input_.clone()
            torch.distributed.all_reduce(total, group=group)
            start = sum(int(n) for n in input_split_sizes[: group.rank()])
            return total[start:start + int(input_split_sizes[group.rank()])].contiguous()

        _rebind_everywhere("P16", mod, "_gather_along_first_dim", _gather_along_first_dim)
        _rebind_everywhere("P16", mod, "_reduce_scatter_along_first_dim", _reduce_scatter_along_first_dim)

    _when_imported("P16", "megatron.core.tensor_parallel.mappings", fix)


@dataclass(frozen=True)
class _Patch:
    id: str
    apply: Callable[[], None]
    applies: Callable[[Version], bool]
    cpu_only: bool  # False: an upstream bug that also hits CUDA runs (applied there as well)


_ALL = lambda v: True  # noqa: E731

_PATCHES: tuple[_Patch, ...] = (
    _Patch("P1", _p1_triton_stub, _p1_applies, True),
    _Patch("P2", _p2_rng, _ALL, True),
    _Patch("P3", _p3_current_device, _ALL, True),
    _Patch("P4", _p4_device_literals, _ALL, True),
    _Patch("P5", _p5_streams, _ALL, True),
    _Patch("P6", _p6_split_sizes_to_numpy, _ALL, True),
    _Patch("P7", _p7_torch_norm_sequence_parallel, _ALL, True),
    _Patch("P8", _p8_type_names, _ALL, True),
    _Patch("P9", _p9_optimizer_state_copy, _ALL, False),
    _Patch("P10", _p10_unshare_step, _ALL, False),
    _Patch("P13", _p13_te_general_gemm, lambda v: v < Version("0.17"), False),
    _Patch("P14", _p14_fork_results_queue, _ALL, True),
    _Patch("P15", _p15_expert_cpu_init, _ALL, True),
    _Patch("P16", _p16_uneven_gather_scatter, _ALL, True),
)

PATCH_IDS: tuple[str, ...] = tuple(p.id for p in _PATCHES)


def _install(selected: Iterable[_Patch], exclude: Collection[str]) -> list[str]:
    unknown = set(exclude) - set(PATCH_IDS)
    if unknown:
        raise ValueError(f"unknown patch ids {sorted(unknown)}; known: {list(PATCH_IDS)}")
    version = _mcore_version()
    with _LOCK:
        for patch in selected:
            if patch.id in exclude or patch.id in _APPLIED or not patch.applies(version):
                continue
            _DISABLED.discard(patch.id)
            patch.apply()
            _APPLIED.append(patch.id)
        ensure_device_mode()
        return list(_APPLIED)


def install_cpu_compat(exclude: Collection[str] = ()) -> list[str]:
    """Apply every patch that applies to the installed megatron-core; idempotent.

    Returns the ids applied so far in this process. `exclude` leaves patches out (for tests in a
    fresh forked/sub process: a later call without `exclude` still installs them).
    """
    return _install(_PATCHES, exclude)


def install_upstream_fixes() -> list[str]:
    """Apply only the platform-independent fixes (P9, P10, P13): used on CUDA."""
    return _install((p for p in _PATCHES if not p.cpu_only), ())


def installed_patches() -> list[str]:
    """Ids of the patches applied in this process, in installation order."""
    return list(_APPLIED)


def uninstall_patches(ids: Collection[str]) -> None:
    """Undo patches (tests only, in a forked worker): restores the originals they replaced."""
    with _LOCK:
        for pid in ids:
            if pid not in _APPLIED:
                continue
            for obj, name, old, new in reversed(_ORIGINALS.pop(pid, [])):
                if obj is _HOOKS.around and name == "__around__":
                    target, context = old
                    with contextlib.suppress(KeyError, ValueError):
                        _HOOKS.around[target].remove(context)
                    continue
                if old is _MISSING:
                    with contextlib.suppress(AttributeError):
                        delattr(obj, name)
                    continue
                setattr(obj, name, old)
                if isinstance(obj, types.ModuleType):
                    # Modules imported after the patch bound the new object by name: undo those too.
                    for mod_name, mod in list(sys.modules.items()):
                        if mod is not None and mod_name.startswith("megatron.") and getattr(mod, name, None) is new:
                            setattr(mod, name, old)
            _MODE_FEATURES.discard(pid)
            _DISABLED.add(pid)
            _APPLIED.remove(pid)
