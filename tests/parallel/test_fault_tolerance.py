"""NaN/inf gradients skip the update on every rank and stop training after too many in a row;
--exit-duration-in-mins saves and exits. Gradients are poisoned through a tensor hook on one
parameter of rank 0 only, so the test also shows that all ranks take the same decision."""

import pytest

from tests.dist_harness import RankError, run_ranks
from tests.parallel.test_checkpoint_resume import SIX


def _poisoned_run(rank, world, argv, bad_iterations):
    import megatron_rpt.training.step as step_module
    from megatron_rpt.config import parse_args
    from megatron_rpt.training.loop import pretrain
    from megatron_rpt.models.gpt import unwrap
    original = step_module.train_step
    trace = {"fingerprint": {}, "lr": {}, "nonfinite": {}}
    calls = [0]

    def fingerprint(state) -> float:
        return float(sum(p.detach().double().sum() for m in state.model for p in unwrap(m).parameters()))

    def train_step(state, *args, **kwargs):
        calls[0] += 1
        it = calls[0]
        hook = None
        if it in bad_iterations and rank == 0:
            param = next(unwrap(state.model[0]).parameters())
            hook = param.register_hook(lambda g: g * float("nan"))
        try:
            step = original(state, *args, **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        trace["fingerprint"][it] = fingerprint(state)
        trace["lr"][it] = step.lr
        trace["nonfinite"][it] = step.nonfinite
        return step

    step_module.train_step = train_step  # pretrain imports it at call time
    try:
        result = pretrain(parse_args(argv))
    finally:
        step_module.train_step = original
    return {**trace, "losses": result.losses, "skipped": result.nonfinite_skipped, "exit": result.exit_reason,
            "iteration": result.iteration, "saved": result.saved}


def test_nonfinite_gradients_skip_the_update_on_every_rank():
    clean = run_ranks(_poisoned_run, 2, SIX, set(), timeout=240)
    runs = run_ranks(_poisoned_run, 2, SIX, {3}, timeout=240)
    for r in runs:
        assert r["skipped"] == 1 and r["nonfinite"] == {1: False, 2: False, 3: True, 4: False, 5: False, 6: False}
        assert r["fingerprint"][3] == r["fingerprint"][2]           # weights untouched by the poisoned step
        assert r["fingerprint"][4] != r["fingerprint"][3]           # and training goes on
        assert r["lr"][4] == clean[0]["lr"][3]                     # the LR schedule did not advance either
        assert all(v == v for v in r["fingerprint"].values())       # no NaN ever reached the weights
    assert runs[0]["fingerprint"] == runs[1]["fingerprint"]         # DP replicas identical
    assert runs[0]["losses"][2] == clean[0]["losses"][2] and runs[0]["losses"][3] == clean[0]["losses"][3]
    assert runs[0]["losses"][4] != clean[0]["losses"][4]


def test_too_many_consecutive_nonfinite_iterations_stop_training():
    with pytest.raises(RankError) as err:
        run_ranks(_poisoned_run, 2, SIX + ["--nonfinite-grad-skip-limit", "2"], {2, 3, 4}, timeout=240)
    assert "iteration 4: 3 consecutive iterations with NaN/inf gradients" in str(err.value)
    assert "--nonfinite-grad-skip-limit 2" in str(err.value)
    # Not consecutive: 2 and 4 are skipped, training finishes.
    runs = run_ranks(_poisoned_run, 1, SIX + ["--nonfinite-grad-skip-limit", "1"], {2, 4}, timeout=240)
    assert runs[0]["skipped"] == 2 and runs[0]["iteration"] == 6


def test_exit_duration_saves_and_exits(tmp_path):
    runs = run_ranks(_poisoned_run, 2, SIX + ["--exit-duration-in-mins", "1e-6", "--save", str(tmp_path)], set(),
                     timeout=240)
    for r in runs:
        assert r["exit"] == "exit_duration" and r["iteration"] == 1
    assert runs[0]["saved"] == [str(tmp_path / "iter_0000001")]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
