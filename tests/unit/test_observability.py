"""Megatron-LM's observability flags: parsed as fields with its names and defaults, checked at start-up
(W&B without its package or a folder), and the pieces that need no process group: the interval line's
optional fields, validation perplexity only on request, and the sink fan-out that gives W&B exactly the
TensorBoard calls. The collective parts (timers, parameter norm, zero count, a real offline W&B run) are
tested in tests/parallel/test_logging.py."""

import sys

import pytest

from megatron_rpt.config import ConfigError, parse_args, parse_rpt_args
from megatron_rpt.config.megatron_lm import IGNORED, REFUSED
from megatron_rpt.training.logging import MetricsLogger, parse_log_line
from megatron_rpt.training.sinks import MetricSinks
from megatron_rpt.training.step import StepResult
from megatron_rpt.validate import validate_config, validate_rpt_config

BASE = ["--model-preset", "tiny", "--lr", "1e-3", "--train-iters", "10", "--mock-data", "--vocab-size", "512"]
FLAGS = ["--timing-log-level", "--timing-log-option", "--log-timers-to-tensorboard", "--log-params-norm",
         "--log-num-zeros-in-grad", "--log-validation-ppl-to-tensorboard", "--wandb-project", "--wandb-exp-name",
         "--wandb-save-dir", "--wandb-entity", "--no-barrier-with-level-1-timing"]


def test_flags_are_fields_with_megatron_lm_defaults(capsys):
    lg = parse_args(BASE).logging
    assert (lg.timing_log_level, lg.timing_log_option, lg.log_timers_to_tensorboard, lg.barrier_with_L1_time,
            lg.log_params_norm, lg.log_num_zeros_in_grad, lg.log_validation_ppl_to_tensorboard,
            lg.wandb_project, lg.wandb_exp_name, lg.wandb_save_dir, lg.wandb_entity) == \
        (0, "minmax", False, True, False, False, False, None, None, None, None)
    lg = parse_args(BASE + ["--timing-log-level", "2", "--timing-log-option", "all", "--log-timers-to-tensorboard",
                            "--no-barrier-with-level-1-timing", "--log-params-norm", "--log-num-zeros-in-grad",
                            "--log-validation-ppl-to-tensorboard", "--wandb-project", "p", "--wandb-exp-name", "e",
                            "--wandb-save-dir", "w", "--wandb-entity", "t"]).logging
    assert (lg.timing_log_level, lg.timing_log_option, lg.log_timers_to_tensorboard, lg.barrier_with_L1_time,
            lg.log_params_norm, lg.log_num_zeros_in_grad, lg.log_validation_ppl_to_tensorboard,
            lg.wandb_project, lg.wandb_exp_name, lg.wandb_save_dir, lg.wandb_entity) == \
        (2, "all", True, False, True, True, True, "p", "e", "w", "t")
    assert " ignored: " not in capsys.readouterr().out
    assert not set(FLAGS) & (set(IGNORED) | set(REFUSED))
    for bad in (["--timing-log-level", "3"], ["--timing-log-option", "mean"]):
        with pytest.raises(SystemExit):
            parse_args(BASE + bad)


def test_wandb_needs_its_package_and_a_folder(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)   # importlib.util.find_spec then reports it missing
    with pytest.raises(ConfigError) as e:
        validate_config(parse_args(BASE + ["--wandb-project", "p", "--save", str(tmp_path)]), 1)
    assert e.value.problems == ["--wandb-project p: the wandb package is not installed (pip install wandb, or "
                                "megatron-rpt[wandb]); drop --wandb-project to log to stdout/TensorBoard only"]
    monkeypatch.delitem(sys.modules, "wandb")
    pytest.importorskip("wandb")
    with pytest.raises(ConfigError) as e:
        validate_config(parse_args(BASE + ["--wandb-project", "p"]), 1)
    assert e.value.problems == ["--wandb-project needs --wandb-save-dir DIR or --save DIR (the W&B run files go "
                                "to --wandb-save-dir, default SAVE/wandb)"]
    validate_config(parse_args(BASE + ["--wandb-project", "p", "--wandb-save-dir", str(tmp_path)]), 1)
    validate_config(parse_args(BASE + ["--wandb-project", "", "--wandb-exp-name", "e"]), 1)  # empty: off


def test_rpt_refuses_validation_perplexity(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("")
    argv = BASE + ["--rpt-data", str(tasks), "--rpt-contexts-per-step", "2", "--rpt-group-size", "2",
                   "--seq-length", "64", "--rpt-max-response-length", "8"]
    validate_rpt_config(parse_rpt_args(argv), 1)
    with pytest.raises(ConfigError) as e:
        validate_rpt_config(parse_rpt_args(argv + ["--log-validation-ppl-to-tensorboard"]), 1)
    assert [p for p in e.value.problems if "ppl" in p] == [
        "--log-validation-ppl-to-tensorboard: RPT's evaluation measures next-token accuracy on held-out tasks, "
        "it has no validation loss; drop the flag"]


class _Recorder:
    """A SummaryWriter / W&B run stand-in that records what it is given."""

    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))

    def add_histogram(self, tag, values, step):
        self.calls.append((tag, list(values), step))

    def log(self, data, step):
        self.calls.append((dict(data), step))

    def flush(self):
        self.calls.append("flush")

    def close(self):
        self.calls.append("close")

    def finish(self):
        self.calls.append("finish")


