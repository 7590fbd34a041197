"""Unit tests of megatron_rpt.platform: platform choice, optional-package detection, patch
bookkeeping, the device mode (threads, fork, overhead) and the P1 triton stub.

Tests that change process-wide state run in a forked child (`run_ranks(..., 1)`), so the pytest
process keeps one consistent platform.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import time
from typing import Any

import pytest
import torch
from packaging.version import Version

import megatron_rpt.platform as platform_mod
from megatron_rpt.platform import get_platform, setup_platform
from megatron_rpt.platform.compat import cuda_stubs, device_mode, registry
from tests.dist_harness import RankError, run_ranks


def test_cpu_platform_chosen_without_cuda() -> None:
    p = setup_platform(force_cpu=True)
    assert not torch.cuda.is_available()  # CPU torch build on this machine
    assert (p.device_type, p.backend, p.batch_p2p_comm) == ("cpu", "gloo", False)
    assert p.transformer_engine is False and p.apex is False
    assert p.megatron_core_version.startswith("0.")
    assert p.device(3) == torch.device("cpu")
    assert get_platform() is p
    assert setup_platform() is p  # idempotent, first choice wins
    with pytest.raises(Exception):
        p.device_type = "cuda"  # type: ignore[misc]  # frozen


def _fresh_setup(rank: int, world: int, cuda_available: bool) -> tuple[Any, ...]:
    platform_mod._PLATFORM = None
    with pytest.raises(RuntimeError, match="before setup_platform"):
        get_platform()
    torch.cuda.is_available = lambda: cuda_available  # type: ignore[assignment]
    chosen = setup_platform()
    forced = setup_platform(force_cpu=False)
    return chosen.device_type, chosen.backend, chosen.batch_p2p_comm, forced is chosen, chosen.device(1)


def test_auto_selection_follows_cuda_availability() -> None:
    assert run_ranks(_fresh_setup, 1, False)[0] == ("cpu", "gloo", False, True, torch.device("cpu"))
    # With CUDA "available" (simulated) the CUDA platform is chosen; no device is touched.
    assert run_ranks(_fresh_setup, 1, True)[0] == ("cuda", "nccl", True, True, torch.device("cuda", 1))


class _BrokenTE(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import transformer_engine...` fail the way partial installs do."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname.split(".")[0] == "transformer_engine":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [ImportError("no TE"), OSError("libcudnn.so.9: cannot open"), RuntimeError("cudnn shared object not found")],
)
def test_transformer_engine_detection_survives_broken_installs(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    for name in [m for m in sys.modules if m.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTE(exc), *sys.meta_path])
    assert platform_mod.detect_transformer_engine(cuda=True) is False
    assert platform_mod.detect_transformer_engine(cuda=False) is False


def test_transformer_engine_detected_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    te = types.ModuleType("transformer_engine")
    te_pt = types.ModuleType("transformer_engine.pytorch")
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te_pt)
    assert platform_mod.detect_transformer_engine(cuda=True) is True
    assert platform_mod.detect_transformer_engine(cuda=False) is False  # TE needs CUDA


def test_unrelated_apex_package_warns_and_is_not_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    fake = types.ModuleType("apex")  # like the unrelated PyPI `apex`: no apex.optimizers
    fake.__spec__ = importlib.machinery.ModuleSpec("apex", None)
    monkeypatch.setitem(sys.modules, "apex", fake)
    with pytest.warns(RuntimeWarning, match="not NVIDIA Apex"):
        assert platform_mod.detect_apex(cuda=True) is False


def test_patch_set_for_installed_megatron_core() -> None:
    setup_platform(force_cpu=True)
    applied = registry.installed_patches()
    # 0.16.x: no triton import (P1 off), te_general_gemm NameError (P13 on). 0.19.x: P13 off (fixed
    # upstream), P1 on only where triton is not installed.
    version = registry._mcore_version()
    assert ("P1" in applied) == cuda_stubs._p1_applies(version)
    assert ("P13" in applied) == (version < Version("0.17"))
    for pid in ("P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P10", "P14", "P15", "P16", "P17"):
        assert pid in applied
    assert registry.install_cpu_compat() == applied  # idempotent
    with pytest.raises(ValueError, match="unknown patch"):
        registry.install_cpu_compat(exclude={"P99"})
    for patch in registry._PATCHES:  # every patch documents its upstream site
        assert patch.apply.__doc__ and ".py" in patch.apply.__doc__, patch.id


def test_every_patch_states_its_checked_range() -> None:
    """Each patch's docstring states the megatron-core range it was checked against, and whether it
    also runs on GPU; the installed megatron-core is inside every range."""
    for patch in registry._PATCHES:
        doc = patch.apply.__doc__ or ""
        assert f"megatron-core {patch.checked}" in doc, patch.id
        assert ("Runs on GPU too" in doc) == (not patch.cpu_only), patch.id
        assert ("CPU only" in doc) == patch.cpu_only, patch.id
        assert patch.checked_for(registry._mcore_version()), patch.id
    assert {p.id for p in registry._PATCHES if not p.cpu_only} == {"P9", "P10", "P13", "P17"}


@pytest.mark.parametrize("fake", ["0.20.0", "0.20.0rc1", "0.15.2", "0"])
def test_megatron_core_outside_checked_range_fails_at_install(monkeypatch: pytest.MonkeyPatch, fake: str) -> None:
    """Outside a patch's checked range the installation fails with one error naming the version, the
    patch ids, the range and the way out, and applies nothing (no torch work: safe in this process)."""
    before = registry.installed_patches()
    monkeypatch.setattr(registry, "_mcore_version", lambda: Version(fake))
    with pytest.raises(registry.MegatronCoreVersionError) as err:
        registry.install_cpu_compat(exclude={"P14"})
    msg = str(err.value)
    installed = "megatron-core is not installed" if fake == "0" else f"megatron-core {fake} is installed"
    assert msg.startswith(installed), msg
    ids = ", ".join(pid for pid in registry.PATCH_IDS if pid != "P14")  # P1 and P13 too: their ranges are checked
    assert f"({ids}: megatron-core >=0.16,<0.20)" in msg, msg
    assert "pip install 'megatron-core>=0.16,<0.20'" in msg and "0.16.1, 0.19.2" in msg
    with pytest.raises(registry.MegatronCoreVersionError, match=r"\(P9, P10, P13, P17: megatron-core "
                                                                r">=0\.16,<0\.20\)\. Install"):
        registry.install_upstream_fixes()   # what CUDA runs install
    assert registry.installed_patches() == before


def _reinstall_at(rank: int, world: int, fake: str) -> tuple:
    """In a forked worker: undo every patch, then install again as megatron-core `fake`."""
    registry.uninstall_patches(set(registry.PATCH_IDS))
    undone = (registry.installed_patches(), torch.cuda.current_device is not None and
              getattr(torch.cuda.current_device, "__module__", "") == "torch.cuda")
    registry._mcore_version = lambda: Version(fake)   # this worker only
    applied = registry.install_cpu_compat()
    return undone, applied, torch.cuda.current_device(), registry.install_upstream_fixes() == applied


@pytest.mark.parametrize("fake", ["0.16.5", "0.19.9"])
def test_megatron_core_inside_checked_range_applies(fake: str) -> None:
    (undone, applied, device, upstream_idempotent), = run_ranks(_reinstall_at, 1, fake)
    assert undone == ([], True)
    expected = [pid for pid in registry.PATCH_IDS if pid not in ("P1", "P13")]
    expected += ["P1"] * cuda_stubs._p1_applies(Version(fake)) + ["P13"] * (Version(fake) < Version("0.17"))
    assert sorted(applied) == sorted(expected)
    assert device == "cpu" and upstream_idempotent


def _device_mode_probe(rank: int, world: int) -> dict:
    seen: dict[str, Any] = {"fork": device_mode.device_mode_active()}

    def in_thread() -> None:
        seen["thread"] = device_mode.device_mode_active()
        seen["thread_tensor"] = torch.zeros(2, device="cuda").device.type

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    x = torch.ones(3)
    seen.update(
        factory=torch.empty(2, device="cuda").device.type,
        factory_dev=torch.zeros(2, device=torch.device("cuda", 0)).device.type,
        to=x.to("cuda").device.type,
        to_kw=x.to(device="cuda:0", dtype=torch.float64).dtype,
        cuda_is_self=x.cuda() is x,
        type_name=x.type(),
        type_conv=x.type("torch.cuda.DoubleTensor").dtype,
        current_device=torch.cuda.current_device(),
        pinned=torch.empty(2, pin_memory=True).is_pinned(),
    )
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
        x.record_stream(stream)
    ev = torch.cuda.Event()
    ev.record()
    seen["event"] = ev.query()
    return seen


def test_device_mode_in_forked_workers_and_threads() -> None:
    (seen,) = run_ranks(_device_mode_probe, 1)
    assert seen == {
        "fork": True,
        "thread": True,
        "thread_tensor": "cpu",
        "factory": "cpu",
        "factory_dev": "cpu",
        "to": "cpu",
        "to_kw": torch.float64,
        "cuda_is_self": True,
        "type_name": "torch.cuda.FloatTensor",
        "type_conv": torch.float64,
        "current_device": "cpu",
        "pinned": False,
        "event": True,
    }


def _uninstall_probe(rank: int, world: int) -> tuple[str, bool]:
    registry.uninstall_patches({"P8", "P3"})
    x = torch.ones(1)
    try:
        x.cuda()
        moved = True
    except (RuntimeError, AssertionError):
        moved = False
    return x.type(), moved


def test_uninstall_restores_upstream_behaviour() -> None:
    assert run_ranks(_uninstall_probe, 1)[0] == ("torch.FloatTensor", False)


def test_device_mode_overhead_is_small() -> None:
    """Per-call cost of the mode on a tiny op; it is paid on every torch call on CPU."""
    setup_platform(force_cpu=True)
    a, b = torch.randn(8), torch.randn(8)

    def bench() -> float:
        for _ in range(200):
            torch.add(a, b)
        t0 = time.perf_counter()
        for _ in range(20000):
            torch.add(a, b)
        return (time.perf_counter() - t0) / 20000

    with_mode = min(bench() for _ in range(3))
    with torch._C.DisableTorchFunction():
        without = min(bench() for _ in range(3))
    overhead_us = (with_mode - without) * 1e6
    print(f"device mode overhead: {overhead_us:.2f} us/call ({without * 1e6:.2f} -> {with_mode * 1e6:.2f})")
    assert overhead_us < 10.0


_FAKE_PAGED_STASH = """
import triton
import triton.language as tl


