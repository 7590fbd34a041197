"""Router observability: per-layer expert load, expert-bias and aux/z-loss statistics are the same
whatever the layout (the reductions over data/expert/pipeline ranks are right) and add up.

The EP=2 and PP=2 runs resume from the single-process reference's iteration-1 checkpoint
(resharded on load), so iteration 2's routing is computed from identical weights: the tokens per
expert must match exactly; later iterations differ only by fp32 reduction-order noise.
"""

import os

import pytest

from tests.parallel.test_training_parity import BASE, train

MOE = ["--num-experts", "4", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "2",
       "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
       "--moe-router-load-balancing-type", "none", "--moe-router-bias-update-rate", "0.01",
       "--log-interval", "1"]
TOKENS_PER_STEP = 8 * 32  # global batch x sequence length (BASE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("moe_ref") / "ckpt")
    out = train(1, MOE + ["--save", ckpt, "--save-interval", "1"])
    out["ckpt"] = ckpt
    return out


def test_counts_add_up_and_ratios_follow_from_them(reference):
    moe = reference["moe"]
    assert sorted(moe) == [1, 2, 3, 4]
    for it, stats in moe.items():
        counts = stats["tokens_per_expert"]
        assert sorted(counts) == [1, 2, 3, 4]  # every layer
        for layer, c in counts.items():
            assert sum(c) == TOKENS_PER_STEP * 2  # top-2: each token counted twice
            mean = sum(c) / len(c)
            assert stats[f"layer{layer:02d}/max-over-mean-load"] == pytest.approx(max(c) / mean)
            assert stats[f"layer{layer:02d}/min-over-mean-load"] == pytest.approx(min(c) / mean)
        assert stats["max-over-mean-load"] == pytest.approx(
            sum(stats[f"layer{l:02d}/max-over-mean-load"] for l in counts) / 4)
    # Expert bias: zero before the first update, then multiples of the rate (sign updates).
    assert moe[1]["expert-bias-absmax"] == pytest.approx(0.01)
    assert moe[4]["expert-bias-absmax"] <= 0.04 + 1e-9


@pytest.mark.parametrize("layout", [["--expert-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["ep2", "pp2"])
def test_layouts_report_the_reference_statistics(reference, layout):
    out = train(2, MOE + layout + ["--load", reference["ckpt"], "--ckpt-step", "1"])
    ref, got = reference["moe"], out["moe"]
    assert sorted(got) == [2, 3, 4]
    assert got[2]["tokens_per_expert"] == ref[2]["tokens_per_expert"]
    for it in (2, 3, 4):
        for key, value in ref[it].items():
            if key == "tokens_per_expert":
                for layer, c in value.items():
                    assert sum(abs(a - b) for a, b in zip(got[it][key][layer], c)) <= 4, (it, layer)
            else:
                assert got[it][key] == pytest.approx(value, rel=0.05, abs=1e-6), (it, key)


def test_aux_and_z_losses_are_reported_and_layout_independent(tmp_path):
    aux = [a for a in MOE if a not in ("--moe-router-enable-expert-bias",)]
    aux[aux.index("sigmoid")] = "softmax"
    aux[aux.index("none")] = "aux_loss"
    aux += ["--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001", "--tensorboard-dir", str(tmp_path / "tb"),
            "--tensorboard-log-interval", "1"]
    one = train(1, aux)["moe"]
    two = train(2, aux[:-4] + ["--tensorboard-dir", str(tmp_path / "tb2"), "--tensorboard-log-interval", "1"])["moe"]
    for it in (1, 2):
        # Switch-style balance loss: E * sum_e f_e P_e >= topk-scaled 1 at perfect balance; z-loss > 0.
        assert 0.5 < one[it]["load-balancing-loss"] < 4 and one[it]["z-loss"] > 0
        for key in ("load-balancing-loss", "z-loss", "max-over-mean-load"):
            assert two[it][key] == pytest.approx(one[it][key], rel=1e-4), (it, key)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    tags = events.Tags()
    assert {"moe/load-balancing-loss", "moe/z-loss", "moe/max-over-mean-load", "moe/layer01/max-over-mean-load"} \
        <= set(tags["scalars"])
    assert "moe/tokens-per-expert/layer01" in tags["histograms"]
    assert [e.value for e in events.Scalars("moe/z-loss")] == pytest.approx([one[1]["z-loss"], one[2]["z-loss"],
                                                                              one[3]["z-loss"], one[4]["z-loss"]])


def test_generalized_loss_with_expert_parallelism(reference):
    """The paper's loss settings on the MoE model: EP=2 follows the single-process run."""
    loss = ["--loss-beta", "-0.25", "--loss-lambda-low", "-0.1", "--load", reference["ckpt"], "--ckpt-step", "1"]
    one = train(1, MOE + loss)
    two = train(2, MOE + loss + ["--expert-model-parallel-size", "2"])
    assert sorted(one["losses"]) == [2, 3, 4]
    for it in (2, 3, 4):
        assert two["losses"][it] == pytest.approx(one["losses"][it], rel=2e-5), it
    # Not cross-entropy: the generalized loss differs from the plain CE it also reports.
    assert abs(one["losses"][4] - one["stats"][4]["cross_entropy"]) > 1e-3
