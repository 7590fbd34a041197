"""Platform choice for the whole process: device type, collective backend and optional GPU extras.

`setup_platform()` is called once at start-up (entry points, test harness) before any model is
built. It picks CUDA + NCCL when a GPU is usable, otherwise CPU + gloo, and on CPU installs the
Megatron-Core compatibility layer (`megatron_rpt.platform.compat`), and prints one line saying what
the process runs on. Everything CPU-specific lives in this package; the rest of the code asks
`get_platform()` instead of testing for CUDA. Megatron-Core's "Transformer Engine / Apex not
installed" warnings are silenced when `megatron_rpt` is imported (`messages.py`).

This module does not import torch at import time (the data tools import the package through
`megatron_rpt/__init__.py`). See docs/megatron-core-on-cpu.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Platform", "GPUInfo", "setup_platform", "get_platform", "detect_transformer_engine", "detect_apex"]

# Failures seen when importing partially installed GPU packages (docs/megatron-core-on-cpu.md, GPU-side dependencies):
# a TE core wheel without cuDNN raises RuntimeError / OSError, not ImportError.
_IMPORT_FAILURES = (ImportError, OSError, RuntimeError)


@dataclass(frozen=True)
class GPUInfo:
    name: str                       # e.g. "NVIDIA H100 80GB HBM3"
    capability: tuple[int, int]     # CUDA compute capability (major, minor)


@dataclass(frozen=True)
class Platform:
    """What this process runs on. Chosen once by `setup_platform`."""

    device_type: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"
    transformer_engine: bool  # TE importable AND CUDA present
    apex: bool  # NVIDIA Apex (fused optimizers) importable AND CUDA present
    megatron_core_version: str
    # Batched p2p (torch.distributed.batch_isend_irecv) in Megatron-Core pipeline schedules.
    # False on gloo: with interleaved PP=2 the previous and next stage are the same peer and gloo
    # matches sends/recvs in posting order, so batched messages cross (silently wrong grads).
    batch_p2p_comm: bool
    # Apex's fused_weight_gradient_mlp_cuda (Megatron-Core's ColumnParallelLinear, i.e. our output layer,
    # refuses --gradient-accumulation-fusion without it, even with TE layers).
    wgrad_accumulation_fusion: bool = False

    def device(self, local_rank: int = 0) -> torch.device:
        """The torch device of a rank with this local rank."""
        import torch

        if self.device_type == "cuda":
            return torch.device("cuda", local_rank)
        return torch.device("cpu")

    def gpu(self, local_rank: int = 0) -> "GPUInfo | None":
        """Name and compute capability of a rank's CUDA device (None on CPU, or when that device is not
        visible: distributed.init_distributed reports it). Asked when needed: choosing the platform must
        not touch a device (it runs before ranks pick theirs)."""
        import torch

        if self.device_type != "cuda" or local_rank >= torch.cuda.device_count():
            return None
        props = torch.cuda.get_device_properties(local_rank)
        return GPUInfo(props.name, (props.major, props.minor))

    def cpu_threads(self, local_world_size: int, environ: dict | None = None) -> int | None:
        """Intra-op threads for one of `local_world_size` ranks sharing this node's cores.

        On CPU, ranks that each use every core oversubscribe the machine (srun does not set
        OMP_NUM_THREADS as torchrun does); each gets cores // ranks, at least 1. An explicit
        OMP_NUM_THREADS wins, and on CUDA the host threads are left alone (None).
        """
        env = os.environ if environ is None else environ
        if self.device_type != "cpu" or env.get("OMP_NUM_THREADS"):
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(1, local_world_size))

    @property
    def caching_allocator(self) -> bool:
        """Whether the device keeps freed memory cached for reuse (CUDA's allocator), so that
        `empty_cache` has something to release. CPU memory goes back to the C allocator at once."""
        return self.device_type == "cuda"

    def empty_cache(self) -> None:
        """Release the caching allocator's unused blocks (--empty-unused-memory-level); nothing on CPU."""
        if self.caching_allocator:
            import torch

            torch.cuda.empty_cache()

    @property
    def pin_memory(self) -> bool:
        """Whether data loaders pin host batches (faster non-blocking copies to a GPU; no GPU: no use)."""
        return self.device_type == "cuda"

    @property
    def nsys_capture(self) -> bool:
        """Whether --profile can open an nsys capture range (cudaProfilerStart/Stop and NVTX: CUDA only)."""
        return self.device_type == "cuda"

    def profiler_activities(self) -> list:
        """The torch profiler's activities here: CPU, and CUDA kernels on a GPU."""
        from torch.profiler import ProfilerActivity

        return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device_type == "cuda" else [])

    def describe(self) -> str:
        """What this process runs on, for the start-up line: device, backend, megatron-core, and which
        optional GPU backends are used (and why not)."""
        te = ("True (Transformer Engine layer specs)" if self.transformer_engine
              else f"False ({_why_unused('transformer_engine', self.device_type)}; local layer specs)")
        apex = "True" if self.apex else f"False ({_why_unused('apex', self.device_type)})"
        return (f"{self.device_type}, {self.backend}, megatron-core {self.megatron_core_version}, "
                f"transformer engine: {te}, apex: {apex}")


