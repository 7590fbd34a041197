"""Metrics: the Megatron-style log line and TensorBoard scalars agree with the run's own numbers."""

import math
import re

import pytest

from megatron_rpt.training.logging import MetricsLogger, parse_log_line
from megatron_rpt.training.step import StepResult
from megatron_rpt.training.timers import parse_timer_block
from tests.dist_harness import run_ranks
from tests.wandb_records import history
from tests.parallel.test_training_parity import BASE


def _pretrain_capture(rank, world, argv):
    """The run's results and rank 0's stdout, plus a reference computed here from the finished model:
    the full parameters and gradients (tensor-parallel shards all-gathered), their float64 L2 norm and
    their zero count, each parameter once (what a single process holding the model would see)."""
    import contextlib
    import io

    import torch
    from megatron.core import parallel_state as ps

    import megatron_rpt.training.loop as loop
    from megatron_rpt.config import parse_args
    from megatron_rpt.models.gpt import unwrap

    jobs = []

    def capture(cfg, **kw):
        jobs.append(setup_job(cfg, **kw))
        return jobs[-1]

    setup_job, loop.setup_job = loop.setup_job, capture
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = loop.pretrain(parse_args(argv))
    out = {"losses": result.losses, "params_norms": result.params_norms, "num_zeros": result.num_zeros,
           "stdout": buf.getvalue()}
    squares, zeros = 0.0, 0
    tp_group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    for _, param in unwrap(jobs[0].state.model[0]).named_parameters():
        full = []
        for t in (param.data, param.main_grad):
            if getattr(param, "tensor_model_parallel", False):
                parts = [torch.empty_like(t) for _ in range(tp)]
                torch.distributed.all_gather(parts, t.contiguous(), group=tp_group)
                t = torch.cat(parts, dim=param.partition_dim)
            full.append(t.double())
        squares += float((full[0] ** 2).sum())
        zeros += int((full[1] == 0).sum())
    out["reference_params_norm"], out["reference_zeros"] = squares ** 0.5, zeros
    return out


def test_tensorboard_wandb_timers_and_stdout(tmp_path, monkeypatch):
    """One TP=2 run with every observability flag: the interval line, Megatron-Core's timer block, the
    parameter norm and zero count against the full model's (float64 / exact), TensorBoard's tags, and the
    offline W&B run holding exactly TensorBoard's scalars."""
    tb, save = tmp_path / "tb", tmp_path / "ckpt"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    out = run_ranks(_pretrain_capture, 2, BASE + [
        "--tensor-model-parallel-size", "2", "--tensorboard-dir", str(tb), "--log-interval", "2",
        "--eval-interval", "2", "--eval-iters", "1", "--peak-tflops", "0.5",
        # untied: the input embedding's rows of tokens absent from a batch get exactly zero gradients
        "--untie-embeddings-and-output-weights", "--log-num-zeros-in-grad", "--log-params-norm",
        "--timing-log-level", "2", "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        "--save", str(save), "--wandb-project", "mrpt-test", "--wandb-exp-name", "tiny"])[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("lm loss", "learning-rate", "grad-norm", "throughput/tokens-per-sec", "throughput/mfu",
                "lm loss validation", "lm loss validation ppl", "num-zeros", "params-norm", "iteration-time",
                "forward-backward-time", "all-grads-sync-time", "optimizer-time", "batch-generator-time",
                "forward-compute-time", "backward-compute-time"):
        assert tag in tags, tag
    tb_values = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags}
    assert tb_values["lm loss"] == pytest.approx(out["losses"], rel=1e-6)
    assert {e.step for e in acc.Scalars("lm loss validation")} == {2, 4}
    for step, loss in tb_values["lm loss validation"].items():
        assert tb_values["lm loss validation ppl"][step] == pytest.approx(math.exp(loss), rel=1e-6)

    # --log-params-norm: every parameter once, against the full model's float64 norm (fp32 sums of
    # squares: ~1e-7 relative); computed on every TensorBoard step and printed at interval ends.
    assert out["params_norms"][4] == pytest.approx(out["reference_params_norm"], rel=1e-5)
    assert tb_values["params-norm"] == pytest.approx(out["params_norms"], rel=1e-6)
    assert sorted(out["params_norms"]) == [1, 2, 3, 4]
    # --log-num-zeros-in-grad: Megatron-Core's count of the last step equals counting by hand.
    assert out["reference_zeros"] > 1000 and out["num_zeros"][4] == out["reference_zeros"]
    assert tb_values["num-zeros"] == pytest.approx(out["num_zeros"])

    lines = out["stdout"].splitlines()
    interval = [i for i, x in enumerate(lines) if x.startswith(" iteration")]
    assert len(interval) == 2
    line = lines[interval[1]]
    # the printed loss is the mean of the interval's iterations
    printed = float(re.search(r"lm loss: ([0-9.E+-]+)", line).group(1))
    assert printed == pytest.approx((out["losses"][3] + out["losses"][4]) / 2, rel=1e-6)
    tflops = float(re.search(r"TFLOP/s/device: ([0-9.]+)", line).group(1))
    mfu = float(re.search(r"MFU: ([0-9.]+)%", line).group(1))
    assert mfu == pytest.approx(100 * tflops / 0.5, abs=0.2)
    parsed = parse_log_line(line)
    assert (parsed["iteration"], parsed["loss"], parsed["tflops_per_device"]) == (4, printed, tflops)
    assert parsed["mfu"] == pytest.approx(mfu / 100)
    assert parsed["params_norm"] == pytest.approx(out["params_norms"][4], abs=5e-4)
    assert parsed["num_zeros"] == out["num_zeros"][4]
    assert "number of skipped iterations:   0" in line

    # Megatron-Core's timer block follows each interval line: level 1 and level 2 names, (min, max)
    # over the ranks in ms per iteration; nested timers are no longer than their parents and no
    # timer is longer than the iteration itself.
    for i in interval:
        assert lines[i + 1] == "(min, max) time across ranks (ms):"
        block = parse_timer_block("\n".join(lines[i + 1:]))
        step = parse_log_line(lines[i])["iteration"]
        for name in ("forward-backward", "all-grads-sync", "optimizer", "optimizer-inner-step",
                     "batch-generator", "forward-compute", "backward-compute"):
            assert name in block, (name, block)
            low, high = block[name]
            assert 0 < low <= high
            # TensorBoard/W&B get the max over ranks in seconds (Megatron-Core's Timers.write)
            assert tb_values[f"{name}-time"][step] == pytest.approx(high / 1000, abs=1e-5)
        ms = parse_log_line(lines[i])["ms_per_iter"]
        assert block["forward-backward"][1] <= ms and block["optimizer"][1] <= ms
        assert block["batch-generator"][1] <= block["forward-compute"][1] <= block["forward-backward"][1]
        assert block["optimizer-inner-step"][1] <= block["optimizer"][1]
        assert tb_values["iteration-time"][step] == pytest.approx(ms / 1000, rel=1e-3)
    # the final save is timed, as Megatron-LM does at every save (level 0)
    save_block = [i for i, x in enumerate(lines) if x.startswith("> saved checkpoint")]
    assert len(save_block) == 1
    assert "save-checkpoint" in parse_timer_block("\n".join(lines[save_block[0] + 1:]))

    # W&B (offline, default folder SAVE/wandb) holds exactly the TensorBoard scalars, step by step.
    wandb_history = history(str(save / "wandb"))
    wandb_values: dict = {}
    for step, row in wandb_history.items():
        for key, value in row.items():
            wandb_values.setdefault(key, {})[step] = value
    assert set(wandb_values) == tags
    for tag in tags:
        assert wandb_values[tag] == pytest.approx(tb_values[tag], rel=1e-6), tag


