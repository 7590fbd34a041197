"""Profiler capture of a range of training iterations (--profile, Megatron-LM's flags), for
`training.driver.TrainingDriver.run`, so pretraining and RPT get it alike.

Which iterations: those numbered --profile-step-start + 1 .. --profile-step-end (the profiler starts
once `start` iterations are done and stops after iteration `end`, Megatron-LM's nsys path); a resumed
run profiles the part of that range it performs. Which ranks: --profile-ranks (default all).
How, per platform (`platform.Platform.nsys_capture`):
- CUDA without --use-pytorch-profiler: a cudaProfilerStart/Stop capture range for
  `nsys profile --capture-range=cudaProfilerApi`, each iteration an NVTX range "iteration N", and with
  --record-shapes an NVTX range per autograd op (torch.autograd.profiler.emit_nvtx), as Megatron-LM.
- --use-pytorch-profiler, or any platform without nsys (CPU): the torch profiler, one warm-up
  iteration (`start`, when it is run) and then the range recorded, exported as a Chrome trace
  `TENSORBOARD_DIR/../torch_profile/rank-R.json.gz` (Megatron-LM's path; ./torch_profile without
  --tensorboard-dir) that Perfetto, chrome://tracing and TensorBoard's profile plugin read. Each
  iteration is a "iteration N" range (absolute numbers; the profiler's own ProfilerStep#k count from
  the run's first iteration).
Differences from Megatron-LM: its torch-profiler path records iterations start .. end - 1 (one earlier
than its nsys path) counted from the run's first iteration; here both paths profile the same
iterations, by their absolute numbers. On CPU, --profile alone means the torch profiler (there is no
nsys capture); one line says so.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from megatron_rpt import distributed as dist


def trace_dir(tensorboard_dir: Optional[str]) -> str:
    """Where torch profiler traces go: TENSORBOARD_DIR/../torch_profile, as Megatron-LM (./torch_profile
    without --tensorboard-dir)."""
    if not tensorboard_dir:
        return "torch_profile"
    return os.path.normpath(os.path.join(tensorboard_dir, "..", "torch_profile"))


class StepProfiler:
    """The profiler of one run on this rank; inert when --profile is off or this rank is not listed.

    The driver calls `begin(n)` before iteration n, `end(n)` after it (before its evaluation and
    save, as Megatron-LM stops), and `close()` when the loop ends, whatever the reason (a run that
    stops inside the range still writes what it recorded)."""

    def __init__(self, profiling, tensorboard_dir: Optional[str], platform, first_iteration: int):
        self.cfg = profiling
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.rank = rank
        self.active = bool(profiling.profile) and (not profiling.profile_ranks or rank in profiling.profile_ranks)
        self.window = range(profiling.profile_step_start + 1, profiling.profile_step_end + 1)
        self.torch_profiler = profiling.use_pytorch_profiler or not platform.nsys_capture
        self.path = os.path.join(trace_dir(tensorboard_dir), f"rank-{rank}.json.gz")
        self._prof = None
        self._capturing = False          # nsys: between cudaProfilerStart and Stop
        self._nvtx_ops = None            # emit_nvtx context (--record-shapes)
        self._close_iteration = None     # ends the open "iteration N" range
        if profiling.profile and not profiling.use_pytorch_profiler and not platform.nsys_capture:
            dist.print_rank_0(f"> --profile: no nsys capture on {platform.device_type}; the torch profiler writes "
                              f"{os.path.join(trace_dir(tensorboard_dir), 'rank-R.json.gz')} instead "
                              "(as --use-pytorch-profiler)")
        if self.active and self.torch_profiler and first_iteration < self.window.stop - 1:
            self._start_torch(platform, first_iteration)

    def _start_torch(self, platform, first_iteration: int) -> None:
        start, end = self.cfg.profile_step_start, self.cfg.profile_step_end
        from torch.profiler import ProfilerAction

        def action(k: int) -> ProfilerAction:   # k: steps since the profiler started = iteration - first
            n = first_iteration + k
            if n < start:
                return ProfilerAction.NONE
            if n == start:
                return ProfilerAction.WARMUP
            if n < end:
                return ProfilerAction.RECORD
            return ProfilerAction.RECORD_AND_SAVE if n == end else ProfilerAction.NONE

        self._prof = torch.profiler.profile(
            activities=platform.profiler_activities(), schedule=action, on_trace_ready=self._export,
            record_shapes=self.cfg.pytorch_profiler_collect_shapes, with_stack=self.cfg.pytorch_profiler_collect_callstack)
        self._prof.start()

    def _export(self, prof) -> None:
        folder, name = os.path.split(self.path)
        os.makedirs(folder or ".", exist_ok=True)
        # written under a temporary name, renamed when complete (the .gz suffix selects gzip)
        tmp = os.path.join(folder, f".{name[:-len('.json.gz')]}.tmp.json.gz")
        prof.export_chrome_trace(tmp)
        os.replace(tmp, self.path)
        print(f"> profiler trace of iterations {self.window.start}..{self.window.stop - 1} (rank {self.rank}): "
              f"{self.path}", flush=True)

    def begin(self, iteration: int) -> None:
        if not self.active:
            return
        if self._prof is not None:
            self._prof.step()
            scope = torch.profiler.record_function(f"iteration {iteration}")
            scope.__enter__()
            self._close_iteration = lambda: scope.__exit__(None, None, None)
        elif iteration in self.window:
            if not self._capturing:
                torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
                self._capturing = True
                if self.cfg.record_shapes:
                    self._nvtx_ops = torch.autograd.profiler.emit_nvtx(record_shapes=True)
                    self._nvtx_ops.__enter__()
            torch.cuda.nvtx.range_push(f"iteration {iteration}")
            self._close_iteration = torch.cuda.nvtx.range_pop

    def end(self, iteration: int) -> None:
        if not self.active:
            return
        if self._prof is not None:
            self._close_range()
            if iteration >= self.window.stop - 1:
                self._prof.stop()        # after iteration `end`: RECORD_AND_SAVE -> the trace is exported
                self._prof = None
        elif self._capturing:
            self._close_range()
            if iteration >= self.window.stop - 1:
                self._stop_capture()

    def _close_range(self) -> None:
        close, self._close_iteration = self._close_iteration, None
        if close is not None:
            close()

    def _stop_capture(self) -> None:
        if self._nvtx_ops is not None:
            self._nvtx_ops.__exit__(None, None, None)
            self._nvtx_ops = None
        torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
        self._capturing = False

    def close(self) -> None:
        """End a capture the loop left open (exit before --profile-step-end, or an exception)."""
        with contextlib.suppress(Exception):
            self._close_range()
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()
        if self._capturing:
            self._stop_capture()
