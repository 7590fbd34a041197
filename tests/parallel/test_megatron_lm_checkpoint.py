"""Megatron-LM checkpoint compatibility (docs/megatron-lm-checkpoints.md).

Megatron-LM cannot run here, so `_save_like_megatron_lm` writes a torch_dist checkpoint with exactly the
structure Megatron-LM's `save_checkpoint` (megatron/training/checkpointing.py) gives one of
pretrain_gpt.py with --use-distributed-optimizer: each key below names its source. Written from a run of
ours at iteration 3, it must resume bit-identically (model, distributed-optimizer state in Megatron-LM's
default `dp_reshardable` layout, scheduler, RNG in its layout, data position from its `args`), and
--finetune from it must train exactly like --finetune from our own checkpoint of the same state. Our
checkpoint's common state is checked field by field against what Megatron-LM's loader reads.
"""

import os

from tests.dist_harness import forked, run_ranks
from tests.parallel.test_checkpoint_resume import SIX, run

LAYOUT = ["--use-distributed-optimizer"]
FLOPS = 1.25e12


def _save_like_megatron_lm(root, iteration, state, cfg, *, consumed_train_samples, consumed_valid_samples, **_):
    """Megatron-LM's save_checkpoint for --ckpt-format torch_dist (mirror HEAD), key by key."""
    import argparse
    import random

    import numpy as np
    import torch
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    from megatron_rpt.models.gpt import unwrap

    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    # _build_sharded_state_dict_metadata, without --dist-ckpt-optim-fully-reshardable
    metadata = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                "chained_optim_avoid_prefix": True, "dp_cp_group": dp_cp}
    m, p, t = cfg.model, cfg.parallel, cfg.training
    sd = {
        # generate_state_dict: state_dict['args'] = args (the parsed Namespace; these are the fields
        # its load_checkpoint / check_checkpoint_args / load_args_from_checkpoint read)
        "args": argparse.Namespace(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
            num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
            max_position_embeddings=m.max_position_embeddings, seq_length=m.seq_length,
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size, world_size=2, data_parallel_size=2,
            use_distributed_optimizer=True, global_batch_size=t.global_batch_size, ckpt_format="torch_dist",
            consumed_train_samples=consumed_train_samples, consumed_valid_samples=consumed_valid_samples,
            skipped_train_samples=0, add_position_embedding=True, padded_vocab_size=256,
            params_dtype=torch.float32),
        "checkpoint_version": 3.0,                     # generate_state_dict
        "iteration": iteration,                        # generate_state_dict
        "model": unwrap(state.model[0]).sharded_state_dict(metadata=metadata),   # model_sd_kwargs
        "opt_param_scheduler": state.scheduler.state_dict(),
        # get_rng_state(ckpt_format='torch_dist'): a one-element list (no --data-parallel-random-init)
        "rng_state": ShardedObject(
            "rng_state", [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                           "torch_rng_state": torch.get_rng_state(),
                           "cuda_rng_state": torch.get_rng_state(),   # CPU: the "CUDA" generator is the CPU one
                           "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}],
            (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size()),
            (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
            replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True)),
        # save_checkpoint, after generate_state_dict
        "num_floating_point_operations_so_far": FLOPS,
        # no 'rerun_state_machine': RerunStateMachine.state_dict() is None in its default (disabled) mode
    }
    sd["optimizer"] = state.optimizer.sharded_state_dict(sd, metadata=metadata)   # optim_sd_kwargs
    path = os.path.join(root, f"iter_{iteration:07d}")   # get_checkpoint_name(return_base_dir=True)
    if torch.distributed.get_rank() == 0:
        os.makedirs(path)
    torch.distributed.barrier()
    # --ckpt-fully-parallel-save (default on) over the DP x CP group; content_metadata = the metadata
    # less the process group (_clean_metadata_for_serialization)
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), dp_cp)
    dist_checkpointing.save(sd, path, strategy,
                            content_metadata={k: v for k, v in metadata.items() if k != "dp_cp_group"})
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:             # iter_finalize_fn
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    return path


