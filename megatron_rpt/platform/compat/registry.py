"""The patch table of the CPU layer and its installation: P1..P16, install/uninstall.

`install_cpu_compat()` applies every patch that the installed megatron-core needs (on CPU);
`install_upstream_fixes()` only those that fix upstream bugs hitting CUDA runs too (P9, P10, P13).
Only `megatron_rpt.platform.setup_platform` calls them. Both are idempotent and return the ids
applied so far. The patches themselves live in `cuda_stubs.py`, `cpu_fixes.py` and
`upstream_fixes.py`; how they are applied in `hooks.py` and `device_mode.py`.

W1 is not CPU-specific (it hits any run without Apex/TE): it lives in
`megatron_rpt.training.checkpointing.prepare_optimizer_for_load`.

Tests may disable patches in a forked worker with `uninstall_patches({...})` to show the failure
each one fixes; never do that in a process that goes on to do real work.
See docs/megatron-core-on-cpu.md.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from importlib import metadata

from packaging.version import Version

from megatron_rpt.platform.compat import cpu_fixes, cuda_stubs, device_mode, hooks, upstream_fixes

__all__ = ["install_cpu_compat", "install_upstream_fixes", "installed_patches", "uninstall_patches", "PATCH_IDS"]


def _mcore_version() -> Version:
    try:
        return Version(metadata.version("megatron-core"))
    except metadata.PackageNotFoundError:
        return Version("0")


@dataclass(frozen=True)
class _Patch:
    id: str
    apply: Callable[[], None]
    applies: Callable[[Version], bool]
    cpu_only: bool  # False: an upstream bug that also hits CUDA runs (applied there as well)


_ALL = lambda v: True  # noqa: E731

_PATCHES: tuple[_Patch, ...] = (
    _Patch("P1", cuda_stubs._p1_triton_stub, cuda_stubs._p1_applies, True),
    _Patch("P2", cuda_stubs._p2_rng, _ALL, True),
    _Patch("P3", cuda_stubs._p3_current_device, _ALL, True),
    _Patch("P4", cuda_stubs._p4_device_literals, _ALL, True),
    _Patch("P5", cuda_stubs._p5_streams, _ALL, True),
    _Patch("P6", cpu_fixes._p6_split_sizes_to_numpy, _ALL, True),
    _Patch("P7", cpu_fixes._p7_torch_norm_sequence_parallel, _ALL, True),
    _Patch("P8", cuda_stubs._p8_type_names, _ALL, True),
    _Patch("P9", upstream_fixes._p9_optimizer_state_copy, _ALL, False),
    _Patch("P10", upstream_fixes._p10_unshare_step, _ALL, False),
    _Patch("P13", upstream_fixes._p13_te_general_gemm, lambda v: v < Version("0.17"), False),
    _Patch("P14", cpu_fixes._p14_fork_results_queue, _ALL, True),
    _Patch("P15", cpu_fixes._p15_expert_cpu_init, _ALL, True),
    _Patch("P16", cpu_fixes._p16_uneven_gather_scatter, _ALL, True),
)

PATCH_IDS: tuple[str, ...] = tuple(p.id for p in _PATCHES)

_APPLIED: list[str] = []


def _install(selected: Iterable[_Patch], exclude: Collection[str]) -> list[str]:
    unknown = set(exclude) - set(PATCH_IDS)
    if unknown:
        raise ValueError(f"unknown patch ids {sorted(unknown)}; known: {list(PATCH_IDS)}")
    version = _mcore_version()
    with hooks.LOCK:
        for patch in selected:
            if patch.id in exclude or patch.id in _APPLIED or not patch.applies(version):
                continue
            hooks.DISABLED.discard(patch.id)
            patch.apply()
            _APPLIED.append(patch.id)
        device_mode.ensure_device_mode()
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
    with hooks.LOCK:
        for pid in ids:
            if pid not in _APPLIED:
                continue
            hooks.undo(pid)
            device_mode.disable_feature(pid)
            _APPLIED.remove(pid)
