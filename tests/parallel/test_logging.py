"""Metrics: the Megatron-style log line and TensorBoard scalars agree with the run's own numbers."""

import re

import pytest

from megatron_rpt.training.logging import MetricsLogger, parse_log_line
from megatron_rpt.training.step import StepResult
from tests.dist_harness import run_ranks
from tests.parallel.test_training_parity import BASE, _pretrain


def _pretrain_capture(rank, world, argv):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = _pretrain(rank, world, argv)
    out["stdout"] = buf.getvalue()
    return out


def test_tensorboard_and_stdout(tmp_path):
    tb = tmp_path / "tb"
    out = run_ranks(_pretrain_capture, 2, BASE + ["--tensor-model-parallel-size", "2", "--tensorboard-dir", str(tb),
                                                  "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
                                                  "--peak-tflops", "0.5"])[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("lm loss", "learning-rate", "grad-norm", "throughput/tokens-per-sec", "throughput/mfu",
                "lm loss validation"):
        assert tag in tags, tag
    tb_loss = {e.step: e.value for e in acc.Scalars("lm loss")}
    assert tb_loss == pytest.approx(out["losses"], rel=1e-6)
    assert {e.step for e in acc.Scalars("lm loss validation")} == {2, 4}
    lines = [x for x in out["stdout"].splitlines() if x.startswith(" iteration")]
    assert len(lines) == 2
    # the printed loss is the mean of the interval's iterations
    printed = float(re.search(r"lm loss: ([0-9.E+-]+)", lines[1]).group(1))
    assert printed == pytest.approx((out["losses"][3] + out["losses"][4]) / 2, rel=1e-6)
    tflops = float(re.search(r"TFLOP/s/device: ([0-9.]+)", lines[1]).group(1))
    mfu = float(re.search(r"MFU: ([0-9.]+)%", lines[1]).group(1))
    assert mfu == pytest.approx(100 * tflops / 0.5, abs=0.2)
    parsed = parse_log_line(lines[1])
    assert (parsed["iteration"], parsed["loss"], parsed["tflops_per_device"]) == (4, printed, tflops)
    assert parsed["mfu"] == pytest.approx(mfu / 100)
    assert "number of skipped iterations:   0" in lines[1]


def test_throughput_arithmetic():
    log = MetricsLogger(log_interval=1, writer=None, tensorboard=False, tensorboard_log_interval=1, train_iters=10,
                        global_batch_size=8, seq_length=1024, flops_per_token=6e9, world_size=4, peak_tflops=100.0,
                        device_type="cpu", is_logging_rank=False)
    tp = log.throughput(seconds_per_iter=0.5)
    assert tp["tokens_per_s"] == 8 * 1024 / 0.5
    assert tp["tflops_per_device"] == pytest.approx(8 * 1024 / 0.5 * 6e9 / 4 / 1e12)
    assert tp["mfu"] == pytest.approx(tp["tflops_per_device"] / 100.0)


def test_skipped_and_nan_iterations_are_counted_not_averaged():
    log = MetricsLogger(log_interval=3, writer=None, tensorboard=False, tensorboard_log_interval=1, train_iters=10,
                        global_batch_size=1, seq_length=1, flops_per_token=1.0, world_size=1, peak_tflops=None,
                        device_type="cpu", is_logging_rank=False)
    log.record(1, StepResult(2.0, 1, 1.0, 0, True, 1e-3), 1)
    log.record(2, StepResult(float("nan"), 1, None, None, True, 1e-3), 2)
    line = log.record(3, StepResult(9.0, 1, None, None, False, 1e-3), 3)
    assert "lm loss: 2.000000E+00" in line
    assert "number of skipped iterations:   1" in line and "number of nan iterations:   1" in line
    assert "MFU" not in line


def test_parse_log_line_reads_back_what_record_prints():
    log = MetricsLogger(log_interval=2, writer=None, tensorboard=False, tensorboard_log_interval=1, train_iters=12,
                        global_batch_size=16, seq_length=4096, flops_per_token=1.1e10, world_size=1, peak_tflops=989.4,
                        device_type="cpu", is_logging_rank=False)
    import time
    log.record(1, StepResult(3.5, 1, 0.75, 0, True, 2e-4), 16)
    time.sleep(0.05)
    line = log.record(2, StepResult(3.25, 1, 0.5, 0, True, 3e-4), 32)
    got = parse_log_line(line)
    ms = got["ms_per_iter"]
    assert ms >= 25.0
    tp = log.throughput(16 * 4096 / got["tokens_per_s"])  # the printed rate, back to seconds per iteration
    assert got == {"iteration": 2, "train_iters": 12, "consumed_samples": 32, "ms_per_iter": ms,
                   "lr": pytest.approx(3e-4), "global_batch_size": 16, "loss": pytest.approx(3.375),
                   "grad_norm": 0.5, "tokens_per_s": pytest.approx(16 * 4096 / (ms / 1000), rel=2e-3),
                   "tflops_per_device": pytest.approx(tp["tflops_per_device"], rel=1e-5),
                   "mfu": pytest.approx(tp["mfu"], abs=1e-3), "peak_mem_gib": got["peak_mem_gib"],
                   "skipped": 0, "nan_iterations": 0}
    assert got["peak_mem_gib"] > 0
    for other in ("", " validation loss at iteration 2 | lm loss value: 1.0E+00 |", "> iteration 3 resumed",
                  " iteration 3 of 4 | lm loss: 1.0 |", "[rank0] iteration        2/      12 | lm loss: 1.0 |"):
        assert parse_log_line(other) is None