def _pretrain_saving_like_megatron_lm(rank, world, argv):
    from megatron_rpt.training import checkpointing
    from tests.parallel.test_training_parity import _pretrain

    checkpointing.save_checkpoint = _save_like_megatron_lm   # driver.save imports it at call time
    return _pretrain(rank, world, argv)


def _common_state(rank, world, path):
    """What Megatron-LM's load_checkpoint reads of our checkpoint's common state."""
    import argparse

    from megatron.core import dist_checkpointing

    from megatron_rpt.config.schema import RunConfig
    from megatron_rpt.models.flops import training_flops_per_token

    common = dist_checkpointing.load_common_state_dict(path)
    args = common["args"]
    assert isinstance(args, argparse.Namespace)
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(path).read_metadata().state_dict_metadata
    return {
        "checkpoint_version": common["checkpoint_version"], "iteration": common["iteration"],
        "content_metadata": dist_checkpointing.load_content_metadata(preloaded_state_dict=common),
        "args": {k: getattr(args, k, None) for k in (
            "num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
            "max_position_embeddings", "make_vocab_size_divisible_by", "tokenizer_type",
            "tensor_model_parallel_size", "pipeline_model_parallel_size", "world_size", "data_parallel_size",
            "consumed_train_samples", "consumed_valid_samples", "padded_vocab_size", "ckpt_format",
            "no_save_optim", "no_save_rng", "use_distributed_optimizer", "swiglu", "normalization")},
        "scheduler": sorted(common["opt_param_scheduler"]),
        "flops": common["num_floating_point_operations_so_far"],
        "rng_key": sorted(k for k in keys if k.startswith("rng_state")),
        "norm_keys": sorted(k for k in keys if k.startswith("decoder.") and "norm" in k and "_extra_state" not in k),
        # Megatron-LM's total: sum over iterations of num_floating_point_operations(args, batch), i.e.
        # samples x seq length x training FLOPs per token at a fixed batch size
        "expected_flops": 24 * 32 * training_flops_per_token(RunConfig.from_dict(common["run_config"]).model, 256),
    }