@triton.jit
def kernel(x_ptr, BLOCK: tl.constexpr):
    \"\"\"doc\"\"\"
"""


class _NoTriton:
    """Meta-path finder that makes `triton` (and submodules) unimportable, as on a machine without it."""

    def find_spec(self, name, path=None, target=None):  # noqa: ARG002
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (simulated)")
        return None


def _triton_stub_probe(rank: int, world: int, folder: str) -> tuple:
    """Simulate megatron-core 0.19's paged_stash on a machine without triton (triton may well be
    installed here: the test extra brings it for the loss kernels, so hide it first)."""
    import importlib.util

    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _NoTriton())
    import torch.utils._triton as tt
    tt.has_triton_package.cache_clear()
    real = cuda_stubs._p1_applies
    try:
        import triton  # noqa: F401
        failed = False
    except ImportError:
        failed = True
    sys.path.insert(0, folder)
    cuda_stubs._p1_triton_stub(target="fake_paged_stash")
    import fake_paged_stash

    try:
        fake_paged_stash.kernel[(1,)](None, BLOCK=4)
        launched = True
    except RuntimeError:
        launched = False
    try:  # the stub is gone once the target module executed
        import triton  # noqa: F401,F811
        visible_after = True
    except ImportError:
        visible_after = False
    import torch._inductor.utils  # noqa: F401  - failed on `triton.backends` with a global stub
    try:
        hidden = importlib.util.find_spec("triton") is None
    except ImportError:
        hidden = True

    return (failed, fake_paged_stash.kernel.__name__, launched, real(Version("0.16.1")),
            tt.has_triton_package(), visible_after, hidden)


def test_p1_triton_stub_allows_import_but_not_launch(tmp_path) -> None:
    (tmp_path / "fake_paged_stash.py").write_text(_FAKE_PAGED_STASH)
    failed, name, launched, applies_016, torch_sees_triton, visible_after, hidden = run_ranks(
        _triton_stub_probe, 1, str(tmp_path))[0]
    assert hidden                      # the simulation really hid triton
    assert failed and name == "kernel" and not launched
    assert applies_016 is False
    assert torch_sees_triton is False and visible_after is False  # only the target module sees the stub


def test_harness_returns_by_rank_and_reports_tracebacks() -> None:
    def ok(rank: int, world: int, k: int, *, offset: int) -> int:
        t = torch.tensor([rank + offset], dtype=torch.float32)
        torch.distributed.all_reduce(t)
        return int(t.item()) * k + rank

    t0 = time.perf_counter()
    assert run_ranks(ok, 2, 10, offset=1) == [30, 31]
    elapsed = time.perf_counter() - t0
    print(f"2-rank run_ranks overhead: {elapsed:.3f} s")
    assert elapsed < 30.0   # generous: ~0.1 s when idle; only a hang-like regression should trip it

    def bad(rank: int, world: int) -> None:
        if rank == 1:
            raise ValueError("boom on one rank")
        torch.distributed.barrier()  # rank 0 would hang: the harness must kill it

    with pytest.raises(RankError, match=r"(?s)rank 1 raised.*ValueError: boom on one rank"):
        run_ranks(bad, 2, timeout=60)

    def slow(rank: int, world: int) -> None:
        time.sleep(30)

    t0 = time.perf_counter()
    with pytest.raises(RankError, match="timeout"):
        run_ranks(slow, 2, timeout=1.0)
    assert time.perf_counter() - t0 < 5


@pytest.mark.slow   # a fresh interpreter
def test_setup_after_megatron_import_patches_bound_names(tmp_path: Any) -> None:
    """A fresh interpreter that imports megatron.core first, then installs the layer (with one
    patch excluded): module attributes and `from x import f` copies are both patched."""
    import subprocess

    script = """
