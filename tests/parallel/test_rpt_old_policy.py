"""The GRPO update's old policy, mismatch correction and mini-batches, on the synthetic task of
test_rpt_loop (forked gloo ranks, one rank each).

- An engine whose log-probs are off by a known +/-DELTA per token (the embedded engine's rollouts,
  log-probs perturbed) must give exactly the exact engine's update when the trainer recomputes the
  old policy (the default), and a different one with --rpt-use-rollout-logprobs (ratio != 1 at the
  first update). The reported mismatch is DELTA; --rpt-tis-cap C weighs tokens by
  min(exp(logp_old - logp_engine), C), whose mean must be the hand value.
- bf16: the first update's ratio is exactly 1.0 (the recompute and the update run the same forward);
  the metrics reach TensorBoard (the training driver's writer).
- --rpt-mini-batches 2 must equal a reference loop of two one-mini-batch updates on the same halves
  against the same old log-probs (parameters bit for bit); its second update sees a moved policy
  (ratio != 1) while the recomputed old log-probs still equal the engine's.
"""

import math

import pytest

from tests.dist_harness import run_ranks
from tests.parallel.test_rpt_loop import _args, task_files  # noqa: F401  (the fixture)

DELTA = 0.25


def _perturbed(engine):
    """The engine's rollouts with log-probs moved by +DELTA / -DELTA on alternate rollouts."""
    generate = engine.generate

    def perturbed(prompts, n, sampling):
        out = generate(prompts, n, sampling)
        for g, group in enumerate(out):
            for j, r in enumerate(group):
                sign = 1.0 if (g * n + j) % 2 == 0 else -1.0
                r.log_probs = [x + sign * DELTA for x in r.log_probs]
        return out
    engine.generate = perturbed
    return engine


def _run(rank, world, argv, perturb=False):
    from megatron_rpt.config import parse_rpt_args
    from megatron_rpt.rpt import loop

    if perturb:
        build = loop.build_engine
        loop.build_engine = lambda cfg, job: _perturbed(build(cfg, job))
    return loop.rpt_train(parse_rpt_args(argv)).metrics


KEYS = ("reward", "policy_loss", "grad_norm", "ratio", "clip_fraction", "entropy")


def test_recompute_cancels_an_engine_mismatch(task_files):  # noqa: F811
    argv = _args(task_files, ["--train-iters", "3", "--lr", "0.03"])
    exact = run_ranks(_run, 1, argv, timeout=300)[0]
    perturbed = run_ranks(_run, 1, argv, perturb=True, timeout=300)[0]
    for it in (1, 2, 3):
        for key in KEYS:
            assert perturbed[it][key] == exact[it][key], (it, key)
        assert exact[it]["max_abs_logp_diff"] < 1e-4
        assert perturbed[it]["mean_abs_logp_diff"] == pytest.approx(DELTA, abs=1e-4)
        assert perturbed[it]["max_abs_logp_diff"] == pytest.approx(DELTA, abs=1e-4)
        # k3 of d = +/-DELTA, half each
        k3 = (math.expm1(DELTA) - DELTA + math.expm1(-DELTA) + DELTA) / 2
        assert perturbed[it]["mismatch_kl"] == pytest.approx(k3, abs=1e-4)
    assert exact[1]["ratio"] == 1.0 and exact[1]["clip_fraction"] == 0.0

    # the engine's log-probs as the old policy: the first ratio is exp(-/+DELTA) per token
    engine_old = run_ranks(_run, 1, argv + ["--rpt-use-rollout-logprobs"], perturb=True, timeout=300)[0]
    assert engine_old[1]["ratio"] == pytest.approx((math.exp(-DELTA) + math.exp(DELTA)) / 2, abs=1e-4)
    assert engine_old[1]["clip_fraction"] > 0.0      # |DELTA| > eps = 0.2: the clip is active where A agrees
    assert engine_old[1]["grad_norm"] != exact[1]["grad_norm"]


def test_truncated_importance_sampling_weights(task_files):  # noqa: F811
    cap = 1.1
    argv = _args(task_files, ["--train-iters", "2", "--lr", "0.03", "--rpt-tis-cap", str(cap)])
    out = run_ranks(_run, 1, argv, perturb=True, timeout=300)[0]
    plain = run_ranks(_run, 1, argv[:-2], perturb=True, timeout=300)[0]
    # weight = min(exp(logp_old - logp_engine), cap) with logp_engine = logp_old +/- DELTA
    hand = (math.exp(-DELTA) + min(math.exp(DELTA), cap)) / 2
    for it in (1, 2):
        assert out[it]["tis_weight"] == pytest.approx(hand, abs=1e-4)
        assert plain[it]["tis_weight"] == 1.0
    assert out[1]["ratio"] == plain[1]["ratio"] == 1.0       # TIS weighs the loss, not the ratio
    assert out[1]["grad_norm"] != plain[1]["grad_norm"]