def test_megatron_lm_checkpoint_resumes_and_finetunes_like_ours(tmp_path):
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    straight = run(2, LAYOUT + ["--save", ours, "--save-interval", "3"])
    first = run_ranks(_pretrain_saving_like_megatron_lm, 2,
                      SIX + LAYOUT + ["--save", theirs, "--save-interval", "3", "--exit-interval", "3"], timeout=240)[0]
    assert first["losses"] == {k: v for k, v in straight["losses"].items() if k <= 3}
    assert sorted(os.listdir(os.path.join(theirs, "iter_0000003"))) == [
        ".metadata", "__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp", "common.pt", "metadata.json"] \
        or "common.pt" not in os.listdir(os.path.join(ours, "iter_0000003"))   # >= 0.17: common state in .distcp

    resumed = run(2, LAYOUT + ["--load", theirs])
    assert resumed["resumed_from"].endswith("iter_0000003") and sorted(resumed["losses"]) == [4, 5, 6]
    assert {k: resumed["losses"][k] for k in (4, 5, 6)} == {k: straight["losses"][k] for k in (4, 5, 6)}

    tune = ["--finetune", "--train-iters", "2"]
    from_theirs = run(1, tune + ["--load", theirs])
    from_ours = run(1, tune + ["--load", ours, "--ckpt-step", "3"])
    assert from_theirs["resumed_from"].endswith("iter_0000003") and sorted(from_theirs["losses"]) == [1, 2]
    assert from_theirs["losses"] == from_ours["losses"]

    # Ours, as Megatron-LM's loader reads it.
    got = run_ranks(_common_state, 1, os.path.join(ours, "iter_0000003"))[0]
    assert got["checkpoint_version"] == 3.0 and got["iteration"] == 3   # < 2.0 would reorder QKV there
    assert got["content_metadata"] == {"distrib_optim_sharding_type": "fully_reshardable",
                                       "distrib_optim_fully_reshardable_mem_efficient": False,
                                       "singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    assert got["args"] == {
        "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "add_position_embedding": True,
        "max_position_embeddings": 32, "make_vocab_size_divisible_by": 128, "tokenizer_type": "NullTokenizer",
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "world_size": 2,
        "data_parallel_size": 2, "consumed_train_samples": 24, "consumed_valid_samples": 0,
        "padded_vocab_size": 256, "ckpt_format": "torch_dist", "no_save_optim": False, "no_save_rng": False,
        "use_distributed_optimizer": True, "swiglu": True, "normalization": "RMSNorm"}
    assert {"max_lr", "min_lr", "num_steps", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style"} <= set(
        got["scheduler"])   # OptimizerParamScheduler.state_dict(), what load_state_dict reads
    assert got["flops"] == got["expected_flops"] > 0
    assert got["rng_key"] == ["rng_state/shard_0.0_1.1"]   # one object per (PP, TP) rank
    # Local layer specs write Transformer Engine's keys (Megatron-Core's sharded_state_dict_keys_map):
    # the norms fused into TE's linear layers, QK-norm and the final norm.
    assert got["norm_keys"] == ["decoder.final_layernorm.weight", "decoder.layers.mlp.linear_fc1.layer_norm_weight",
                                "decoder.layers.self_attention.k_layernorm.weight",
                                "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                                "decoder.layers.self_attention.q_layernorm.weight"], got["norm_keys"]


@forked
def test_rng_state_layouts():
    """RNG states restore from Megatron-LM's layout (what we write) and from our older dict layout
    (checkpoints written before it); CUDA generator states on CPU are refused and change nothing."""
    import copy
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    from megatron_rpt.training.checkpointing import _rng_state, _set_rng_state

    tensor_parallel.get_cuda_rng_tracker().add("test-stream", 7)
    saved = _rng_state()
    assert isinstance(saved, list) and sorted(saved[0]) == ["np_rng_state", "random_rng_state",
                                                           "rng_tracker_states", "torch_rng_state"]

    def draw():
        with tensor_parallel.get_cuda_rng_tracker().fork("test-stream"):
            tracked = torch.rand(1).item()
        return random.random(), float(np.random.rand()), torch.rand(1).item(), tracked

    expected = draw()
    # (deep copies: Megatron-Core's tracker keeps the dict it is given and replaces its entries)
    assert _set_rng_state(copy.deepcopy(saved)) is None and draw() == expected
    old = {"random": saved[0]["random_rng_state"], "numpy": saved[0]["np_rng_state"],
           "torch": saved[0]["torch_rng_state"], "tracker": saved[0]["rng_tracker_states"]}
    assert _set_rng_state(copy.deepcopy(old)) is None and draw() == expected
    cuda_states = [dict(saved[0], rng_tracker_states={"test-stream": torch.zeros(16, dtype=torch.uint8)})]
    before = random.getstate()
    assert "another platform" in _set_rng_state(cuda_states) and random.getstate() == before


def test_optimizer_layout_that_cannot_reshard_is_refused():
    """Megatron-LM's default optimizer layout (`dp_reshardable`) into another TP/PP: one error naming
    the checkpoint and the ways out; the same layout, or a reshardable one, is read as saved."""
    import pytest

    from megatron_rpt.checkpoint.layout import CheckpointError
    from megatron_rpt.training.checkpointing import _saved_metadata

    theirs = {"content_metadata": {"distrib_optim_sharding_type": "dp_reshardable", "chained_optim_avoid_prefix": True}}
    with pytest.raises(CheckpointError, match=r"CKPT/iter_0000003: .*'dp_reshardable'.*--no-load-optim"):
        _saved_metadata(theirs, "CKPT/iter_0000003", resharding=True)
    assert _saved_metadata(theirs, "P", resharding=False) == theirs["content_metadata"]
    ours = {"content_metadata": {"distrib_optim_sharding_type": "fully_reshardable"}}
    assert _saved_metadata(ours, "P", resharding=True) == ours["content_metadata"]
    assert _saved_metadata({}, "P", resharding=True) == {}   # ours before content_metadata
