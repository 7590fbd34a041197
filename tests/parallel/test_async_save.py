"""--async-save: the background writer saves exactly what a synchronous save writes, training goes on
while it writes, the checkpoint is published (tracker) only once complete, and a run resumed from an
async checkpoint continues bit-identically (2 gloo ranks, distributed optimizer)."""

import os

from tests.dist_harness import run_ranks
from tests.parallel.test_checkpoint_resume import SIX, run

LAYOUT = ["--use-distributed-optimizer"]
WRITER_DELAY_S = 1.0


def _slow_writer_run(rank, world, argv):
    """pretrain with a writer process that sleeps before writing (patched before it is forked), and a
    record, per iteration, of the async saves pending and of the tracker when the iteration starts."""
    import time

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from megatron_rpt.checkpoint.layout import read_tracker
    from megatron_rpt.checkpoint.sharded import pending_async_saves
    from megatron_rpt.training import step
    from tests.parallel.test_training_parity import _pretrain

    functions = FileSystemWriterAsync.get_save_function_and_args   # (write, preload, args) of a writer

    def slow(self):
        write, preload, args = functions(self)
        if write is None:
            return write, preload, args

        def slow_write(*a, **kw):
            time.sleep(WRITER_DELAY_S)   # in the forked writer: the trainer must not wait for this
            return write(*a, **kw)
        return slow_write, preload, args

    FileSystemWriterAsync.get_save_function_and_args = slow
    save = argv[argv.index("--save") + 1]
    seen, real = {}, step.train_step

    def train_step(*a, **kw):
        seen[len(seen) + 1] = (pending_async_saves(), read_tracker(save))
        return real(*a, **kw)

    step.train_step = train_step
    out = _pretrain(rank, world, argv)
    out["seen"] = seen
    return out


def _compare(rank, world, a, b):
    """Every tensor of checkpoint folders `a` and `b` bit-equal, and their common states equal but for
    the run configuration (which records --async-save)."""
    import numpy as np
    import torch
    from megatron.core import dist_checkpointing

    def same(x, y):
        if torch.is_tensor(x) or torch.is_tensor(y):
            return torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(map(same, x, y))
        if isinstance(x, np.ndarray):
            return isinstance(y, np.ndarray) and np.array_equal(x, y)
        return x == y

    def everything(path):   # every entry of the DCP files, as written (tensors and pickled objects)
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
        sd: dict = {}
        _load_state_dict(sd, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        return sd

    ta, tb = everything(a), everything(b)
    assert ta.keys() == tb.keys(), (sorted(ta), sorted(tb))
    # megatron-core >= 0.17 keeps the common state in the .distcp files too: compared below, less the flags
    unequal = sorted(k for k in ta if not k.startswith("common_state") and not same(ta[k], tb[k]))
    ca, cb = dist_checkpointing.load_common_state_dict(a), dist_checkpointing.load_common_state_dict(b)
    for c in (ca, cb):
        c.pop("run_config")      # records --async-save
        c.pop("args", None)      # likewise
    assert ca.keys() == cb.keys()
    n_model = sum(k.startswith(("decoder.", "embedding.")) for k in ta)
    n_optim = sum(k.startswith("optimizer.state.exp_avg") for k in ta)
    return unequal, sorted(k for k in ca if not same(ca[k], cb[k])), n_model, n_optim, any("rng_state" in k for k in ta)


def test_async_save_is_exact_and_training_goes_on(tmp_path):
    sync, asyn = str(tmp_path / "sync"), str(tmp_path / "async")
    straight = run(2, LAYOUT + ["--save", sync, "--save-interval", "2"])
    first = run_ranks(_slow_writer_run, 2, SIX + LAYOUT + ["--save", asyn, "--save-interval", "2", "--async-save"],
                      timeout=240)[0]
    # Iteration 3 ran while iteration 2's writer was still sleeping: pending, tracker not written yet.
    assert first["seen"][3] == (1, None), first["seen"]
    # The save of 4 waited for 2's publication; the end of the run waited for 6's.
    assert first["seen"][5][1] in (2, 4) and open(os.path.join(asyn, "latest_checkpointed_iteration.txt")).read() == "6"
    assert sorted(n for n in os.listdir(asyn) if n.startswith("iter_")) == ["iter_0000002", "iter_0000004",
                                                                            "iter_0000006"]
    assert first["losses"] == straight["losses"]
    for it in ("iter_0000002", "iter_0000006"):
        unequal, common_diff, n_model, n_optim, rng = run_ranks(_compare, 1, os.path.join(sync, it),
                                                                os.path.join(asyn, it))[0]
        assert unequal == [] and common_diff == [], (it, unequal, common_diff)
        assert n_model >= 10 and n_optim >= 10 and rng, (n_model, n_optim, rng)   # what was compared
    resumed = run(2, LAYOUT + ["--load", asyn, "--ckpt-step", "2", "--async-save", "--save", asyn,
                               "--save-interval", "100"])
    assert resumed["resumed_from"].endswith("iter_0000002") and sorted(resumed["losses"]) == [3, 4, 5, 6]
    assert {k: resumed["losses"][k] for k in (3, 4, 5, 6)} == {k: straight["losses"][k] for k in (3, 4, 5, 6)}
