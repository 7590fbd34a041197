"""Checkpoint save/resume: exact trajectories, resharding on load, atomic publication, bad checkpoints."""

import os

import pytest

from tests.dist_harness import run_ranks
from tests.parallel.test_training_parity import BASE, RTOL, _pretrain, assert_close

SIX = [a if a != "4" or BASE[i - 1] != "--train-iters" else "6" for i, a in enumerate(BASE)]


def run(world, extra, timeout=240):
    return run_ranks(_pretrain, world, SIX + list(extra), timeout=timeout)[0]


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2"],
    ["--use-distributed-optimizer"],
    ["--pipeline-model-parallel-size", "2"],
], ids=["tp2", "dp2-distopt", "pp2"])
def test_resume_is_exact(tmp_path, layout):
    straight = run(2, layout)
    ckpt = str(tmp_path / "ckpt")
    first = run(2, layout + ["--save", ckpt, "--save-interval", "3", "--exit-interval", "3"])
    assert sorted(first["losses"]) == [1, 2, 3]
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "3"
    second = run(2, layout + ["--save", ckpt, "--load", ckpt, "--save-interval", "3"])
    assert second["resumed_from"].endswith("iter_0000003")
    assert sorted(second["losses"]) == [4, 5, 6]
    # bit-identical continuation on CPU: model, Adam moments and step, LR schedule, data position, RNG
    for it in (4, 5, 6):
        assert second["losses"][it] == straight["losses"][it], (it, second["losses"][it], straight["losses"][it])


@pytest.mark.parametrize("save_layout,load_world,load_layout", [
    (["--tensor-model-parallel-size", "2"], 1, []),
    (["--use-distributed-optimizer"], 1, ["--use-distributed-optimizer"]),
    (["--tensor-model-parallel-size", "2"], 2, ["--pipeline-model-parallel-size", "2"]),
], ids=["tp2-to-tp1", "dp2-distopt-to-dp1", "tp2-to-pp2"])
def test_reshard_on_load(tmp_path, save_layout, load_world, load_layout):
    straight = run(2, save_layout)
    ckpt = str(tmp_path / "ckpt")
    run(2, save_layout + ["--save", ckpt, "--save-interval", "3", "--exit-interval", "3"])
    resumed = run(load_world, load_layout + ["--load", ckpt])
    assert sorted(resumed["losses"]) == [4, 5, 6]
    assert_close(resumed["losses"], {k: v for k, v in straight["losses"].items() if k > 3}, rtol=RTOL)


def _save_then_crash(rank, world, argv, ckpt):
    """Save iteration 2 normally, then make the iteration-4 save die inside dist_checkpointing."""
    from megatron.core import dist_checkpointing

    from megatron_rpt.config import parse_args
    from megatron_rpt.training.loop import pretrain

    real_save = dist_checkpointing.save

    def crashing_save(sd, path, **kw):
        if path.endswith("iter_0000004.tmp"):
            real_save(sd, path, **kw)          # the data is on disk ...
            raise KeyboardInterrupt("killed")  # ... but the job dies before publishing it
        return real_save(sd, path, **kw)

    dist_checkpointing.save = crashing_save  # the module object checkpoint.sharded calls
    try:
        pretrain(parse_args(argv + ["--save", ckpt, "--save-interval", "2"]))
    except KeyboardInterrupt:
        pass
    return sorted(os.listdir(ckpt))


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    names = run_ranks(_save_then_crash, 1, SIX, ckpt)[0]
    assert "iter_0000002" in names and "iter_0000004" not in names and "iter_0000004.tmp" in names
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "2"
    resumed = run(1, ["--load", ckpt])
    assert resumed["resumed_from"].endswith("iter_0000002") and sorted(resumed["losses"]) == [3, 4, 5, 6]


def _load_expect_error(rank, world, argv):
    from megatron_rpt.config import parse_args
    from megatron_rpt.checkpoint.layout import CheckpointError
    from megatron_rpt.training.loop import pretrain
    try:
        pretrain(parse_args(argv))
    except CheckpointError as e:
        return str(e)
    return None


