"""The generalized loss inside real pretraining: parallel layouts agree, CE settings are CE.

Runs `pretrain()` on forked gloo ranks (mock data, tiny model) with beta/lambda on, and compares
per-iteration losses and distribution statistics of TP2 + sequence parallel, PP2 (loss on the last
stage) and DP2 with the single-process run. Tolerance as in test_training_parity (2e-5 relative).
"""

import math

import pytest

from megatron_rpt.loss import STAT_NAMES
from tests.parallel.test_training_parity import RTOL, assert_close
from tests.parallel.test_training_parity import train as parity_train

LOSS = ["--loss-beta", "-0.25", "--loss-lambda-high", "0.1", "--loss-lambda-low", "-0.1", "--loss-topk", "10",
        "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1", "--split", "90,10,0"]


def train(world, extra=()):
    return parity_train(world, LOSS + list(extra))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("gl") / "ckpt")
    out = train(1, ["--save", ckpt, "--save-interval", "1"])
    out["ckpt"] = ckpt
    return out


def assert_stats_close(stats, ref, iters):
    for it in iters:
        for name in STAT_NAMES:
            assert stats[it][name] == pytest.approx(ref[it][name], rel=RTOL, abs=1e-7), (it, name)


def test_reference_logs_stats_every_step(reference):
    assert sorted(reference["stats"]) == [1, 2, 3, 4]
    for it, st in reference["stats"].items():
        assert set(st) == set(STAT_NAMES)
        assert all(math.isfinite(v) for v in st.values())
        assert 0 < st["target_prob"] < 1 and 0 <= st["top1"] <= 1
        assert st["topk_mass"] + st["tail_mass"] == pytest.approx(1.0, abs=1e-3)   # padding holds the rest
        assert 0 < st["entropy"] <= math.log(256) + 1e-4
    # the generalized loss with beta < 0 weighs targets up: it exceeds the plain CE it reports
    assert reference["losses"][1] > reference["stats"][1]["cross_entropy"]
    assert sorted(reference["valid_stats"]) == [2, 4]


def test_tensor_parallel_2_sequence_parallel(reference, tmp_path):
    # with TensorBoard (only rank 0 writes): statistics steps must still be the same on every rank,
    # or the loss's collectives mismatch and training hangs (a bug this caught)
    out = train(2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--log-interval", "2",
                    "--tensorboard-dir", str(tmp_path / "tb")])
    assert_close(out["losses"], reference["losses"])
    assert_stats_close(out["stats"], reference["stats"], [1, 2, 3, 4])
    assert_close(out["valid"], reference["valid"])


def test_pipeline_parallel_2(reference):
    out = train(2, ["--pipeline-model-parallel-size", "2", "--load", reference["ckpt"], "--ckpt-step", "1"])
    assert_close(out["losses"], {k: v for k, v in reference["losses"].items() if k > 1})
    assert_stats_close(out["stats"], reference["stats"], [2, 3, 4])


def test_data_parallel_2(reference):
    out = train(2, ["--use-distributed-optimizer"])
    assert_close(out["losses"], reference["losses"])
    assert_stats_close(out["stats"], reference["stats"], [1, 2, 3, 4])


def test_zero_settings_are_megatron_cross_entropy(reference):
    """Default flags (generalized loss at zero) train exactly like Megatron's own cross-entropy, and
    the CE statistic of the beta/lambda run at iteration 1 (before any update) is that loss."""
    plain = ["--log-interval", "1"]
    ours = parity_train(1, plain)
    meg = parity_train(1, plain + ["--loss-function", "cross_entropy"])
    assert ours["losses"] == meg["losses"]
    assert meg["stats"] == {}
    assert ours["stats"][1]["cross_entropy"] == pytest.approx(ours["losses"][1], rel=1e-6)
    assert reference["stats"][1]["cross_entropy"] == pytest.approx(ours["losses"][1], rel=1e-6)
