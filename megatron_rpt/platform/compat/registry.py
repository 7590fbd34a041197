"""The patch table of the CPU layer and its installation: P1..P17, install/uninstall.

`install_cpu_compat()` applies every patch that the installed megatron-core needs (on CPU);
`install_upstream_fixes()` only those that fix upstream bugs or gaps hitting CUDA runs too (P9, P10, P13, P17).
Only `megatron_rpt.platform.setup_platform` calls them. Both are idempotent and return the ids
applied so far. The patches themselves live in `cuda_stubs.py`, `cpu_fixes.py` and
`upstream_fixes.py`; how they are applied in `hooks.py` and `device_mode.py`.

Version gates: every patch states the megatron-core range it was checked against (`_Patch.checked`,
today `CHECKED` = >=0.16,<0.20 for all) and, inside it, whether a version needs it (`_Patch.applies`:
P1 >=0.17 without triton, P13 <0.17, the others always). Installing with a megatron-core outside a
selected patch's checked range raises MegatronCoreVersionError naming the version, the patch ids and
the range, before anything is applied: a newer release may have moved the code a patch replaces, and
neither applying nor skipping it silently is safe.

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

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megatron_rpt.platform.compat import cpu_fixes, cuda_stubs, device_mode, hooks, upstream_fixes

__all__ = ["install_cpu_compat", "install_upstream_fixes", "installed_patches", "uninstall_patches", "PATCH_IDS",
           "CHECKED", "MegatronCoreVersionError"]


# The megatron-core versions every patch was checked against: the repository is tested with 0.16.1
# (CPU machines, Python 3.11) and 0.19.2 (GPU machines, Python 3.12). Versions in between are assumed
# to behave like one of them. Outside a patch's range the installation fails (MegatronCoreVersionError)
# instead of applying or skipping patches that may no longer match the upstream code.
CHECKED = ">=0.16,<0.20"
TESTED_VERSIONS = ("0.16.1", "0.19.2")


class MegatronCoreVersionError(RuntimeError):
    """The installed megatron-core is outside the range some patch was checked against."""


def _mcore_version() -> Version:
    try:
        return Version(metadata.version("megatron-core"))
    except metadata.PackageNotFoundError:
        return Version("0")


def _always(v: Version) -> bool:
    return True


@dataclass(frozen=True)
class _Patch:
    id: str
    apply: Callable[[], None]
    cpu_only: bool  # False: an upstream bug that also hits CUDA runs (applied there as well)
    checked: str = CHECKED  # PEP 440 range of megatron-core this patch was checked against
    applies: Callable[[Version], bool] = _always  # within `checked`: whether this version needs it

    def checked_for(self, version: Version) -> bool:
        return SpecifierSet(self.checked).contains(version, prereleases=True)


_PATCHES: tuple[_Patch, ...] = (
    _Patch("P1", cuda_stubs._p1_triton_stub, True, applies=cuda_stubs._p1_applies),
    _Patch("P2", cuda_stubs._p2_rng, True),
    _Patch("P3", cuda_stubs._p3_current_device, True),
    _Patch("P4", cuda_stubs._p4_device_literals, True),
    _Patch("P5", cuda_stubs._p5_streams, True),
    _Patch("P6", cpu_fixes._p6_split_sizes_to_numpy, True),
    _Patch("P7", cpu_fixes._p7_torch_norm_sequence_parallel, True),
    _Patch("P8", cuda_stubs._p8_type_names, True),
    _Patch("P9", upstream_fixes._p9_optimizer_state_copy, False),
    _Patch("P10", upstream_fixes._p10_unshare_step, False),
    _Patch("P13", upstream_fixes._p13_te_general_gemm, False, applies=upstream_fixes._p13_applies),
    _Patch("P14", cpu_fixes._p14_fork_results_queue, True),
    _Patch("P15", cpu_fixes._p15_expert_cpu_init, True),
    _Patch("P16", cpu_fixes._p16_uneven_gather_scatter, True),
    _Patch("P17", upstream_fixes._p17_zero_centred_torch_norm, False),  # after P7: wraps its __new__
)

PATCH_IDS: tuple[str, ...] = tuple(p.id for p in _PATCHES)

_APPLIED: list[str] = []


def _version_error(version: Version, outside: list[_Patch]) -> MegatronCoreVersionError:
    by_range: dict[str, list[str]] = {}
    for patch in outside:
        by_range.setdefault(patch.checked, []).append(patch.id)
    installed = ("megatron-core is not installed" if version == Version("0")
                 else f"megatron-core {version} is installed")
    checked = "; ".join(f"{', '.join(ids)}: megatron-core {rng}" for rng, ids in by_range.items())
    pin = ",".join(by_range)
    return MegatronCoreVersionError(
        f"{installed}, but megatron_rpt's compatibility patches for Megatron-Core were checked only against "
        f"other versions ({checked}). Install a checked version (pip install 'megatron-core{pin}'; tested: "
        f"{', '.join(TESTED_VERSIONS)}), or check these patches against {version} (docs/megatron-core-on-cpu.md "
        "names each one's upstream site and test) and widen their range in megatron_rpt/platform/compat/registry.py.")


def _install(selected: Iterable[_Patch], exclude: Collection[str]) -> list[str]:
    unknown = set(exclude) - set(PATCH_IDS)
    if unknown:
        raise ValueError(f"unknown patch ids {sorted(unknown)}; known: {list(PATCH_IDS)}")
    version = _mcore_version()
    selected = [p for p in selected if p.id not in exclude]
    outside = [p for p in selected if not p.checked_for(version)]
    if outside:  # before anything is applied
        raise _version_error(version, outside)
    with hooks.LOCK:
        for patch in selected:
            if patch.id in _APPLIED or not patch.applies(version):
                continue
            hooks.DISABLED.discard(patch.id)
            patch.apply()
            _APPLIED.append(patch.id)
        device_mode.ensure_device_mode()
        return list(_APPLIED)


def install_cpu_compat(exclude: Collection[str] = ()) -> list[str]:
    """Apply every patch that applies to the installed megatron-core; idempotent.

    Raises MegatronCoreVersionError, before applying anything, when megatron-core is outside the
    range a patch was checked against (`CHECKED`). Returns the ids applied so far in this process. `exclude` leaves patches out (for tests in a
    fresh forked/sub process: a later call without `exclude` still installs them).
    """
    return _install(_PATCHES, exclude)


def install_upstream_fixes() -> list[str]:
    """Apply only the platform-independent fixes (P9, P10, P13, P17): used on CUDA.

    Raises MegatronCoreVersionError like `install_cpu_compat`, for these patches' ranges."""
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