import megatron.core.transformer.moe.token_dispatcher as td
import megatron.core.transformer.moe.moe_utils as mu
import megatron.core.tensor_parallel.random as rnd
from packaging.version import Version
from megatron_rpt.platform.compat import registry
applied = registry.install_cpu_compat(exclude={"P13"})
assert "P13" not in applied and "P6" in applied, applied
assert td.maybe_move_tensor_to_cpu is mu.maybe_move_tensor_to_cpu
assert "_p6_" in td.maybe_move_tensor_to_cpu.__qualname__
assert registry._mcore_version() >= Version("0.17") or not hasattr(mu, "te_general_gemm")
import torch
assert rnd._get_cuda_rng_state().equal(torch.get_rng_state())
print("OK", registry.install_cpu_compat())
"""
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    if registry._mcore_version() < Version("0.17"):  # P13 applies to 0.16.x only
        assert "P13" in out.stdout  # a later call without exclude installs it


def test_cpu_threads_share_the_node():
    import os

    from megatron_rpt.platform import Platform
    cpu = Platform("cpu", "gloo", False, False, "0.16.1", False)
    cores = len(os.sched_getaffinity(0))
    assert cpu.cpu_threads(1, environ={}) == cores
    assert cpu.cpu_threads(2, environ={}) == max(1, cores // 2)
    assert cpu.cpu_threads(4 * cores, environ={}) == 1
    assert cpu.cpu_threads(2, environ={"OMP_NUM_THREADS": "3"}) is None
    gpu = Platform("cuda", "nccl", False, False, "0.16.1", True)
    assert gpu.cpu_threads(8, environ={}) is None


def test_only_megatron_cores_backend_warnings_are_silenced() -> None:
    """The filter (installed when megatron_rpt is imported) drops exactly Megatron-Core's known
    "TE / Apex not installed" messages from Megatron-Core modules; any other warning still shows."""
    import warnings

    from megatron_rpt.platform import messages

    def warn(message: str, module: str) -> None:
        warnings.warn_explicit(message, UserWarning, "x.py", 1, module=module, registry={})

    with warnings.catch_warnings(record=True) as seen:   # restores the filters on exit
        warnings.simplefilter("always")
        messages.quiet_megatron_core_backend_warnings()
        messages.quiet_megatron_core_backend_warnings()   # idempotent
        ours = [f for f in warnings.filters if getattr(f[3], "pattern", f[3]) == messages._MODULES]
        assert len(ours) == len(messages.MEGATRON_CORE_BACKEND_WARNINGS) == 4
        for message in messages.MEGATRON_CORE_BACKEND_WARNINGS:
            warn(message, "megatron.core.optimizer")
            warn(message, "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision")
        warn(messages.MEGATRON_CORE_BACKEND_WARNINGS[0], "my_package")          # not from Megatron-Core
        warn("Apex is not installed. Falling back to Torch Norm (and more)", "megatron.core.models.backends")
        warn("something else", "megatron.core.optimizer")
    assert [(str(w.message), w.category) for w in seen] == [
        (messages.MEGATRON_CORE_BACKEND_WARNINGS[0], UserWarning),
        ("Apex is not installed. Falling back to Torch Norm (and more)", UserWarning),
        ("something else", UserWarning)]


def test_platform_line_describes_the_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_rpt.platform import Platform

    monkeypatch.setattr(platform_mod, "_why_unused", lambda module, device_type: f"why {module}")
    cpu = Platform("cpu", "gloo", False, False, "0.16.1", False)
    assert cpu.describe() == ("cpu, gloo, megatron-core 0.16.1, transformer engine: False (why transformer_engine; "
                              "local layer specs), apex: False (why apex)")
    gpu = Platform("cuda", "nccl", True, True, "0.19.2", True)
    # tests/gpu/test_te_fp8.py looks for "transformer engine: True" in a run's output
    assert gpu.describe() == "cuda, nccl, megatron-core 0.19.2, transformer engine: True (Transformer Engine " \
                             "layer specs), apex: True"


@pytest.mark.slow   # fresh interpreters
def test_tools_print_no_backend_warnings_and_entry_points_one_platform_line() -> None:
    """A tool that only imports Megatron-Core (count_params) prints none of its "Transformer Engine
    and Apex are not installed" warnings; an entry point prints them neither, and one platform line
    (here from pretraining's cheapest exit: a configuration error after the platform is chosen)."""
    import os
    import re
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")}

    def run(*argv: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, *argv], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        for text in ("Transformer Engine and Apex are not installed", "Apex is not installed", "Warning"):
            assert text not in proc.stdout + proc.stderr, proc.stderr[-3000:]
        return proc

    count = run("tools/count_params.py", "--model-preset", "tiny")
    assert count.returncode == 0 and "total parameters" in count.stdout, count.stderr[-3000:]
    assert "> platform:" not in count.stdout + count.stderr   # it chooses no platform

    pre = run("-m", "megatron_rpt.pretrain", "--use-cpu", "--model-preset", "tiny", "--mock-data",
              "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--tensor-model-parallel-size", "2")
    assert pre.returncode == 2 and "world size 1 is not divisible" in pre.stderr, pre.stderr[-3000:]
    lines = [x for x in (pre.stdout + pre.stderr).splitlines() if "platform:" in x]
    assert len(lines) == 1, lines
    assert re.fullmatch(r"> platform: cpu, gloo, megatron-core 0\.\d+\.\S+, transformer engine: False "
                        r"\((not installed|needs CUDA); local layer specs\), apex: False \(.+\)", lines[0]), lines
