"""Schedule flags in real pretraining runs (forked gloo ranks, the tiny model of test_training_parity):
--rampup-batch-size's batch sizes, consumed samples and learning rates against a hand computation, a resume
in the middle of the ramp equal to the uninterrupted run; --decoupled-lr's param groups and the three resume
modes of a changed --lr (error / the checkpoint's / the command line's), read from the optimizer's param
groups after the first resumed step and compared with Megatron-Core's scheduler formula worked by hand."""

import math

import pytest

from tests.dist_harness import run_ranks
from tests.parallel.test_training_parity import BASE


def _cosine(step, max_lr, min_lr, warmup, decay):
    """Megatron-Core OptimizerParamScheduler.get_lr (linear warmup, cosine decay), in float64."""
    if warmup > 0 and step <= warmup:
        return max_lr * step / warmup
    if step > decay:
        return min_lr
    return min_lr + 0.5 * (math.cos(math.pi * (step - warmup) / (decay - warmup)) + 1.0) * (max_lr - min_lr)


def _with_flag(argv, flag, value):
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def _without(argv, *flags):
    """argv without the given one-value flags."""
    out = list(argv)
    for flag in flags:
        i = out.index(flag)
        del out[i:i + 2]
    return out


# 2 data-parallel ranks, micro-batch 2: global batches 4 -> 8 (one increment over 12 samples), 48 train samples.
RAMP = _without(BASE, "--train-iters", "--lr-warmup-iters") + [
    "--train-samples", "48", "--rampup-batch-size", "4", "4", "12", "--lr-warmup-samples", "4"]


