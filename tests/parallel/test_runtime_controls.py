"""Run-time controls of the training driver (Megatron-LM's flags): --manual-gc and its interval and
evaluation collections, --empty-unused-memory-level, the profiler (--profile ...), and their checks.

The garbage-collection points are compared with Megatron-LM's training.train as a hand-written event
sequence (the driver's loop with recording stand-ins for `gc` and the step; no torch math). One
2-rank pretraining run with every control on (and --num-workers 2) must give the single-process
run's losses and write a torch profiler trace of exactly iteration 3 on rank 0 only.
"""

from __future__ import annotations

import gzip
import json
import os
import time

import pytest

from megatron_rpt.config import ConfigError, parse_args
from megatron_rpt.validate import validate_config
from tests.dist_harness import run_ranks
from tests.parallel.test_training_parity import BASE, RTOL, _pretrain


class _RecordingGC:
    """Stands in for the `gc` module inside training.driver and records what the driver asks of it."""

    def __init__(self, events: list):
        self.events, self.enabled = events, True

    def isenabled(self):
        return self.enabled

    def disable(self):
        self.enabled = False
        self.events.append("disable")

    def enable(self):
        self.enabled = True
        self.events.append("enable")

    def collect(self, generation=2):
        self.events.append("collect" if generation == 2 else f"collect{generation}")


def _drive(monkeypatch, *flags: str, train_iters: int = 5) -> list:
    from megatron_rpt.platform import setup_platform
    from megatron_rpt.training import driver as driver_mod
    setup_platform(force_cpu=True)
    cfg = parse_args(["--train-iters", str(train_iters), "--eval-interval", "2", *flags])
    events: list = []
    monkeypatch.setattr(driver_mod, "gc", _RecordingGC(events))
    driver = driver_mod.TrainingDriver(cfg, None, None, start_time=time.time(),
                                       signals=driver_mod.SignalFlag(False), name="test")
    driver.run(lambda n: events.append(f"step{n}"), evaluate=lambda n: events.append(f"eval{n}"), eval_at_end=True)
    return events


def test_manual_gc_points_follow_megatron_lm(monkeypatch):
    """Megatron-LM: gc.disable() + gc.collect() before the loop; gc.collect() after iterations divisible by
    --manual-gc-interval (post_training_step_callbacks, before evaluation); around each evaluation a full
    collection before and a generation-0 one after (unless --no-manual-gc-eval). Ours also re-enables the
    collector when the run returns (a library call; Megatron-LM's process ends)."""
    assert _drive(monkeypatch) == ["step1", "step2", "eval2", "step3", "step4", "eval4", "step5", "eval5"]
    assert _drive(monkeypatch, "--manual-gc", "--manual-gc-interval", "2") == [
        "disable", "collect", "step1", "step2", "collect", "collect", "eval2", "collect0", "step3", "step4",
        "collect", "collect", "eval4", "collect0", "step5", "collect", "eval5", "collect0", "enable"]
    assert _drive(monkeypatch, "--manual-gc", "--no-manual-gc-eval") == [
        "disable", "collect", "step1", "step2", "eval2", "step3", "step4", "eval4", "step5", "eval5", "enable"]


def test_empty_unused_memory_level_points(monkeypatch, capsys):
    """Level 1 empties the cache after each forward-backward, level 2 also after each optimizer step
    (Megatron-LM's train_step); on CUDA that is torch.cuda.empty_cache, on CPU nothing (one line says so)."""
    import torch

    import megatron_rpt.platform as platform_mod
    from megatron_rpt.training.step import release_unused_memory
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    cuda = platform_mod.Platform("cuda", "nccl", False, False, "0.16.1", True)
    monkeypatch.setattr(platform_mod, "_PLATFORM", cuda)
    for level, expected in ((0, 0), (1, 1), (2, 2)):
        calls.clear()
        release_unused_memory(level, 1)
        release_unused_memory(level, 2)
        assert len(calls) == expected, level
    monkeypatch.setattr(platform_mod, "_PLATFORM", platform_mod.Platform("cpu", "gloo", False, False, "0.16.1", False))
    calls.clear()
    release_unused_memory(2, 1)
    assert calls == []
    capsys.readouterr()
    _drive(monkeypatch, "--empty-unused-memory-level", "1", train_iters=1)
    assert "> --empty-unused-memory-level 1: no effect on cpu (no caching allocator to empty)" in capsys.readouterr().out


def test_bad_values_are_config_errors():
    argv = [*BASE, "--profile", "--profile-step-start", "3", "--profile-step-end", "3", "--profile-ranks", "0", "2",
            "--num-workers", "-1", "--manual-gc-interval", "-2"]
    with pytest.raises(ConfigError) as e:
        validate_config(parse_args(argv), 2)
    assert e.value.problems == [
        "--num-workers must be >= 0 (got -1)",
        "--manual-gc-interval must be >= 0 (got -2; 0: collect only around evaluation)",
        "--profile-step-end 3 must be > --profile-step-start 3 (the profiled iterations are start + 1 .. end)",
        "--profile-ranks 2: no such rank (ranks are 0..1)"]
    with pytest.raises(SystemExit):      # argparse's choices
        parse_args([*BASE, "--empty-unused-memory-level", "3"])
    fine = [*BASE, "--profile", "--profile-step-start", "0", "--profile-step-end", "1", "--profile-ranks", "1"]
    assert validate_config(parse_args(fine), 2).profiling.profile_ranks == [1]


def _pretrain_stdout(rank, world, argv):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = _pretrain(rank, world, argv)
    out["stdout"] = buf.getvalue()
    return out


def test_controls_keep_the_losses_and_profile_one_rank(tmp_path):
    """2 data-parallel ranks with --num-workers 2, --manual-gc, --empty-unused-memory-level 2 and --profile over
    iteration 3 on rank 0, against the single-process run without them (RTOL of the parity tests: DP=2 vs 1
    reduction order). On CPU --profile alone uses the torch profiler (said in one line); the Chrome trace
    holds iteration 3's range and profiler step, not the warm-up iteration 2 nor iteration 4."""
    base = [*BASE, "--eval-interval", "2", "--eval-iters", "1"]
    ref = run_ranks(_pretrain, 1, base + ["--num-workers", "0"], timeout=240)[0]
    tb = tmp_path / "runs" / "tb"
    out = run_ranks(_pretrain_stdout, 2, base + [
        "--num-workers", "2", "--manual-gc", "--manual-gc-interval", "2", "--empty-unused-memory-level", "2",
        "--profile", "--profile-step-start", "2", "--profile-step-end", "3", "--profile-ranks", "0",
        "--tensorboard-dir", str(tb)], timeout=240)
    for key in ("losses", "valid"):
        assert sorted(out[0][key]) == sorted(ref[key]) and out[0][key] == pytest.approx(ref[key], rel=RTOL), key
    assert "> --profile: no nsys capture on cpu; the torch profiler writes" in out[0]["stdout"]
    traces = tmp_path / "runs" / "torch_profile"
    assert sorted(os.listdir(traces)) == ["rank-0.json.gz"]
    with gzip.open(traces / "rank-0.json.gz", "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"iteration 3", "ProfilerStep#3"} <= names
    assert not {"iteration 2", "iteration 4", "ProfilerStep#2", "ProfilerStep#4"} & names
    assert any(n and n.startswith("aten::") for n in names)    # the step's operators were recorded