def _why_unused(module: str, device_type: str) -> str:
    try:
        installed = importlib.util.find_spec(module) is not None
    except (ValueError, *_IMPORT_FAILURES):
        installed = False
    if not installed:
        return "not installed"
    return "does not import" if device_type == "cuda" else "needs CUDA"


def _rank_zero() -> bool:
    """Global rank 0 from the launcher's environment (no process group exists yet)."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return rank.strip() == "0"


_PLATFORM: Platform | None = None


def _megatron_core_version() -> str:
    # Read from package metadata: importing megatron.core here would run before P1 is in place.
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return "0"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except _IMPORT_FAILURES:
        return False
    return True


def detect_transformer_engine(cuda: bool) -> bool:
    """True when Transformer Engine's PyTorch API imports and CUDA is present.

    Any import failure (ImportError, OSError, RuntimeError: partial installs without CUDA/cuDNN)
    means "no TE". Without CUDA the import is not attempted at all.
    """
    return cuda and _importable("transformer_engine.pytorch")


def detect_apex(cuda: bool) -> bool:
    """True when NVIDIA Apex's fused optimizers import and CUDA is present.

    An unrelated PyPI package named `apex` also imports as `apex`; Megatron-Core then picks Apex
    code paths and fails, so we warn about it here (it must be uninstalled).
    """
    try:
        spec = importlib.util.find_spec("apex")
    except (ValueError, *_IMPORT_FAILURES):
        spec = None
    if spec is None:
        return False
    try:
        importlib.import_module("apex.optimizers")
        nvidia_apex = True
    except (AttributeError, *_IMPORT_FAILURES):
        nvidia_apex = False
    if not nvidia_apex:
        warnings.warn(
            "A top-level module 'apex' is importable but it is not NVIDIA Apex; Megatron-Core "
            "will select Apex code paths and fail. Uninstall it (pip uninstall apex).",
            RuntimeWarning,
            stacklevel=2,
        )
    return nvidia_apex and cuda


def setup_platform(force_cpu: bool = False) -> Platform:
    """Choose the platform for this process (idempotent: the first choice wins).

    CUDA + NCCL when `torch.cuda.is_available()` and not `force_cpu`; else CPU + gloo with the
    Megatron-Core CPU compatibility layer installed. Safe to call before or after
    `megatron.core` is imported. Raises RuntimeError when asked for CPU after CUDA was chosen
    (the CPU layer would redirect CUDA calls of a process that already uses the GPU), and
    `compat.registry.MegatronCoreVersionError` when megatron-core is outside the checked range.
    The first call prints one line on global rank 0: "> platform: " + `Platform.describe()`.
    """
    global _PLATFORM
    if _PLATFORM is not None:
        if force_cpu and _PLATFORM.device_type != "cpu":
            raise RuntimeError(
                "setup_platform(force_cpu=True) after the CUDA platform was chosen in this process"
            )
        return _PLATFORM

    import torch

    from megatron_rpt.platform.compat import registry

    cuda = torch.cuda.is_available() and not force_cpu
    if cuda:
        # Upstream bugs of the torch-optimizer fallback hit GPU runs without Apex/TE too.
        registry.install_upstream_fixes()
    else:
        registry.install_cpu_compat()
    _PLATFORM = Platform(
        device_type="cuda" if cuda else "cpu",
        backend="nccl" if cuda else "gloo",
        transformer_engine=detect_transformer_engine(cuda),
        apex=detect_apex(cuda),
        megatron_core_version=_megatron_core_version(),
        batch_p2p_comm=cuda,
        wgrad_accumulation_fusion=cuda and _importable("fused_weight_gradient_mlp_cuda"),
    )
    if _rank_zero():
        print(f"> platform: {_PLATFORM.describe()}", flush=True)
    return _PLATFORM


def get_platform() -> Platform:
    """The platform chosen by `setup_platform`; RuntimeError if it was not called."""
    if _PLATFORM is None:
        raise RuntimeError("get_platform() called before setup_platform()")
    return _PLATFORM