def _sharded_main_params_norm(rank, world, argv):
    from megatron_rpt.config import parse_args
    from megatron_rpt.models.gpt import unwrap
    from megatron_rpt.training.params_norm import params_l2_norm
    from megatron_rpt.training.setup import setup_job

    job = setup_job(parse_args(argv))
    params = list(unwrap(job.state.model[0]).parameters())
    before = params_l2_norm(job.state.model, bf16=True, device=job.device)
    shards = [p.main_param for p in params if getattr(p, "main_param", None) is not None]
    for shard in shards:
        shard.fill_(1.0)
    return {"before": before, "after": params_l2_norm(job.state.model, bf16=True, device=job.device),
            "reference": sum(float((p.data.double() ** 2).sum()) for p in params) ** 0.5,
            "elements": sum(p.numel() for p in params), "shard_elements": sum(s.numel() for s in shards),
            "all_sharded": all(getattr(p, "main_param_sharded", False) for p in params)}


def test_params_norm_measures_sharded_fp32_main_params():
    """--bf16 with the distributed optimizer (DP=2): Megatron-LM measures the fp32 main parameters,
    which each DP rank holds a shard of. At start they are the bf16 weights exactly (float64 norm of
    the model, fp32 sums); set to 1.0 everywhere, the norm must be sqrt(#parameters): every element
    counted once over the shards, none from the bf16 copies."""
    out = run_ranks(_sharded_main_params_norm, 2, BASE + ["--bf16", "--use-distributed-optimizer"])
    assert all(o["all_sharded"] for o in out)
    assert 0 < out[0]["shard_elements"] < out[0]["elements"]
    assert out[0]["shard_elements"] + out[1]["shard_elements"] == out[0]["elements"]
    for o in out:
        assert o["before"] == pytest.approx(o["reference"], rel=1e-6)
        assert o["after"] == pytest.approx(o["elements"] ** 0.5, rel=1e-6)


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
    log.record(1, StepResult(2.0, 1, 1.0, None, True, 1e-3), 1)
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
    log.record(1, StepResult(3.5, 1, 0.75, None, True, 2e-4), 16)
    time.sleep(0.05)
    line = log.record(2, StepResult(3.25, 1, 0.5, None, True, 3e-4), 32)
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
