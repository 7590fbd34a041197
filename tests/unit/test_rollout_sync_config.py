"""Start-up checks of the external engine's log-prob mode and weight sync, and of --ckpt-keep-last.

--rollout-logprobs raw (temperature-1 log-probs) is refused at another --rpt-temperature (no way to
convert one log-prob); tempered log-probs with top-p/top-k (vLLM renormalises over the kept set) are
refused only where the engine's log-probs enter the update; --rollout-reload none (a server that
never sees the updated weights) needs --rollout-frozen-policy, which in turn takes no reload
protocol; --ckpt-keep-last must be >= 1 and needs --save; --rpt-mini-batches, --rpt-tis-cap and
--rpt-use-rollout-logprobs name their bad values.
"""

import pytest

from megatron_rpt.config import ConfigError, parse_args, parse_rpt_args
from megatron_rpt.validate import validate_config
from megatron_rpt.validate import validate_rpt_config

BASE = ["--model-preset", "tiny", "--lr", "1e-3", "--train-iters", "10", "--vocab-size", "512",
        "--tokenizer-type", "NullTokenizer", "--seq-length", "128"]
RPT = BASE + ["--rpt-data", "tasks.jsonl", "--rpt-max-response-length", "64", "--rpt-contexts-per-step", "4",
              "--rpt-group-size", "4"]
OPENAI = ["--rollout-engine", "openai", "--rollout-url", "http://server:8000", "--save", "ckpt",
          "--rollout-reload", "sglang"]


def rpt_problems(argv):
    try:
        validate_rpt_config(parse_rpt_args(RPT + argv), 1, check_files=False)
    except ConfigError as e:
        return e.problems
    return []


def test_raw_logprobs_need_temperature_one():
    assert rpt_problems(OPENAI + ["--rpt-temperature", "0.8"]) == []            # tempered is the default
    problems = rpt_problems(OPENAI + ["--rollout-logprobs", "raw", "--rpt-temperature", "0.8"])
    assert len(problems) == 1
    assert "--rollout-logprobs raw" in problems[0] and "--rpt-temperature 0.8" in problems[0]
    assert "processed_logprobs" in problems[0]
    assert rpt_problems(OPENAI + ["--rollout-logprobs", "raw", "--rpt-temperature", "1.0", "--rpt-top-p", "0.9",
                                  "--rpt-use-rollout-logprobs"]) == []     # raw at T = 1: full-vocabulary log-probs
    # the embedded engine computes its own log-probs: the flag is about the server only
    assert rpt_problems(["--rollout-logprobs", "raw", "--rpt-temperature", "0.8"]) == []


@pytest.mark.parametrize("truncation", [["--rpt-top-p", "0.9"], ["--rpt-top-k", "20"]], ids=["top-p", "top-k"])
def test_truncated_tempered_logprobs_refused_where_they_drive_the_update(truncation):
    assert rpt_problems(OPENAI + truncation) == []            # the trainer recomputes the old log-probs
    for users in (["--rpt-use-rollout-logprobs"], ["--rpt-tis-cap", "2.0"]):
        problems = rpt_problems(OPENAI + truncation + users)
        assert len(problems) == 1 and "renormalised over the top-k/top-p set" in problems[0], problems
        assert truncation[0] in problems[0] and users[0] in problems[0]
        assert rpt_problems(OPENAI + users) == []             # no truncation: exact


def test_reload_none_needs_frozen_policy():
    stale = OPENAI[:-2] + ["--rollout-reload", "none"]
    problems = rpt_problems(stale)
    assert len(problems) == 1 and "stale policy" in problems[0] and "--rollout-frozen-policy" in problems[0]
    assert rpt_problems(stale + ["--rollout-frozen-policy"]) == []
    problems = rpt_problems(OPENAI + ["--rollout-frozen-policy"])
    assert len(problems) == 1 and "drop --rollout-reload sglang" in problems[0]
    assert rpt_problems(["--rollout-frozen-policy"]) == []    # the embedded engine has no server to freeze


def test_ckpt_keep_last():
    def problems(argv):
        try:
            validate_config(parse_args(BASE + ["--mock-data"] + argv), 1)
        except ConfigError as e:
            return e.problems
        return []

    assert problems(["--save", "ckpt", "--ckpt-keep-last", "1"]) == []
    assert parse_args(BASE + ["--ckpt-keep-last", "3"]).checkpoint.ckpt_keep_last == 3
    for bad in ("0", "-2"):
        found = problems(["--save", "ckpt", "--ckpt-keep-last", bad])
        assert len(found) == 1 and f"--ckpt-keep-last must be >= 1 (got {bad})" in found[0]
    assert problems(["--ckpt-keep-last", "2"]) == ["--ckpt-keep-last needs --save DIR"]


def test_update_flags_bad_values_are_named():
    """--rpt-mini-batches, --rpt-tis-cap and --rpt-use-rollout-logprobs (the old-policy options)."""
    assert rpt_problems(["--rpt-mini-batches", "2", "--rpt-tis-cap", "2.0"]) == []
    for bad in ("0", "-1"):
        assert rpt_problems(["--rpt-mini-batches", bad]) == [f"--rpt-mini-batches must be >= 1 (got {bad})"]
    # 4 contexts per step, DP 1: 3 mini-batches cannot take equal shares
    problems = rpt_problems(["--rpt-mini-batches", "3"])
    assert len(problems) == 1 and "--rpt-contexts-per-step 4 is not divisible by the data-parallel size 1 x " \
                                  "--rpt-mini-batches 3" in problems[0]
    for bad in ("0", "-0.5", "inf", "nan"):
        problems = rpt_problems(["--rpt-tis-cap", bad])
        assert len(problems) == 1 and problems[0].startswith("--rpt-tis-cap must be a finite number > 0"), bad
    problems = rpt_problems(["--rpt-tis-cap", "2.0", "--rpt-use-rollout-logprobs"])
    assert len(problems) == 1 and "there is no recompute" in problems[0]


def test_dropout_is_refused_for_grpo():
    """Megatron-LM's default dropout (0.1) would make every forward a different policy."""
    assert rpt_problems([]) == []   # the preset has no dropout
    problems = rpt_problems(["--hidden-dropout", "0.1"])
    assert len(problems) == 1 and "--hidden-dropout 0.1" in problems[0] and "--attention-dropout 0 " in problems[0]
    assert len(rpt_problems(["--attention-dropout", "0.05"])) == 1
