"""Training-schedule flags with Megatron-LM's semantics (`config/schedule.py`, `config/validation.py`):
sample-based schedules, --lr-warmup-fraction, --rampup-batch-size, --decoupled-lr, --grad-reduce-in-bf16 and
the resume flags. References: Megatron-Core 0.16's RampupBatchsizeNumMicroBatchesCalculator (where installed;
0.19 ignores ramp-up), Megatron-LM's update_train_iters loop and scheduler formulas worked by hand, and
Megatron-Core's own OptimizerParamScheduler on a stub optimizer (pure Python, no torch math)."""

import math

import pytest

from megatron_rpt.config import ConfigError, parse_args, parse_rpt_args
from megatron_rpt.config.schedule import (global_batch_size_at, lr_schedule, rampup,
                                          samples_after)
from megatron_rpt.validate import validate_config, validate_rpt_config
from tests.unit.config_checks import config_checkers

BASE = ["--model-preset", "tiny", "--lr", "1e-3", "--mock-data", "--vocab-size", "512"]
problems, one_problem = config_checkers(BASE)


def _cfg(argv, world=1):
    return validate_config(parse_args(BASE + argv), world)


def test_rampup_batch_sizes_follow_megatron_core():
    """--rampup-batch-size 16 8 300 to 64: 6 increments of 50 samples each; the batch of every step of a run
    equals Megatron-Core 0.16's calculator updated with the consumed samples, and a hand computation."""
    cfg = _cfg(["--train-samples", "1000", "--global-batch-size", "64", "--rampup-batch-size", "16", "8", "300",
                "--micro-batch-size", "8"])
    consumed, sizes = 0, []
    for _ in range(cfg.training.train_iters):
        sizes.append(global_batch_size_at(cfg, consumed))
        consumed += sizes[-1]
    # by hand: 16 x4 (0..48 < 50), 24 x3 (64..112 < 150? 64+24=88, 112 -> 136 < 150), ...
    hand, c = [], 0
    while len(hand) < len(sizes):
        b = 64 if c > 300 else 16 + 8 * int(c / 50)
        hand.append(b)
        c += b
    assert sizes == hand
    assert sizes[:4] == [16, 16, 16, 16] and sizes[4] == 24 and sizes[-1] == 64
    # Megatron-LM's update_train_iters: ramp-up loop while consumed <= 300 and <= 1000, then whole batches
    ramp_iters, c = 0, 0
    while c <= 300 and c <= 1000:
        c += hand[ramp_iters]
        ramp_iters += 1
    assert cfg.training.train_iters == ramp_iters + (1000 - c) // 64
    assert samples_after(cfg, cfg.training.train_iters) == sum(sizes) <= 1000
    calculator = pytest.importorskip("megatron.core.num_microbatches_calculator")
    if not hasattr(calculator, "RampupBatchsizeNumMicroBatchesCalculator"):
        pytest.skip("this megatron-core ignores --rampup-batch-size (0.19+)")
    ref = calculator.RampupBatchsizeNumMicroBatchesCalculator(64, 8, 1, False, 1, 16, 8, 300)
    consumed = 0
    for size in sizes:
        ref.update(consumed, consistency_check=True)
        assert (ref.get_current_global_batch_size(), ref.get()) == (size, size // 8)
        consumed += size


def test_sample_based_schedule_in_samples():
    cfg = _cfg(["--train-samples", "1000", "--global-batch-size", "8", "--lr-warmup-samples", "80",
                "--lr-decay-samples", "900", "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "100"])
    assert cfg.training.train_iters == 125 and cfg.optimizer.lr_decay_iters is None
    s = lr_schedule(cfg)
    assert (s.warmup, s.decay, s.wsd_decay, s.wd_incr) == (80, 900, 100, 1000)
    cfg = _cfg(["--train-samples", "1001", "--global-batch-size", "8", "--lr-warmup-fraction", "0.1"])
    assert cfg.training.train_iters == 125    # the last partial batch is dropped, as Megatron-LM
    assert lr_schedule(cfg).warmup == pytest.approx(100.1) and lr_schedule(cfg).decay == 1001
    # iteration-based: steps are iterations x global batch; the fraction is of the decay steps
    cfg = _cfg(["--train-iters", "20", "--lr-decay-iters", "10", "--lr-warmup-fraction", "0.25",
                "--global-batch-size", "4"])
    s = lr_schedule(cfg)
    assert (s.warmup, s.decay, s.wd_incr) == (10.0, 40, 80)
    # validated twice (setup_job after a dry run or a test's own validation): the same, no new problem
    again = validate_config(cfg, 1)
    assert again.training.train_iters == 20
    twice = _cfg(["--train-samples", "1000", "--global-batch-size", "8"])
    assert validate_config(twice, 1).training.train_iters == 125


def test_scheduler_follows_the_formula_by_hand():
    """build_scheduler on the schedule in samples: Megatron-Core's scheduler with linear warmup over the
    fraction, cosine over the rest, stepping by the ramped-up batch."""
    from megatron_rpt.training.optimizer import build_scheduler

    class Stub:
        param_groups = [{"max_lr": 1e-3, "min_lr": 1e-4, "wd_mult": 1.0}]

    cfg = _cfg(["--train-samples", "400", "--global-batch-size", "32", "--rampup-batch-size", "8", "8", "96",
                "--min-lr", "1e-4", "--lr-warmup-fraction", "0.1", "--micro-batch-size", "8"])
    sched = build_scheduler(Stub(), cfg)
    consumed = 0
    for _ in range(cfg.training.train_iters):
        batch = global_batch_size_at(cfg, consumed)
        sched.step(batch)
        consumed += batch
        if consumed <= 40:
            want = 1e-3 * consumed / 40
        else:
            want = 1e-4 + 0.5 * (1 + math.cos(math.pi * (consumed - 40) / 360)) * 9e-4
        assert Stub.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12), consumed
    assert consumed == samples_after(cfg, cfg.training.train_iters)


def test_mixing_and_ramp_up_errors():
    assert problems(["--train-iters", "10", "--lr-decay-samples", "5", "--lr-warmup-samples", "2"]) == [
        "--lr-decay-samples is for sample-based training (--train-samples); with --train-iters give --lr-decay-iters",
        "--lr-warmup-samples is for sample-based training (--train-samples); with --train-iters give --lr-warmup-iters"]
    assert one_problem(["--train-samples", "100", "--lr-decay-iters", "5"]) == (
        "--lr-decay-iters is for iteration-based training; with --train-samples give --lr-decay-samples")
    assert one_problem(["--train-samples", "100", "--lr-warmup-fraction", "0.1", "--lr-warmup-samples", "5"]) == (
        "--lr-warmup-fraction and --lr-warmup-samples are exclusive (one warmup, as in Megatron-LM)")
    assert one_problem(["--train-iters", "10", "--rampup-batch-size", "1", "1", "4"]) == (
        "--rampup-batch-size needs sample-based training (--train-samples instead of --train-iters), as in Megatron-LM")
    assert one_problem(["--train-samples", "100", "--global-batch-size", "8", "--rampup-batch-size", "8", "2", "4"]
                       ) == ("--rampup-batch-size 8 2 4: START must be below --global-batch-size 8 and the difference "
                             "a multiple of INCR")
    assert "every global batch of the ramp must be divisible by --micro-batch-size 2 x data-parallel size 2" in \
        one_problem(["--train-samples", "100", "--global-batch-size", "16", "--micro-batch-size", "2",
                     "--rampup-batch-size", "4", "6", "8"], world_size=2)
    assert "the interleaved schedule needs every step's micro-batch count divisible by" in one_problem(
        ["--train-samples", "100", "--global-batch-size", "8", "--rampup-batch-size", "2", "3", "8",
         "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], world_size=2)
    assert one_problem(["--train-samples", "4", "--global-batch-size", "8"]) == (
        "--train-samples 4 is less than one global batch (8)")
    assert "--lr-warmup-samples: a warmup of 100 samples must be shorter than the decay (100 samples" in one_problem(
        ["--train-samples", "100", "--global-batch-size", "4", "--lr-warmup-samples", "100"])
    assert one_problem(["--train-samples", "100", "--lr-decay-style", "WSD"]) == (
        "--lr-decay-style WSD needs --lr-wsd-decay-samples")
    assert one_problem(["--train-iters", "10", "--decoupled-min-lr", "1e-5"]) == "--decoupled-min-lr needs --decoupled-lr"
    assert one_problem(["--train-iters", "10", "--override-opt-param-scheduler",
                        "--use-checkpoint-opt_param-scheduler"]).startswith(
        "--override-opt-param-scheduler and --use-checkpoint-opt_param-scheduler are exclusive")
    # Megatron-LM spells them with an underscore or dashes; both parse
    cfg = parse_args(BASE + ["--override-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler"])
    assert cfg.optimizer.override_opt_param_scheduler and cfg.optimizer.use_checkpoint_opt_param_scheduler


def test_rpt_refuses_ramp_up_and_counts_samples_in_sequences(tmp_path):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("")
    argv = ["--model-preset", "tiny", "--lr", "1e-6", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
            "--rpt-data", str(tasks), "--rpt-contexts-per-step", "2", "--rpt-group-size", "4",
            "--rpt-max-response-length", "32", "--attention-dropout", "0", "--hidden-dropout", "0"]
    with pytest.raises(ConfigError, match="--rampup-batch-size is not supported by mrpt-rpt"):
        validate_rpt_config(parse_rpt_args(argv + ["--train-samples", "64", "--rampup-batch-size", "4", "4", "8"]), 1)
    cfg = validate_rpt_config(parse_rpt_args(argv + ["--train-samples", "64"]), 1)
    assert cfg.training.train_iters == 8 and rampup(cfg) is None    # 64 sequences / (2 contexts x 4 rollouts)


def test_grad_reduce_in_bf16_reaches_ddp():
    from megatron_rpt.training.optimizer import ddp_config
    assert ddp_config(_cfg(["--train-iters", "1", "--bf16"])).grad_reduce_in_fp32 is True
    assert ddp_config(_cfg(["--train-iters", "1", "--bf16", "--grad-reduce-in-bf16"])).grad_reduce_in_fp32 is False
    assert one_problem(["--train-iters", "1", "--grad-reduce-in-bf16"]).startswith("--grad-reduce-in-bf16 needs --bf16")


def test_fp16_loss_scaling_flags_reach_megatron_core():
    """Megatron-LM's fp16 flags and defaults reach the optimizer config; no NaN check before the DP reduction
    (under dynamic scaling NaN/inf gradients are the scaler's signal, as Megatron-LM turns it off)."""
    from megatron_rpt.training.optimizer import ddp_config, megatron_optimizer_config
    default = megatron_optimizer_config(_cfg(["--train-iters", "1", "--fp16"]))
    assert (default.loss_scale, default.initial_loss_scale, default.min_loss_scale, default.loss_scale_window,
            default.hysteresis) == (None, 2.0 ** 32, 1.0, 1000, 2)
    given = megatron_optimizer_config(_cfg(["--train-iters", "1", "--fp16", "--initial-loss-scale", "4096",
                                            "--min-loss-scale", "2", "--loss-scale-window", "10", "--hysteresis",
                                            "1", "--loss-scale", "128"]))
    assert (given.loss_scale, given.initial_loss_scale, given.min_loss_scale, given.loss_scale_window,
            given.hysteresis) == (128, 4096, 2, 10, 1)
    assert ddp_config(_cfg(["--train-iters", "1", "--fp16"])).check_for_nan_in_grad is False


def test_decoupled_lr_reaches_megatron_core():
    from megatron_rpt.training.optimizer import megatron_optimizer_config
    config = megatron_optimizer_config(_cfg(["--train-iters", "1", "--decoupled-lr", "5e-4", "--decoupled-min-lr",
                                             "4.5e-5"]))
    assert (config.decoupled_lr, config.decoupled_min_lr) == (5e-4, 4.5e-5)
    assert one_problem(["--train-iters", "1", "--min-lr", "1e-4", "--decoupled-lr", "1e-5"]).startswith(
        "--decoupled-lr 1e-05 must be >= its minimum (0.0001")


def test_step_batch_size_schedule_follows_megatron_lm():
    """--step-batch-size-schedule (Megatron-LM's GPT-3 175B example; Megatron-Core 0.19's step calculator):
    thresholds in tokens (K/M/B/T) over --seq-length, each step's batch from the consumed samples, the last
    batch the global batch, and Megatron-LM's update_train_iters loop (the last step may pass --train-samples)."""
    from megatron_rpt.config.schedule import parse_step_schedule
    gpt3 = parse_step_schedule("0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536", 2048)
    assert gpt3.steps == ((0, 16), (1171875, 320), (2343750, 624), (3515625, 928), (4687500, 1232), (5859375, 1536))
    sched = "0:8 2K:16,4k:32"   # tokens 0, 2000, 4000 at --seq-length 64 -> samples 0, 31, 62
    cfg = _cfg(["--train-samples", "200", "--step-batch-size-schedule", sched, "--micro-batch-size", "8",
                "--seq-length", "64"])
    assert cfg.training.global_batch_size == 32
    consumed, sizes = 0, []
    while consumed < 200:   # Megatron-LM's loop
        sizes.append(8 if consumed < 31 else 16 if consumed < 62 else 32)
        consumed += sizes[-1]
    assert sizes == [8, 8, 8, 8, 16, 16, 32, 32, 32, 32, 32] and consumed == 224
    assert cfg.training.train_iters == len(sizes)
    assert [global_batch_size_at(cfg, sum(sizes[:i])) for i in range(len(sizes))] == sizes
    assert samples_after(cfg, len(sizes)) == 224 and samples_after(cfg, 3) == 24
    it = _cfg(["--train-iters", "5", "--step-batch-size-schedule", sched, "--seq-length", "64"])   # iteration-based: batches vary too
    assert it.training.global_batch_size == 32 and samples_after(it, 5) == 8 * 4 + 16
    assert lr_schedule(it).decay == 5 * 32   # the LR schedule counts the final batch, as Megatron-LM
    calculator = pytest.importorskip("megatron.core.num_microbatches_calculator")
    if not hasattr(calculator, "StepBatchsizeNumMicroBatchesCalculator"):
        pytest.skip("this megatron-core has no step batch-size schedule (before 0.19)")
    ref = calculator.StepBatchsizeNumMicroBatchesCalculator(8, 1, False, 1, sched, seq_length=64)
    for i, size in enumerate(sizes):
        ref.update(sum(sizes[:i]), consistency_check=True)
        assert (ref.get_current_global_batch_size(), ref.get()) == (size, size // 8)


@pytest.mark.parametrize("argv,message", [
    (["--train-samples", "99", "--step-batch-size-schedule", "8K:8 100K:16"], "the first threshold must be 0"),
    (["--train-samples", "99", "--step-batch-size-schedule", "0:8 16"], "entry '16' is not THRESHOLD:BATCH"),
    (["--train-samples", "99", "--step-batch-size-schedule", "0:8 10:16"], "thresholds must be distinct in samples"),
    (["--train-samples", "99", "--step-batch-size-schedule", "0:8 1K:16", "--global-batch-size", "32"],
     "ends at global batch 16 but --global-batch-size is 32"),
    (["--train-samples", "99", "--step-batch-size-schedule", "0:6 1K:16", "--micro-batch-size", "4"],
     "batch 6 (from sample 0) is not divisible by --micro-batch-size 4 x data-parallel size 1"),
    (["--train-samples", "99", "--step-batch-size-schedule", "0:8 1K:16", "--global-batch-size", "16",
      "--rampup-batch-size", "8", "8", "40"], "--step-batch-size-schedule and --rampup-batch-size are exclusive"),
])
def test_step_batch_size_schedule_errors(argv, message):
    assert any(message in p for p in problems(argv)), problems(argv)
    with pytest.raises(ConfigError, match="--step-batch-size-schedule is not supported by mrpt-rpt"):
        validate_rpt_config(parse_rpt_args(["--model-preset", "tiny", "--lr", "1e-3", "--vocab-size", "512",
                                            "--tokenizer-type", "NullTokenizer", "--rpt-data", "x.jsonl",
                                            "--train-iters", "2", "--step-batch-size-schedule", "0:8"]), 1)