def test_rampup_run_and_resume_mid_ramp(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    straight = run_ranks(_pretrain_lrs, 2, RAMP + ["--save", ckpt, "--save-interval", "2"], timeout=240)
    assert straight[0] == straight[1]   # every rank took the same batches and learning rates
    out = straight[0]
    # by hand: consumed 0, 4, 8, 12 -> batch 4 (12 is not > 12 samples: int(12 / 12) = 1 increment -> 8)
    batches, consumed = [], 0
    while consumed <= 12:
        batches.append(4 + 4 * int(consumed / 12))
        consumed += batches[-1]
    batches += [8] * ((48 - consumed) // 8)
    assert batches == [4, 4, 4, 8, 8, 8, 8] and out["iteration"] == len(batches)   # 44 samples: the partial
    # last batch is dropped, as Megatron-LM's update_train_iters does
    assert [out["batch_sizes"][i + 1] for i in range(len(batches))] == batches
    consumed = 0
    for i, b in enumerate(batches):
        consumed += b
        assert out["lrs"][i + 1] == pytest.approx(_cosine(consumed, 3e-3, 0.0, 4, 48), rel=1e-12, abs=1e-15)
    assert out["consumed"] == consumed == 44
    # resume at iteration 2 (8 samples consumed, mid-ramp): the same batches, learning rates and losses
    resumed = run_ranks(_pretrain_lrs, 2, RAMP + ["--load", ckpt, "--ckpt-step", "2"], timeout=240)
    assert resumed[0] == resumed[1]
    for key in ("losses", "lrs", "batch_sizes"):
        assert resumed[0][key] == {k: v for k, v in out[key].items() if k > 2}, key
    assert resumed[0]["consumed"] == 44


def _pretrain_lrs(rank, world, argv):
    import megatron_rpt.training.loop as loop
    from megatron_rpt.config import parse_args
    from megatron_rpt.config.validation import ConfigError
    captured = {}
    setup = loop.setup_job

    def spy(cfg, **kw):
        captured["job"] = job = setup(cfg, **kw)
        return job

    loop.setup_job = spy
    try:
        result = loop.pretrain(parse_args(argv))
    except ConfigError as e:
        return {"error": e.problems}
    finally:
        loop.setup_job = setup
    from megatron_rpt.training.optimizer import param_groups
    groups = param_groups(captured["job"].state.optimizer)
    return {"losses": result.losses, "lrs": result.lrs, "batch_sizes": result.batch_sizes,
            "iteration": result.iteration, "consumed": int(captured["job"].state.scheduler.num_steps),
            # (decoupled?, lr) of every parameter group that holds parameters
            "groups": sorted({(bool(g["is_decoupled_lr"]), g["lr"], g["max_lr"], g["min_lr"])
                              for g in groups if g["params"]})}


DECOUPLED = BASE + ["--min-lr", "1e-4", "--decoupled-lr", "1e-2", "--decoupled-min-lr", "1e-3",
                    "--lr-decay-style", "cosine"]


def test_decoupled_lr_and_the_three_resume_modes(tmp_path):
    """BASE: --lr 3e-3, warmup 1 iteration, 4 iterations of 8 samples (decay over 32 samples)."""
    ckpt = str(tmp_path / "ckpt")
    first = run_ranks(_pretrain_lrs, 1, DECOUPLED + ["--save", ckpt, "--exit-interval", "2"], timeout=240)[0]
    # after 2 steps (16 samples): embedding/output at the decoupled rates, the rest at --lr / --min-lr
    assert first["groups"] == [(False, pytest.approx(_cosine(16, 3e-3, 1e-4, 8, 32), rel=1e-12), 3e-3, 1e-4),
                               (True, pytest.approx(_cosine(16, 1e-2, 1e-3, 8, 32), rel=1e-12), 1e-2, 1e-3)]
    resume = DECOUPLED + ["--load", ckpt, "--exit-interval", "3"]
    changed = _with_flag(_with_flag(resume, "--lr", "6e-3"), "--decoupled-lr", "2e-2")
    # neither flag: one error naming each changed setting, both values and the two flags (Megatron-LM asserts)
    error = run_ranks(_pretrain_lrs, 1, changed, timeout=240)[0]["error"]
    assert [p.split(" in the checkpoint")[0] for p in error] == [
        f"resuming from {ckpt}/iter_0000002: --lr is 0.006 on the command line but 0.003",
        f"resuming from {ckpt}/iter_0000002: --decoupled-lr is 0.02 on the command line but 0.01"]
    assert all("--override-opt-param-scheduler" in p and "--use-checkpoint-opt_param-scheduler" in p
               and "--finetune" in p for p in error)
    # dropping --decoupled-lr changes the optimizer's param groups: refused in every mode
    error = run_ranks(_pretrain_lrs, 1, _without(resume, "--decoupled-lr", "--decoupled-min-lr")
                      + ["--override-opt-param-scheduler"], timeout=240)[0]["error"]
    assert error == [f"--decoupled-lr is not given but the checkpoint {ckpt}/iter_0000002 was saved with it: the "
                     "optimizer's parameter groups differ; resume with the same setting, or with --no-load-optim "
                     "(weights only, fresh optimizer)"]
    # the checkpoint's schedule (the old behaviour, now asked for): step 3 = 24 samples at the saved rates
    kept = run_ranks(_pretrain_lrs, 1, changed + ["--use-checkpoint-opt_param-scheduler"], timeout=240)[0]
    assert kept["groups"] == [(False, pytest.approx(_cosine(24, 3e-3, 1e-4, 8, 32), rel=1e-12), 3e-3, 1e-4),
                              (True, pytest.approx(_cosine(24, 1e-2, 1e-3, 8, 32), rel=1e-12), 1e-2, 1e-3)]
    # the command line's, continuing from the checkpoint's 16 samples
    new = run_ranks(_pretrain_lrs, 1, changed + ["--override-opt-param-scheduler"], timeout=240)[0]
    assert new["groups"] == [(False, pytest.approx(_cosine(24, 6e-3, 1e-4, 8, 32), rel=1e-12), 6e-3, 1e-4),
                             (True, pytest.approx(_cosine(24, 2e-2, 1e-3, 8, 32), rel=1e-12), 2e-2, 1e-3)]
    assert new["lrs"] == {3: pytest.approx(_cosine(24, 6e-3, 1e-4, 8, 32), rel=1e-12)}