def test_bad_checkpoints_give_clear_errors(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("garbage")
    msg = run_ranks(_load_expect_error, 1, SIX + ["--load", str(ckpt)])[0]
    assert msg and "expected an iteration number" in msg and "garbage" in msg
    (ckpt / "latest_checkpointed_iteration.txt").write_text("7")
    msg = run_ranks(_load_expect_error, 1, SIX + ["--load", str(ckpt)])[0]
    assert msg and "iter_0000007" in msg and "not found" in msg
    (ckpt / "latest_checkpointed_iteration.txt").unlink()
    (ckpt / "iter_0000005").mkdir()
    msg = run_ranks(_load_expect_error, 1, SIX + ["--load", str(ckpt)])[0]
    assert msg and "--ckpt-step" in msg
    msg = run_ranks(_load_expect_error, 1, SIX + ["--load", str(ckpt), "--ckpt-step", "5"])[0]
    assert msg and ".metadata is missing" in msg and "iter_0000005" in msg


def test_empty_load_dir_starts_from_scratch(tmp_path):
    out = run(1, ["--load", str(tmp_path / "none")])
    assert out["resumed_from"] is None and sorted(out["losses"]) == [1, 2, 3, 4, 5, 6]


def _preempted(rank, world, argv, signal_after):
    """SIGTERM arrives at rank 0 only, during iteration `signal_after` (as SLURM preemption would)."""
    import signal

    from megatron_rpt.training import step

    real = step.train_step
    calls = {"n": 0}

    def train_step(*a, **kw):
        calls["n"] += 1
        if rank == 0 and calls["n"] == signal_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    step.train_step = train_step
    return _pretrain(rank, world, argv)


def test_sigterm_saves_and_resumes_exactly(tmp_path):
    """With --async-save: the exit path waits for the background save before the run returns."""
    layout = ["--tensor-model-parallel-size", "2"]
    straight = run(2, layout)
    ckpt = str(tmp_path / "ckpt")
    first = run_ranks(_preempted, 2, SIX + layout + ["--save", ckpt, "--exit-signal-handler", "--async-save"], 2)[0]
    assert sorted(first["losses"]) == [1, 2]  # both ranks stopped after the iteration the signal hit
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "2"
    second = run(2, layout + ["--save", ckpt, "--load", ckpt])
    assert {k: second["losses"][k] for k in (3, 4, 5, 6)} == {k: straight["losses"][k] for k in (3, 4, 5, 6)}


def test_checkpoint_from_newer_megatron_core_is_named(tmp_path):
    """0.19 stores the common state inside the .distcp files (no common.pt); 0.16 cannot read it."""
    import importlib.metadata as md
    from packaging.version import Version
    if Version(md.version("megatron-core")) >= Version("0.17"):
        pytest.skip("only megatron-core < 0.17 lacks the reader for common state in .distcp")
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000003").mkdir(parents=True)
    (ckpt / "iter_0000003" / "__0_0.distcp").write_bytes(b"")
    (ckpt / "iter_0000003" / ".metadata").write_bytes(b"")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    msg = run_ranks(_load_expect_error, 1, SIX + ["--load", str(ckpt)])[0]
    assert msg and "saved by megatron-core >= 0.17" in msg


# ---- --ckpt-keep-last ---------------------------------------------------------------------------
def _iters(ckpt) -> list:
    return sorted(n for n in os.listdir(ckpt) if n.startswith("iter_"))


@pytest.mark.parametrize("keep", [1, 2])
def test_keep_last_deletes_older_checkpoints(tmp_path, keep):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000001.tmp").mkdir(parents=True)   # an interrupted save: not complete, never counted
    (ckpt / "iter_0000003").mkdir()                    # no .metadata: not complete either
    run(1, ["--save", str(ckpt), "--save-interval", "2", "--ckpt-keep-last", str(keep)])
    kept = {1: ["iter_0000006"], 2: ["iter_0000004", "iter_0000006"]}[keep]
    assert _iters(ckpt) == sorted(kept + ["iter_0000001.tmp", "iter_0000003"])
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == "6"


def test_keep_last_keeps_the_checkpoint_resumed_from(tmp_path):
    """The first run saves asynchronously: retention runs in the finalisation of each save, and
    --exit-interval waits for the last one."""
    ckpt = str(tmp_path / "ckpt")
    run(1, ["--save", ckpt, "--save-interval", "1", "--exit-interval", "3", "--ckpt-keep-last", "1", "--async-save"])
    assert _iters(ckpt) == ["iter_0000003"]
    resumed = run(1, ["--save", ckpt, "--load", ckpt, "--save-interval", "1", "--ckpt-keep-last", "1"])
    assert resumed["resumed_from"].endswith("iter_0000003") and sorted(resumed["losses"]) == [4, 5, 6]
    assert _iters(ckpt) == ["iter_0000003", "iter_0000006"]   # 4 and 5 went; 3 is what this run loaded


def test_prune_checkpoints_rules(tmp_path):
    """The retention rule itself (no ranks): complete = final name + .metadata; never the saved one, a
    loaded one or a later iteration; a doomed folder never stays under its checkpoint name."""
    from megatron_rpt.checkpoint import layout as ck

    for it in (1, 2, 3, 5, 7):
        (tmp_path / f"iter_{it:07d}").mkdir()
        (tmp_path / f"iter_{it:07d}" / ".metadata").write_bytes(b"")
    (tmp_path / "iter_0000004.tmp").mkdir()
    ck._LOADED_FROM.add(os.path.realpath(tmp_path / "iter_0000001"))
    try:
        deleted = ck.prune_checkpoints(str(tmp_path), 2, saved_iteration=5)
    finally:
        ck._LOADED_FROM.discard(os.path.realpath(tmp_path / "iter_0000001"))
    assert sorted(os.path.basename(p) for p in deleted) == ["iter_0000002"]
    assert _iters(tmp_path) == ["iter_0000001", "iter_0000003", "iter_0000004.tmp", "iter_0000005", "iter_0000007"]
    assert ck.prune_checkpoints(str(tmp_path), 1, saved_iteration=5) == [str(tmp_path / "iter_0000001"),
                                                                        str(tmp_path / "iter_0000003")]
    assert ck.prune_checkpoints(str(tmp_path), 1, saved_iteration=5) == []
    with pytest.raises(ValueError, match="keep_last"):
        ck.prune_checkpoints(str(tmp_path), 0, saved_iteration=5)