def _run_captured(rank, world, argv):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        metrics = _run(rank, world, argv)
    return {"metrics": metrics, "stdout": buf.getvalue()}


def test_bf16_first_ratio_is_exactly_one(task_files, tmp_path, monkeypatch):  # noqa: F811
    """Also mrpt-rpt's logging: TensorBoard and an offline W&B run get the same scalars (one sink),
    with --log-params-norm / --log-num-zeros-in-grad among them, and the timers follow the line."""
    from megatron_rpt.training.timers import parse_timer_block
    from tests.wandb_records import history

    tb, wandb_dir = tmp_path / "tb", tmp_path / "wandb"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    run = run_ranks(_run_captured, 1, _args(task_files, [
        "--train-iters", "2", "--bf16", "--tensorboard-dir", str(tb), "--wandb-project", "mrpt-test",
        "--wandb-save-dir", str(wandb_dir), "--log-params-norm", "--log-num-zeros-in-grad",
        "--timing-log-level", "1", "--log-interval", "1"]), timeout=300)[0]
    out = run["metrics"]
    assert out[1]["ratio"] == 1.0 and out[1]["clip_fraction"] == 0.0
    assert out[1]["train_tokens"] == 64
    # the driver's TensorBoard writer has every logged metric, at every iteration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb))
    acc.Reload()
    for key in ("ratio", "mismatch_kl", "max_abs_logp_diff", "updates", "reward", "params_norm", "num_zeros"):
        assert {e.step: e.value for e in acc.Scalars(f"rpt/{key}")} == pytest.approx(
            {it: float(out[it][key]) for it in (1, 2)}, rel=1e-6), key
    assert out[2]["params_norm"] > 0 and out[2]["num_zeros"] >= 0
    tb_values = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    wandb_values: dict = {}
    for step, row in history(str(wandb_dir)).items():
        for key, value in row.items():
            wandb_values.setdefault(key, {})[step] = value
    assert set(wandb_values) == set(tb_values)
    for tag, values in tb_values.items():
        assert wandb_values[tag] == pytest.approx(values, rel=1e-6), tag
    lines = run["stdout"].splitlines()
    interval = [i for i, x in enumerate(lines) if x.startswith(" iteration")]
    assert len(interval) == 2
    for i in interval:
        assert f"params norm: {out[int(lines[i].split('/')[0].split()[-1])]['params_norm']:.3f} |" in lines[i]
        block = parse_timer_block("\n".join(lines[i + 1:]))
        assert {"forward-backward", "all-grads-sync", "optimizer"} <= set(block), block


# ---- --rpt-mini-batches against a reference loop ------------------------------------------------
def _params(state) -> list:
    return [p.detach().double().flatten().tolist() for chunk in state.model for p in chunk.parameters()]


def _mini_batch_run(rank, world, argv, reference_parts=None):
    """One iteration. Records the parts `_update` got and the parameters after it. With
    `reference_parts`, `_update` ignores its own parts and runs one single-part update per recorded
    part instead (the reference loop)."""
    from megatron_rpt.config import parse_rpt_args
    from megatron_rpt.rpt import loop

    update, seen = loop._RPTJob._update, {}

    def recording(self, parts):
        if reference_parts is None:
            report, norms = update(self, parts)
        else:
            reports = [update(self, [part]) for part in reference_parts]
            report, norms = reports[-1][0], [n for _, ns in reports for n in ns]
        seen.update(parts=parts, params=_params(self.state), norms=norms)
        return report, norms
    loop._RPTJob._update = recording
    metrics = loop.rpt_train(parse_rpt_args(argv)).metrics
    return {**seen, "metrics": metrics}


def test_mini_batches_equal_a_reference_loop(task_files):  # noqa: F811
    argv = _args(task_files, ["--train-iters", "1", "--lr", "0.03", "--rpt-use-rollout-logprobs"])
    two = run_ranks(_mini_batch_run, 1, argv + ["--rpt-mini-batches", "2"], timeout=300)[0]
    assert [len(p) for p in two["parts"]] == [32, 32]                # 4 contexts x G=8 per part
    assert two["metrics"][1]["updates"] == 2 and len(two["norms"]) == 2
    ref = run_ranks(_mini_batch_run, 1, argv, reference_parts=two["parts"], timeout=300)[0]
    assert ref["norms"] == two["norms"]
    assert ref["params"] == two["params"]
    one = run_ranks(_mini_batch_run, 1, argv, timeout=300)[0]        # control: one update on all 8 contexts
    assert one["params"] != two["params"]

    # with the recompute: the old policy is the one before the first update, for both mini-batches
    recomputed = run_ranks(_mini_batch_run, 1, argv[:-1] + ["--rpt-mini-batches", "2"], timeout=300)[0]["metrics"][1]
    assert recomputed["max_abs_logp_diff"] < 1e-4                   # old log-probs = the sampling policy's
    assert recomputed["ratio"] != 1.0                               # the second update saw a moved policy