def _logger(writer, **kw):
    return MetricsLogger(log_interval=2, writer=writer, tensorboard=True, tensorboard_log_interval=1, train_iters=4,
                         global_batch_size=2, seq_length=8, flops_per_token=1.0, world_size=1, peak_tflops=None,
                         device_type="cpu", is_logging_rank=False, **kw)


def test_line_fields_and_validation_perplexity_on_request():
    tb = _Recorder()
    log = _logger(tb)
    log.record(1, StepResult(3.0, 16, 0.5, 120.0, True, 1e-3, params_norm=12.25), 2)
    line = log.record(2, StepResult(2.0, 16, 0.25, 96.0, True, 1e-3, params_norm=12.5), 4)
    # Megatron-LM's order and labels: grad norm | num zeros | params norm
    assert "| grad norm: 0.250 | num zeros: 96.0 | params norm: 12.500 |" in line
    parsed = parse_log_line(line)
    assert (parsed["num_zeros"], parsed["params_norm"]) == (96.0, 12.5)
    assert [c for c in tb.calls if c[0] in ("num-zeros", "params-norm")] == [
        ("num-zeros", 120.0, 1), ("params-norm", 12.25, 1), ("num-zeros", 96.0, 2), ("params-norm", 12.5, 2)]
    assert "num zeros" not in _logger(None).record(2, StepResult(2.0, 16, 0.25, None, True, 1e-3), 4)
    log.log_eval(2, 2.0, 16)
    assert [c[0] for c in tb.calls if "validation" in c[0]] == ["lm loss validation"]
    log = _logger(tb, log_validation_ppl=True)
    log.log_eval(4, 2.0, 16)
    assert tb.calls[-1][0] == "lm loss validation ppl" and tb.calls[-1][1] == pytest.approx(7.38905609893065)


def test_sinks_give_wandb_what_tensorboard_gets():
    tb, run = _Recorder(), _Recorder()
    sinks = MetricSinks(tb, run)
    sinks.add_scalar("lm loss", 2.5, 1)
    sinks.add_scalar("grad-norm", 1, 1)
    sinks.add_scalar("lm loss", 2.25, 2)       # a new step sends the previous step's values in one call
    assert tb.calls == [("lm loss", 2.5, 1), ("grad-norm", 1.0, 1), ("lm loss", 2.25, 2)]
    assert run.calls == [({"lm loss": 2.5, "grad-norm": 1.0}, 1)]
    sinks.flush()
    assert run.calls[-1] == ({"lm loss": 2.25}, 2) and tb.calls[-1] == "flush"
    sinks.add_scalar("eval/accuracy", 0.5, 2)
    sinks.close()
    assert run.calls[-2:] == [({"eval/accuracy": 0.5}, 2), "finish"] and tb.calls[-2:] == ["flush", "close"]
    only_tb = MetricSinks(tb, None)
    only_tb.add_scalar("x", 1.0, 3)
    only_tb.close()
    assert tb.calls[-3:] == [("x", 1.0, 3), "flush", "close"]


def test_timer_blocks_of_each_option_read_back():
    """Megatron-Core's three --timing-log-option formats (as printed by runs on 0.16.1/0.19.2), read back;
    the block ends at the first unindented line."""
    from megatron_rpt.training.timers import parse_timer_block, timer_names

    minmax = ("(min, max) time across ranks (ms):\n"
              "    forward-backward ...............................: (326.80, 328.10)\n"
              "    optimizer ......................................: (24.86, 30.17)\n"
              " validation loss at iteration 2 | lm loss value: 5.2E+00 |")
    assert parse_timer_block(minmax) == {"forward-backward": (326.8, 328.1), "optimizer": (24.86, 30.17)}
    most = "max time across ranks (ms):\n    save-checkpoint ................................: 870.10\n"
    assert parse_timer_block(most) == {"save-checkpoint": 870.1}
    every = ("times across ranks (ms):\n  forward-backward:\n     rank  0: 335.26\n     rank  1: 336.28\n"
             "  all-grads-sync:\n     rank  0: 0.23\n     rank  1: 0.49\n> training stopped")
    assert parse_timer_block(every) == {"forward-backward": {0: 335.26, 1: 336.28}, "all-grads-sync": {0: 0.23, 1: 0.49}}
    assert timer_names(0) == [] and "forward-backward" in timer_names(1) and "batch-generator" not in timer_names(1)
    assert timer_names(2)[:len(timer_names(1))] == timer_names(1) and "batch-generator" in timer_names(2)
