"""Job set-up shared by every entry point that trains a model (pretraining, RPT).

`setup_job(cfg)` does, in this order: platform (and on CPU the Megatron-Core compatibility layer,
before any Megatron-Core import), launcher environment, validation (before any process group, so
a bad launch fails fast with one message), process groups and parallel state, threads, seeds,
tokenizer, padded vocabulary, Megatron-Core timers (`training.timers`), model chunks wrapped in DDP,
optimizer and scheduler; then it prints
the run banner. What the caller does with the model (pretraining data, RPT rollouts) is its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from megatron_rpt.config.schedule import schedule_summary
from megatron_rpt.config.schema import RunConfig
from megatron_rpt.config.validation import validate_platform
from megatron_rpt.validate import validate_config
from megatron_rpt.platform import Platform, setup_platform


@dataclass
class Job:
    platform: Platform
    env: Any                   # distributed.DistEnv
    device: torch.device
    tokenizer: Any             # data.tokenizers.Tokenizer
    vocab_size: int            # padded model vocabulary
    state: Any                 # training.optimizer.TrainState
    flops_per_token: float     # training FLOPs per token (models.flops)


def setup_job(cfg: RunConfig, *, validate: Optional[Callable[[RunConfig, int], Any]] = None,
              check_data: bool = True) -> Job:
    """Everything up to a trainable model (see the module docstring). `validate(cfg, world_size)`
    replaces `validate_config`; `check_data` checks the pretraining data's token ids against the
    tokenizer."""
    platform = setup_platform(force_cpu=cfg.training.use_cpu)
    from megatron.core import parallel_state

    from megatron_rpt import distributed as dist
    from megatron_rpt.data.datasets import check_data_vocabulary
    from megatron_rpt.data.tokenizers import tokenizer_from_config
    from megatron_rpt.models.flops import count_parameters, training_flops_per_token
    from megatron_rpt.models.gpt import build_model_chunks, num_virtual_stages, run_vocab_size, transformer_config
    from megatron_rpt.training.optimizer import setup_model_and_optimizer
    from megatron_rpt.training.timers import make_timers

    p, m = cfg.parallel, cfg.model
    env = dist.resolve_dist_env()
    (validate or validate_config)(cfg, env.world_size)
    # The device is only asked about when the run needs something of it (CUDA stays untouched otherwise).
    validate_platform(cfg, platform, platform.gpu(env.local_rank) if cfg.fp8.fp8_format else None)
    vp = num_virtual_stages(cfg)
    env = dist.init_distributed(
        backend=platform.backend, device_type=platform.device_type,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vp, context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        timeout_minutes=p.distributed_timeout_minutes)
    device = platform.device(env.local_rank)
    threads = platform.cpu_threads(env.local_world_size)
    if threads is not None:
        torch.set_num_threads(threads)
    dist.set_random_seed(cfg.training.seed)

    tokenizer = tokenizer_from_config(cfg)
    if check_data:
        # Data written with another tokenizer fails here, before the model is built or loaded.
        check_data_vocabulary(cfg, tokenizer)
    vocab = run_vocab_size(tokenizer.vocab_size, cfg)
    config = transformer_config(cfg, platform)
    # Megatron-Core's schedules, grad finalisation and optimizers time themselves on config.timers.
    config.timers = make_timers(cfg.logging)
    config.barrier_with_L1_time = cfg.logging.barrier_with_L1_time
    chunks = build_model_chunks(cfg, platform, vocab, device, config)
    state = setup_model_and_optimizer(chunks, cfg, config)

    params = count_parameters(m, vocab)
    flops_per_token = training_flops_per_token(m, vocab)
    dist.print_rank_0(
        f"> world size {env.world_size} (launcher {env.launcher}): TP={p.tensor_model_parallel_size} "
        f"PP={p.pipeline_model_parallel_size} DP={parallel_state.get_data_parallel_world_size()}"
        f"{' VPP=' + str(vp) if vp else ''}\n"
        f"> model: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads}/"
        f"{m.num_query_groups}, vocab {vocab} (padded from {tokenizer.vocab_size}); parameters "
        f"{params.total / 1e6:.2f}M ({params.non_embedding / 1e6:.2f}M non-embedding"
        + (f"; active {params.active / 1e6:.2f}M, {params.active_non_embedding / 1e6:.2f}M non-embedding"
           if params.active != params.total else "") + "); "
        f"{flops_per_token / 1e9:.3f} GFLOP per trained token\n"
        f"> architecture: {m.describe()}"
        + (f"\n> schedule: {cfg.training.train_iters} iterations{schedule_summary(cfg)}"
           if cfg.training.train_samples is not None else ""))
    return Job(platform=platform, env=env, device=device, tokenizer=tokenizer, vocab_size=vocab, state=state,
               flops_per_token=flops_per_token)
