"""Checks of a `RunConfig`'s flags against each other and the world size (`check_config`,
`check_rpt_config`), the hardware check (`validate_platform`), and values derived from the flags.

Every problem becomes one line naming the flag(s) and what to do; `megatron_rpt.validate` gathers
these with the loss's and the data's checks into a single `ConfigError`, so a user fixes a launch
script in one pass. This package imports no other part of megatron_rpt but the platform.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from typing import Optional

from megatron_rpt.config.schedule import batch_schedule, iterations_for_samples, lr_schedule, parse_step_schedule
from megatron_rpt.config.schema import RunConfig


class ConfigError(ValueError):
    """Invalid configuration; `problems` holds one message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def _complete_defaults(cfg: RunConfig, world_size: int) -> None:
    """Derived values Megatron-LM also derives (filled in place, only where unset)."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    if m.group_query_attention and m.num_query_groups is None:
        m.num_query_groups = 1   # Megatron-LM's default of --num-query-groups
    elif not m.group_query_attention and m.num_query_groups is None:
        m.num_query_groups = m.num_attention_heads
    if m.ffn_hidden_size is None and m.hidden_size:
        # Megatron-LM: 4h, or with SwiGLU 2/3 of that (two input projections) rounded down to 64.
        m.ffn_hidden_size = int(4 * m.hidden_size * 2 / 3 / 64) * 64 if m.swiglu else 4 * m.hidden_size
    if m.kv_channels is None and m.hidden_size and m.num_attention_heads:
        m.kv_channels = m.hidden_size // m.num_attention_heads
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    dp = world_size // model_parallel if model_parallel and world_size % model_parallel == 0 else None
    if t.global_batch_size is None and t.step_batch_size_schedule:
        with contextlib.suppress(ValueError, TypeError):   # a bad schedule is reported by _check_schedule
            t.global_batch_size = parse_step_schedule(t.step_batch_size_schedule, m.seq_length).final
    if t.global_batch_size is None and dp:
        t.global_batch_size = t.micro_batch_size * dp
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        warnings.warn("--sequence-parallel has no effect with --tensor-model-parallel-size 1; disabled")
        p.sequence_parallel = False


def _check_schedule(cfg: RunConfig, dp: Optional[int]) -> list[str]:
    """Iteration- vs sample-based schedule flags (exclusive, as in Megatron-LM), --rampup-batch-size, and the
    resolution of --train-iters from --train-samples (once, here; `config.schedule` has the rules). Filled
    in place: --lr-decay-iters (default --train-iters) or --train-iters; idempotent, so a configuration
    may be validated twice."""
    t, o = cfg.training, cfg.optimizer
    problems: list[str] = []
    iteration_flags = [f for f, given in (("--lr-decay-iters", o.lr_decay_iters is not None),
                                          ("--lr-warmup-iters", o.lr_warmup_iters != 0),
                                          ("--lr-wsd-decay-iters", o.lr_wsd_decay_iters is not None)) if given]
    sample_flags = [f for f, given in (("--lr-decay-samples", o.lr_decay_samples is not None),
                                       ("--lr-warmup-samples", o.lr_warmup_samples != 0),
                                       ("--lr-wsd-decay-samples", o.lr_wsd_decay_samples is not None)) if given]
    warmups = [f for f in ("--lr-warmup-iters", "--lr-warmup-samples") if f in iteration_flags + sample_flags]
    if o.lr_warmup_fraction is not None:
        if warmups:
            problems.append(f"--lr-warmup-fraction and {warmups[0]} are exclusive (one warmup, as in Megatron-LM)")
        if not 0.0 <= o.lr_warmup_fraction < 1.0:
            problems.append(f"--lr-warmup-fraction must be in [0, 1) (got {o.lr_warmup_fraction})")
    ramp = t.rampup_batch_size
    steps = None
    if t.step_batch_size_schedule:
        try:
            steps = parse_step_schedule(t.step_batch_size_schedule, cfg.model.seq_length or 1)
        except ValueError as e:
            problems.append(str(e))
        if ramp:
            problems.append("--step-batch-size-schedule and --rampup-batch-size are exclusive (one batch schedule)")
    if steps is not None:
        flag = f"--step-batch-size-schedule {t.step_batch_size_schedule!r}"
        if t.global_batch_size != steps.final:
            # Megatron-LM refuses the two flags together; equal values are accepted here (its GPT-3 example)
            problems.append(f"{flag} ends at global batch {steps.final} but --global-batch-size is "
                            f"{t.global_batch_size}; drop --global-batch-size (the schedule's last batch is it)")
        unit = t.micro_batch_size * dp if dp else None
        for threshold, batch in steps.steps:
            if unit and batch % unit:
                problems.append(f"{flag}: batch {batch} (from sample {threshold}) is not divisible by "
                                f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}")
            elif unit and cfg.parallel.num_layers_per_virtual_pipeline_stage is not None and \
                    (batch // unit) % cfg.parallel.pipeline_model_parallel_size:
                problems.append(f"{flag}: batch {batch} gives {batch // unit} micro-batches; the interleaved "
                                "schedule needs a multiple of --pipeline-model-parallel-size "
                                f"{cfg.parallel.pipeline_model_parallel_size}")
    if t.train_samples is None:
        for flag in sample_flags:
            problems.append(f"{flag} is for sample-based training (--train-samples); with --train-iters give "
                            f"{flag.replace('-samples', '-iters')}")
        if ramp:
            problems.append("--rampup-batch-size needs sample-based training (--train-samples instead of "
                            "--train-iters), as in Megatron-LM")
        if o.lr_decay_iters is None:
            o.lr_decay_iters = t.train_iters
        return problems
    for flag in iteration_flags:
        problems.append(f"{flag} is for iteration-based training; with --train-samples give "
                        f"{flag.replace('-iters', '-samples')}")
    if t.train_samples < 1:
        return problems + [f"--train-samples must be >= 1 (got {t.train_samples})"]
    gbs, ramp_cfg = t.global_batch_size, None
    if ramp:
        if len(ramp) != 3:
            return problems + [f"--rampup-batch-size takes START INCR SAMPLES (got {ramp})"]
        start, incr, samples = (int(x) for x in ramp)
        if start < 1 or incr < 1 or samples < 0:
            problems.append(f"--rampup-batch-size {start} {incr} {samples}: START and INCR must be >= 1, SAMPLES >= 0")
        elif gbs is not None and (start >= gbs or (gbs - start) % incr):
            problems.append(f"--rampup-batch-size {start} {incr} {samples}: START must be below --global-batch-size "
                            f"{gbs} and the difference a multiple of INCR")
        else:
            ramp_cfg = ramp
            if dp is not None and (start % (t.micro_batch_size * dp) or incr % (t.micro_batch_size * dp)):
                problems.append(f"--rampup-batch-size {start} {incr} {samples}: every global batch of the ramp must be "
                                f"divisible by --micro-batch-size {t.micro_batch_size} x data-parallel size {dp} "
                                "(START and INCR multiples of it)")
            elif dp is not None and cfg.parallel.num_layers_per_virtual_pipeline_stage is not None and any(
                    (n // (t.micro_batch_size * dp)) % cfg.parallel.pipeline_model_parallel_size for n in (start, incr)):
                problems.append(f"--rampup-batch-size {start} {incr} {samples}: the interleaved schedule needs every "
                                "step's micro-batch count divisible by --pipeline-model-parallel-size "
                                f"{cfg.parallel.pipeline_model_parallel_size} (START and INCR / (micro batch x DP))")
    if gbs is not None and (not ramp or ramp_cfg) and not (t.step_batch_size_schedule and steps is None):
        iterations = iterations_for_samples(t.train_samples, gbs, batch_schedule(cfg))
        if t.train_iters is not None and t.train_iters != iterations:   # (equal: resolved here before)
            problems.append("--train-iters and --train-samples are exclusive (iteration- or sample-based training, "
                            "as in Megatron-LM)")
        elif iterations < 1:
            problems.append(f"--train-samples {t.train_samples} is less than one global batch ({gbs})")
        else:
            t.train_iters = iterations
    return problems


def _check_lr_schedule(cfg: RunConfig) -> list[str]:
    """What Megatron-Core's OptimizerParamScheduler asserts (as messages naming the flags), on the schedule
    in samples (`config.schedule.lr_schedule`), and the --decoupled-lr and resume-mode flags."""
    o, t = cfg.optimizer, cfg.training
    if t.global_batch_size is None or t.train_iters is None:
        return []
    unit = "samples" if t.train_samples is not None else "iters"
    sched = lr_schedule(cfg)
    problems: list[str] = []
    if sched.decay < 1:
        problems.append(f"--lr-decay-{unit} must be >= 1 (default --train-{unit})")
    elif sched.warmup > 0 and sched.warmup >= sched.decay:
        # Megatron-Core's scheduler asserts warmup < decay (a bare AssertionError otherwise).
        if unit == "iters" and o.lr_warmup_fraction is None:
            problems.append(f"--lr-warmup-iters {o.lr_warmup_iters} must be smaller than the decay iterations "
                            f"{o.lr_decay_iters} (--lr-decay-iters, default --train-iters)")
        else:
            warmup = "--lr-warmup-fraction" if o.lr_warmup_fraction is not None else "--lr-warmup-samples"
            problems.append(f"{warmup}: a warmup of {sched.warmup:g} samples must be shorter than the decay "
                            f"({sched.decay} samples, --lr-decay-{unit})")
    if o.lr_decay_style == "WSD":
        if sched.wsd_decay is None:
            problems.append(f"--lr-decay-style WSD needs --lr-wsd-decay-{unit}")
        elif sched.wsd_decay > sched.decay - sched.warmup:
            if unit == "iters" and o.lr_warmup_fraction is None:
                problems.append(f"--lr-wsd-decay-iters {o.lr_wsd_decay_iters} is longer than the "
                                f"post-warmup schedule ({o.lr_decay_iters - o.lr_warmup_iters} iterations)")
            else:
                problems.append(f"--lr-wsd-decay-{unit}: the WSD decay ({sched.wsd_decay} samples) is longer than "
                                f"the post-warmup schedule ({sched.decay - sched.warmup:g} samples)")
    if o.decoupled_min_lr is not None and o.decoupled_lr is None:
        problems.append("--decoupled-min-lr needs --decoupled-lr")
    if o.decoupled_lr is not None:
        low = o.min_lr if o.decoupled_min_lr is None else o.decoupled_min_lr
        if low < 0 or o.decoupled_lr < low:
            problems.append(f"--decoupled-lr {o.decoupled_lr} must be >= its minimum ({low}, --decoupled-min-lr, "
                            "default --min-lr) >= 0")
    if o.override_opt_param_scheduler and o.use_checkpoint_opt_param_scheduler:
        problems.append("--override-opt-param-scheduler and --use-checkpoint-opt_param-scheduler are exclusive "
                        "(the command line's schedule or the checkpoint's)")
    return problems


def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                          * p.context_parallel_size)


_PATTERN = re.compile(r"[\[\]0-9,*+() ]+")


def moe_layer_pattern(m) -> Optional[list[int]]:
    """--moe-layer-freq as one 0/1 per layer (1: MoE layer), Megatron-LM's meaning: N -> every N-th
    layer from the first; "[1,0]*4" -> that list. None for a dense model; ValueError names the flag."""
    if not m.num_experts:
        return None
    text = str(m.moe_layer_freq).strip()
    if text.isdigit():
        n = int(text)
        if n < 1:
            raise ValueError(f"--moe-layer-freq {text} must be >= 1")
        return [1 if i % n == 0 else 0 for i in range(m.num_layers or 0)]
    if not _PATTERN.fullmatch(text):
        raise ValueError(f"--moe-layer-freq {text!r}: expected N or a list pattern such as \"[1,0]*4\"")
    try:
        pattern = eval(text, {"__builtins__": {}}, {})  # noqa: S307 - digits, brackets, , * + only
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--moe-layer-freq {text!r} is not a list pattern: {e}") from None
    if not isinstance(pattern, list) or any(x not in (0, 1) for x in pattern):
        raise ValueError(f"--moe-layer-freq {text!r} must give a list of 0/1")
    if m.num_layers is not None and len(pattern) != m.num_layers:
        raise ValueError(f"--moe-layer-freq {text!r} gives {len(pattern)} layers, --num-layers is {m.num_layers}")
    return pattern


def fp8_row_multiple(cfg: RunConfig) -> int:
    """What FP8 GEMM operands need their token count and per-rank weight dimensions divisible by:
    Transformer Engine asserts rows % 8 and columns % 16 for both operands (tokens are the inner
    dimension of the weight-gradient GEMM, hence 16 for them too); MXFP8 scales 1x32 blocks (32)."""
    return 32 if cfg.fp8.fp8_recipe == "mxfp8" else 16


def sequence_length_multiple(cfg: RunConfig) -> int:
    """What every micro-batch's sequence length must be a multiple of (variable-length steps pad to it):
    tokens per rank (FP8: `fp8_row_multiple`; else 8, tensor-core friendly) x TP under sequence
    parallelism x CP (each splits the sequence over its ranks)."""
    p = cfg.parallel
    per_rank = fp8_row_multiple(cfg) if cfg.fp8.fp8_format else 8
    return per_rank * (p.tensor_model_parallel_size if p.sequence_parallel else 1) * p.context_parallel_size


def _check_fp8(cfg: RunConfig) -> list[str]:
    """FP8 flags against each other and the model shape (the platform is checked by `validate_platform`)."""
    f, m, p, t = cfg.fp8, cfg.model, cfg.parallel, cfg.training
    out: list[str] = []
    if not f.fp8_format:
        for flag, on in (("--fp8-param-gather", f.fp8_param_gather),
                         ("--first-last-layers-bf16", f.first_last_layers_bf16)):
            if on:
                out.append(f"{flag} needs --fp8-format e4m3|hybrid")
        return out
    if not (t.bf16 or t.fp16):
        out.append(f"--fp8-format {f.fp8_format} needs --bf16 (or --fp16): FP8 covers the transformer layers' "
                   "GEMMs only; the rest runs in that dtype")
    if f.fp8_amax_history_len < 1:
        out.append(f"--fp8-amax-history-len must be >= 1 (got {f.fp8_amax_history_len})")
    if f.fp8_margin < 0:
        out.append(f"--fp8-margin must be >= 0 (got {f.fp8_margin})")
    if f.fp8_param_gather and not p.use_distributed_optimizer:
        out.append("--fp8-param-gather needs --use-distributed-optimizer (its fp32 main weights are the ones "
                   "updated; the FP8 copies are re-quantized from them)")
    if f.first_last_layers_bf16:
        if f.fp8_recipe == "delayed":
            out.append("--first-last-layers-bf16 does not work with --fp8-recipe delayed (Megatron-Core); "
                       "use tensorwise, blockwise or mxfp8")
        if m.num_layers is not None:
            per_stage = m.num_layers // p.pipeline_model_parallel_size
            for flag, n in (("--num-layers-at-start-in-bf16", f.num_layers_at_start_in_bf16),
                            ("--num-layers-at-end-in-bf16", f.num_layers_at_end_in_bf16)):
                if not 0 <= n <= per_stage:
                    out.append(f"{flag} {n} must be between 0 and the layers per pipeline stage ({per_stage})")
    # Transformer Engine asserts FP8 GEMM operands have rows % 8 and columns % 16 (tokens, and every
    # weight dimension on this TP rank); checked here so the run does not stop inside the first step.
    multiple, rows = sequence_length_multiple(cfg), fp8_row_multiple(cfg)
    if m.seq_length is not None and m.seq_length % multiple:
        out.append(f"--fp8-format: --seq-length {m.seq_length} must be a multiple of {multiple} ({rows} tokens per "
                   "rank" + (f" x TP {p.tensor_model_parallel_size} (--sequence-parallel)" if p.sequence_parallel
                             else "") + (f" x CP {p.context_parallel_size}" if p.context_parallel_size > 1 else "")
                   + ")")
    tp = p.tensor_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    d = m.kv_channels or (m.hidden_size // m.num_attention_heads if m.hidden_size and m.num_attention_heads else None)
    dims = [("--hidden-size", m.hidden_size, 1), ("--ffn-hidden-size", m.ffn_hidden_size, tp)]
    if d is not None and m.num_attention_heads:
        dims.append(("--num-attention-heads x --kv-channels", m.num_attention_heads * d, tp))
    if m.num_experts:
        dims.append(("--moe-ffn-hidden-size", m.moe_ffn_hidden_size or m.ffn_hidden_size, etp))
    for flag, size, split in dims:
        if size is not None and size % split == 0 and (size // split) % rows:
            out.append(f"--fp8-format: {flag} {size}" + (f" / TP {split}" if split > 1 else "") +
                       f" must be a multiple of {rows} (Transformer Engine's FP8 GEMM rule)")
    return out


def _check_moe(cfg: RunConfig, world_size: int) -> list[str]:
    """Expert parallelism and router flags (Megatron-Core would assert deep inside model building)."""
    m, p = cfg.model, cfg.parallel
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    problems: list[str] = []
    if ep < 1 or (etp is not None and etp < 1):
        return [f"--expert-model-parallel-size ({ep}) and --expert-tensor-parallel-size ({etp}) must be >= 1"]
    if not m.num_experts:
        if m.num_experts is not None:
            problems.append(f"--num-experts must be >= 1 (got {m.num_experts})")
        if ep > 1 or (etp is not None and etp != p.tensor_model_parallel_size):
            problems.append("--expert-model-parallel-size / --expert-tensor-parallel-size need --num-experts")
        return problems
    e, k = m.num_experts, m.moe_router_topk
    etp = etp or p.tensor_model_parallel_size
    if not 1 <= k <= e:
        problems.append(f"--moe-router-topk {k} must be between 1 and --num-experts {e}")
    if e % ep:
        problems.append(f"--num-experts {e} is not divisible by --expert-model-parallel-size {ep}")
    expert_mp = etp * ep * p.pipeline_model_parallel_size
    if world_size % expert_mp:
        problems.append(f"world size {world_size} is not divisible by --expert-tensor-parallel-size {etp} x "
                        f"--expert-model-parallel-size {ep} x --pipeline-model-parallel-size "
                        f"{p.pipeline_model_parallel_size} = {expert_mp}")
    if ep == 1 and etp != p.tensor_model_parallel_size:
        # Megatron-Core marks expert weights as expert-parallel (allreduce=False) only when EP > 1, so
        # at EP=1 their gradients would be reduced over the dense data-parallel group: silently wrong.
        problems.append(f"--expert-tensor-parallel-size {etp} differs from --tensor-model-parallel-size "
                        f"{p.tensor_model_parallel_size}; that needs --expert-model-parallel-size > 1")
    ffn = m.moe_ffn_hidden_size or m.ffn_hidden_size
    if ffn is not None and ffn % etp:
        problems.append(f"--moe-ffn-hidden-size {ffn} is not divisible by --expert-tensor-parallel-size {etp}")
    if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        problems.append("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (Megatron-Core)")
    if m.moe_router_enable_expert_bias and m.moe_router_score_function != "sigmoid":
        problems.append("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid")
    if m.moe_router_load_balancing_type == "none" and m.moe_aux_loss_coeff > 0:
        problems.append(f"--moe-aux-loss-coeff {m.moe_aux_loss_coeff} with --moe-router-load-balancing-type none: "
                        "pick a load-balancing type or set the coefficient to 0")
    if m.moe_router_bias_update_rate < 0 or m.moe_aux_loss_coeff < 0 or (m.moe_z_loss_coeff or 0) < 0:
        problems.append("--moe-router-bias-update-rate, --moe-aux-loss-coeff and --moe-z-loss-coeff must be >= 0")
    return problems


def _check_architecture(cfg: RunConfig) -> list[str]:
    """The architecture flags among themselves (Megatron-LM's checks, plus what it would accept and
    then build differently)."""
    m, out = cfg.model, []
    if not 0.0 < m.rotary_percent <= 1.0:
        out.append(f"--rotary-percent must be in (0, 1] (got {m.rotary_percent})")
    elif m.position_embedding_type == "rope" and m.kv_channels and int(m.kv_channels * m.rotary_percent) % 2:
        out.append(f"--rotary-percent {m.rotary_percent} of head dimension {m.kv_channels} rotates "
                   f"{int(m.kv_channels * m.rotary_percent)} dimensions; RoPE rotates pairs (an even number)")
    for flag, value in (("--attention-dropout", m.attention_dropout), ("--hidden-dropout", m.hidden_dropout)):
        if not 0.0 <= value < 1.0:
            out.append(f"{flag} must be in [0, 1) (got {value})")
    if not m.norm_epsilon > 0:
        out.append(f"--norm-epsilon must be > 0 (got {m.norm_epsilon})")
    if m.seq_length and m.max_position_embeddings and m.max_position_embeddings < m.seq_length:
        out.append(f"--max-position-embeddings {m.max_position_embeddings} < --seq-length {m.seq_length} "
                   "(Megatron-LM requires max positions >= sequence length)")
    try:
        moe_layer_pattern(m)
    except ValueError as e:
        out.append(str(e))
    if str(m.moe_layer_freq).strip() != "1" and not m.num_experts:
        out.append(f"--moe-layer-freq {m.moe_layer_freq} needs --num-experts (a dense model has no MoE layers)")
    shared = m.moe_shared_expert_intermediate_size
    if shared is not None:
        if not m.num_experts:
            out.append("--moe-shared-expert-intermediate-size needs --num-experts")
        if shared < 1 or shared % cfg.parallel.tensor_model_parallel_size:
            out.append(f"--moe-shared-expert-intermediate-size {shared} must be >= 1 and divisible by "
                       f"--tensor-model-parallel-size {cfg.parallel.tensor_model_parallel_size}")
    if m.num_experts and m.add_bias_linear and m.moe_grouped_gemm:
        out.append("--moe-grouped-gemm has no biases: add --disable-bias-linear (Megatron-Core's grouped experts "
                   "refuse linear biases)")
    return out


def _check_wandb(cfg: RunConfig) -> list[str]:
    """--wandb-project needs the wandb package (asked without importing it) and a local folder for the
    run's files: --wandb-save-dir, or SAVE/wandb as in Megatron-LM (which fails later without --save)."""
    lg = cfg.logging
    if not lg.wandb_project:
        return []
    from importlib.util import find_spec

    problems = []
    if find_spec("wandb") is None:
        problems.append(f"--wandb-project {lg.wandb_project}: the wandb package is not installed (pip install wandb, "
                        "or megatron-rpt[wandb]); drop --wandb-project to log to stdout/TensorBoard only")
    if not lg.wandb_save_dir and not cfg.checkpoint.save:
        problems.append("--wandb-project needs --wandb-save-dir DIR or --save DIR (the W&B run files go to "
                        "--wandb-save-dir, default SAVE/wandb)")
    return problems


def check_config(cfg: RunConfig, world_size: int) -> list[str]:
    """Fill derived defaults; one message per problem of the flags among themselves and against the
    world size (the loss's and the data's flags are checked by their packages: `megatron_rpt.validate`)."""
    _complete_defaults(cfg, world_size)
    m, p, t, o, c = cfg.model, cfg.parallel, cfg.training, cfg.optimizer, cfg.checkpoint
    problems: list[str] = []

    def need(value, flag: str) -> None:
        if value is None:
            problems.append(f"{flag} is required (or use --model-preset)" if flag in _SHAPE_FLAGS
                            else f"{flag} is required")

    for flag, value in (("--num-layers", m.num_layers), ("--hidden-size", m.hidden_size),
                        ("--num-attention-heads", m.num_attention_heads), ("--seq-length", m.seq_length),
                        ("--lr", o.lr)):
        need(value, flag)
    if t.train_iters is None and t.train_samples is None:
        problems.append("--train-iters is required (or --train-samples)")

    for flag, value in (("--tensor-model-parallel-size", p.tensor_model_parallel_size),
                        ("--pipeline-model-parallel-size", p.pipeline_model_parallel_size),
                        ("--context-parallel-size", p.context_parallel_size),
                        ("--micro-batch-size", t.micro_batch_size)):
        if value < 1:
            problems.append(f"{flag} must be >= 1 (got {value})")
    if problems and any("must be >= 1" in x for x in problems):
        raise ConfigError(problems)
    problems.extend(_check_architecture(cfg))
    if t.exit_duration_in_mins is not None and not t.exit_duration_in_mins > 0:
        problems.append(f"--exit-duration-in-mins must be > 0 (got {t.exit_duration_in_mins})")
    if t.exit_interval is not None and t.exit_interval < 1:
        problems.append(f"--exit-interval must be >= 1 (got {t.exit_interval})")
    if t.nonfinite_grad_skip_limit < 0:
        problems.append(f"--nonfinite-grad-skip-limit must be >= 0 (got {t.nonfinite_grad_skip_limit})")

    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    mp = tp * pp * cp
    if world_size % mp != 0:
        problems.append(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp} = {mp}; "
            f"launch a multiple of {mp} processes (torchrun --nproc-per-node / srun -n)")
    dp = world_size // mp if world_size % mp == 0 else None
    problems.extend(_check_schedule(cfg, dp))

    if m.num_attention_heads is not None:
        if m.num_attention_heads % tp:
            problems.append(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                            f"--tensor-model-parallel-size {tp}")
        if m.num_query_groups is not None:
            if m.num_attention_heads % m.num_query_groups:
                problems.append(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                                f"--num-query-groups {m.num_query_groups}")
            if m.num_query_groups % tp:
                problems.append(f"--num-query-groups {m.num_query_groups} is not divisible by "
                                f"--tensor-model-parallel-size {tp}")
        if not m.group_query_attention and m.num_query_groups != m.num_attention_heads:
            problems.append(f"--num-query-groups {m.num_query_groups} without --group-query-attention: Megatron-LM "
                            "ignores it and builds multi-head attention; add --group-query-attention (or drop "
                            "--num-query-groups)")
        if m.kv_channels is None and m.hidden_size and m.hidden_size % m.num_attention_heads:
            problems.append(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                            f"{m.num_attention_heads}; set --kv-channels")
    if m.ffn_hidden_size is not None and m.ffn_hidden_size % tp:
        problems.append(f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by "
                        f"--tensor-model-parallel-size {tp}")
    if m.num_layers is not None:
        if m.num_layers % pp:
            problems.append(f"--num-layers {m.num_layers} is not divisible by "
                            f"--pipeline-model-parallel-size {pp}")
        vl = p.num_layers_per_virtual_pipeline_stage
        if vl is not None:
            if pp < 2:
                problems.append("--num-layers-per-virtual-pipeline-stage needs "
                                "--pipeline-model-parallel-size >= 2")
            elif vl < 1 or m.num_layers % (pp * vl):
                problems.append(f"--num-layers {m.num_layers} is not divisible by "
                                f"--pipeline-model-parallel-size {pp} x "
                                f"--num-layers-per-virtual-pipeline-stage {vl}")
    if m.seq_length is not None and m.max_position_embeddings is not None \
            and m.seq_length > m.max_position_embeddings:
        problems.append(f"--seq-length {m.seq_length} exceeds --max-position-embeddings "
                        f"{m.max_position_embeddings}")
    if p.sequence_parallel and m.seq_length is not None and m.seq_length % tp:
        problems.append(f"--seq-length {m.seq_length} is not divisible by --tensor-model-parallel-size "
                        f"{tp} (needed by --sequence-parallel)")
    if cp > 1 and m.seq_length is not None and m.seq_length % (2 * cp):
        # training.context_parallel: each CP rank keeps 2 of 2 x CP equal chunks (Megatron-LM asserts the same).
        problems.append(f"--seq-length {m.seq_length} is not divisible by 2 x --context-parallel-size {cp} = "
                        f"{2 * cp} (each context-parallel rank keeps two of 2 x CP equal chunks)")

    if dp is not None and t.global_batch_size is not None:
        if t.global_batch_size % (t.micro_batch_size * dp):
            problems.append(f"--global-batch-size {t.global_batch_size} is not divisible by "
                            f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}")
        if p.num_layers_per_virtual_pipeline_stage is not None and \
                (t.global_batch_size // max(1, t.micro_batch_size * dp)) % pp:
            problems.append("the interleaved schedule needs the number of micro-batches "
                            f"(--global-batch-size / (--micro-batch-size x DP)) divisible by "
                            f"--pipeline-model-parallel-size {pp}")
    if t.bf16 and t.fp16:
        problems.append("--bf16 and --fp16 are mutually exclusive")
    if t.recompute_granularity == "full" and t.recompute_method is None:
        problems.append("--recompute-granularity full needs --recompute-method uniform|block")
    if t.train_iters is not None and t.train_iters < 1:
        problems.append(f"--train-iters must be >= 1 (got {t.train_iters})")
    if o.lr is not None and o.lr < 0 or o.min_lr < 0:
        problems.append("--lr and --min-lr must be >= 0")
    if o.lr is not None and o.min_lr > o.lr:
        problems.append(f"--min-lr {o.min_lr} exceeds --lr {o.lr}")
    problems.extend(_check_lr_schedule(cfg))
    if t.grad_reduce_in_bf16 and not t.bf16:
        # Megatron-LM: the flag only turns off fp32 accumulation/reduction under --bf16; fp32 and fp16 runs
        # keep their gradient dtype, so accepting it there would promise what does not happen.
        problems.append("--grad-reduce-in-bf16 needs --bf16 (gradients are reduced in the parameters' dtype "
                        "otherwise; fp32 runs reduce in fp32)")
    if not (0.0 <= o.adam_beta1 < 1.0 and 0.0 <= o.adam_beta2 < 1.0):
        problems.append("--adam-beta1/--adam-beta2 must be in [0, 1)")
    if o.clip_grad < 0:
        problems.append(f"--clip-grad must be >= 0 (got {o.clip_grad})")
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        problems.append("--overlap-param-gather needs --use-distributed-optimizer")
    if c.save_interval is not None and c.save is None:
        problems.append("--save-interval needs --save DIR")
    if c.save_interval is not None and c.save_interval < 1:
        problems.append(f"--save-interval must be >= 1 (got {c.save_interval})")
    if c.ckpt_keep_last is not None:
        if c.ckpt_keep_last < 1:
            problems.append(f"--ckpt-keep-last must be >= 1 (got {c.ckpt_keep_last}): the checkpoint just saved is "
                            "always kept; leave it unset to keep every checkpoint")
        if c.save is None:
            problems.append("--ckpt-keep-last needs --save DIR")
    if cfg.logging.log_interval < 1:
        problems.append(f"--log-interval must be >= 1 (got {cfg.logging.log_interval})")
    problems.extend(_check_wandb(cfg))
    problems.extend(_check_moe(cfg, world_size))
    problems.extend(_check_fp8(cfg))
    problems.extend(_check_runtime(cfg, world_size))
    return problems


def _check_runtime(cfg: RunConfig, world_size: int) -> list[str]:
    """Data-loader workers, manual garbage collection and the profiler's iteration range and ranks."""
    problems: list[str] = []
    if cfg.data.num_workers < 0:
        problems.append(f"--num-workers must be >= 0 (got {cfg.data.num_workers})")
    if cfg.training.manual_gc_interval < 0:
        problems.append(f"--manual-gc-interval must be >= 0 (got {cfg.training.manual_gc_interval}; 0: collect "
                        "only around evaluation)")
    pr = cfg.profiling
    if pr.profile:
        if pr.profile_step_start < 0:
            problems.append(f"--profile-step-start must be >= 0 (got {pr.profile_step_start})")
        if pr.profile_step_end <= pr.profile_step_start:
            problems.append(f"--profile-step-end {pr.profile_step_end} must be > --profile-step-start "
                            f"{pr.profile_step_start} (the profiled iterations are start + 1 .. end)")
        bad = [r for r in pr.profile_ranks if not 0 <= r < world_size]
        if bad:
            problems.append(f"--profile-ranks {' '.join(map(str, bad))}: no such rank (ranks are 0..{world_size - 1})")
    return problems


# Minimum CUDA compute capability of each FP8 recipe (TE: FP8 tensor cores from Ada/Hopper; the
# 1x128/128x128 block scaling on Hopper; MXFP8's hardware block scales from Blackwell).
FP8_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


def validate_platform(cfg: RunConfig, platform, gpu=None) -> None:
    """What this run asks of the hardware, against the chosen `platform.Platform` and this rank's
    `platform.GPUInfo` (None: not known); `ConfigError` otherwise."""
    problems: list[str] = []
    cp = cfg.parallel.context_parallel_size
    if cp > 1 and not platform.transformer_engine:
        # Context parallelism lives in Transformer Engine's attention only: Megatron-Core's local
        # DotProductAttention (the CPU / no-TE layer spec) asserts context_parallel_size == 1.
        where = (f"a {platform.device_type} run{' (--use-cpu)' if cfg.training.use_cpu else ''}"
                 if platform.device_type != "cuda" else
                 "CUDA, but Transformer Engine does not import (pip install transformer-engine[pytorch])")
        problems.append(f"--context-parallel-size {cp} needs Transformer Engine's attention (TEDotProductAttention; "
                        f"Megatron-Core's local attention has no context parallelism); this platform has none "
                        f"({where}): use --context-parallel-size 1")
    f = cfg.fp8
    if f.fp8_format:
        flag = f"--fp8-format {f.fp8_format}"
        if platform.device_type != "cuda":
            problems.append(f"{flag} needs a CUDA GPU with Transformer Engine; this run is on "
                            f"{platform.device_type}" + (" (--use-cpu)" if cfg.training.use_cpu else ""))
        elif not platform.transformer_engine:
            problems.append(f"{flag} needs Transformer Engine, which does not import here "
                            "(pip install transformer-engine[pytorch]; see python -c 'import transformer_engine.pytorch')")
        else:
            need = FP8_MIN_CAPABILITY[f.fp8_recipe]
            if gpu is not None and tuple(gpu.capability) < need:
                problems.append(f"{flag} --fp8-recipe {f.fp8_recipe} needs compute capability >= "
                                f"{need[0]}.{need[1]}; {gpu.name} has {gpu.capability[0]}.{gpu.capability[1]}")
    if problems:
        raise ConfigError(problems)


def check_rpt_config(cfg: RunConfig, world_size: int, *, check_files: bool = True) -> list[str]:
    """The RPT/GRPO flags of `mrpt-rpt`, one message per problem, and the batch derived from them (the
    optimizer step takes --rpt-contexts-per-step x --rpt-group-size sequences; per-token loss), set
    before the run's other checks see it."""
    r, m, p, t = cfg.rpt, cfg.model, cfg.parallel, cfg.training
    problems: list[str] = []
    sequences = r.rpt_contexts_per_step * r.rpt_group_size
    if t.global_batch_size is not None and t.global_batch_size != sequences:
        problems.append(f"--global-batch-size {t.global_batch_size} differs from --rpt-contexts-per-step "
                        f"{r.rpt_contexts_per_step} x --rpt-group-size {r.rpt_group_size} = {sequences}; "
                        "leave it unset (RPT derives it)")
    t.global_batch_size = sequences
    for flag, given in (("--rampup-batch-size", t.rampup_batch_size), ("--step-batch-size-schedule",
                                                                        t.step_batch_size_schedule)):
        if given:
            problems.append(f"{flag} is not supported by mrpt-rpt: every step takes --rpt-contexts-per-step "
                            "x --rpt-group-size sequences (train with a fixed batch)")
    # Token-level mean over the whole global batch (DAPO's token-mean), whatever the micro-batching.
    t.calculate_per_token_loss = True
    if cfg.logging.log_validation_ppl_to_tensorboard:
        problems.append("--log-validation-ppl-to-tensorboard: RPT's evaluation measures next-token accuracy on "
                        "held-out tasks, it has no validation loss; drop the flag")
    if r.rpt_data is None:
        problems.append("--rpt-data is required (tasks from tools/build_rpt_data.py, or problems from "
                        "tools/build_rl_data.py for --rl-reward math_answer)")
    elif check_files and not os.path.isfile(r.rpt_data):
        problems.append(f"--rpt-data: {r.rpt_data} not found")
    if r.rpt_eval_data is not None and check_files and not os.path.isfile(r.rpt_eval_data):
        problems.append(f"--rpt-eval-data: {r.rpt_eval_data} not found")
    if m.attention_dropout or m.hidden_dropout:
        # The rollouts, the old-policy recompute and the update must score one policy; with dropout every
        # forward is a different random sub-network, so the first ratio is not 1 and the clip acts on noise.
        problems.append(f"--attention-dropout {m.attention_dropout:g} / --hidden-dropout {m.hidden_dropout:g}: GRPO "
                        "needs the same policy in rollouts, old-policy log-probs and the update; pass "
                        "--attention-dropout 0 --hidden-dropout 0 (Megatron-LM's defaults are 0.1)")
    if r.rpt_contexts_per_step < 1:
        problems.append(f"--rpt-contexts-per-step must be >= 1 (got {r.rpt_contexts_per_step})")
    if r.rpt_group_size < 2:
        problems.append(f"--rpt-group-size must be >= 2 (got {r.rpt_group_size}): group-normalised "
                        "advantages of a single rollout are zero")
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    if world_size % (tp * pp * cp) == 0 and r.rpt_contexts_per_step >= 1:
        dp = world_size // (tp * pp * cp)
        if r.rpt_contexts_per_step % dp:
            problems.append(f"--rpt-contexts-per-step {r.rpt_contexts_per_step} is not divisible by the "
                            f"data-parallel size {dp}")
    if r.rpt_mini_batches < 1:
        problems.append(f"--rpt-mini-batches must be >= 1 (got {r.rpt_mini_batches})")
    elif world_size % (tp * pp * cp) == 0 and r.rpt_contexts_per_step % (world_size // (tp * pp * cp) * r.rpt_mini_batches):
        problems.append(f"--rpt-contexts-per-step {r.rpt_contexts_per_step} is not divisible by the data-parallel "
                        f"size {world_size // (tp * pp * cp)} x --rpt-mini-batches {r.rpt_mini_batches} (every "
                        "mini-batch takes the same number of contexts on every rank)")
    if r.rpt_tis_cap is not None:
        if not (r.rpt_tis_cap > 0 and math.isfinite(r.rpt_tis_cap)):
            problems.append(f"--rpt-tis-cap must be a finite number > 0 (got {r.rpt_tis_cap})")
        if r.rpt_use_rollout_logprobs:
            problems.append("--rpt-tis-cap corrects the engine's log-probs against the trainer's recomputed ones; "
                            "with --rpt-use-rollout-logprobs there is no recompute (every weight would be 1)")
    if not r.rpt_temperature > 0:
        problems.append(f"--rpt-temperature must be > 0 (got {r.rpt_temperature})")
    if not 0.0 < r.rpt_top_p <= 1.0:
        problems.append(f"--rpt-top-p must be in (0, 1] (got {r.rpt_top_p})")
    if r.rpt_top_k < 0:
        problems.append(f"--rpt-top-k must be >= 0 (got {r.rpt_top_k})")
    if r.rollout_engine == "megatron" and r.rpt_top_k > 0 and r.rpt_top_p < 1.0:
        problems.append("--rollout-engine megatron takes --rpt-top-k or --rpt-top-p, not both")
    if r.rollout_engine == "megatron" and p.context_parallel_size > 1:
        # Megatron-Core's inference code (0.16, 0.19) never cuts prompts or the KV cache per CP rank,
        # and Transformer Engine has no attention backend for KV caching with context parallelism.
        problems.append(f"--rollout-engine megatron with --context-parallel-size {p.context_parallel_size}: "
                        "Megatron-Core's inference engine has no context parallelism; use --rollout-engine openai "
                        "(only the trainer is context parallel then) or --context-parallel-size 1")
    if r.rpt_max_response_length < 1:
        problems.append(f"--rpt-max-response-length must be >= 1 (got {r.rpt_max_response_length})")
    elif m.seq_length is not None and r.rpt_max_response_length >= m.seq_length:
        problems.append(f"--rpt-max-response-length {r.rpt_max_response_length} leaves no room for the prompt "
                        f"in --seq-length {m.seq_length}")
    if cfg.fp8.fp8_format and r.rollout_engine == "megatron" and r.rollout_max_batch_size % fp8_row_multiple(cfg):
        problems.append(f"--rollout-max-batch-size {r.rollout_max_batch_size} must be a multiple of "
                        f"{fp8_row_multiple(cfg)} with --fp8-format (the embedded engine pads every batch to it: "
                        "a decode step's FP8 GEMMs have one row per sequence)")
    if r.rpt_dynamic_sampling_start is not None and r.rpt_dynamic_sampling_start < 0:
        problems.append(f"--rpt-dynamic-sampling-start must be >= 0 (got {r.rpt_dynamic_sampling_start})")
    if r.rollout_engine == "openai":
        if not r.rollout_url:
            problems.append("--rollout-engine openai needs --rollout-url")
        if cfg.checkpoint.save is None:
            problems.append("--rollout-engine openai needs --save (weights reach the server by checkpoint export)")
        if r.rollout_reload == "restart" and not r.rollout_restart_command:
            problems.append("--rollout-reload restart needs --rollout-restart-command")
        if r.rollout_reload == "endpoint" and not r.rollout_reload_endpoint:
            problems.append("--rollout-reload endpoint needs --rollout-reload-endpoint")
        if r.rollout_frozen_policy and r.rollout_reload != "none":
            problems.append(f"--rollout-frozen-policy keeps the server's initial weights (nothing is synced): drop "
                            f"--rollout-reload {r.rollout_reload}")
        elif not r.rollout_frozen_policy and r.rollout_reload == "none":
            problems.append("--rollout-engine openai with --rollout-reload none: the server would never load the "
                            "trainer's updated weights and every rollout would come from a stale policy; pick how it "
                            "reloads (--rollout-reload sglang|vllm|endpoint|restart), or pass --rollout-frozen-policy "
                            "if it keeps its initial weights on purpose")
        if r.rollout_logprobs == "raw" and r.rpt_temperature != 1.0:
            problems.append(f"--rollout-logprobs raw (log-probs at temperature 1) with --rpt-temperature "
                            f"{r.rpt_temperature}: the engine cannot convert them to the sampling temperature (that "
                            "needs the whole distribution); have the server report tempered log-probs (vLLM "
                            "--logprobs-mode processed_logprobs; SGLang without SGLANG_RETURN_ORIGINAL_LOGPROB) and "
                            "pass --rollout-logprobs tempered, or sample at --rpt-temperature 1")
        elif r.rollout_logprobs == "tempered" and (r.rpt_top_p < 1.0 or r.rpt_top_k > 0):
            # vLLM's processed_logprobs are renormalised over the top-k/top-p set (v1 sampler), not log softmax(z/T)
            # over the whole vocabulary: refused only where the engine's log-probs enter the update.
            users = [flag for flag, on in (("--rpt-use-rollout-logprobs", r.rpt_use_rollout_logprobs),
                                           ("--rpt-tis-cap", r.rpt_tis_cap is not None)) if on]
            if users:
                truncation = " and ".join(x for x, on in ((f"--rpt-top-p {r.rpt_top_p}", r.rpt_top_p < 1.0),
                                                          (f"--rpt-top-k {r.rpt_top_k}", r.rpt_top_k > 0)) if on)
                problems.append(f"--rollout-logprobs tempered with {truncation}: vLLM's processed_logprobs are "
                                "renormalised over the top-k/top-p set, not log softmax(z/T) over the full vocabulary, "
                                f"and {' / '.join(users)} feed them into the update; sample without top-p/top-k, or "
                                "drop " + " and ".join(users) + " (the trainer then recomputes the old log-probs)")
    if r.rollout_max_batch_size < 1:
        problems.append(f"--rollout-max-batch-size must be >= 1 (got {r.rollout_max_batch_size})")
    if not 0.0 <= r.grpo_clamp_eps_lower < 1.0:
        problems.append(f"--grpo-clamp-eps-lower must be in [0, 1) (got {r.grpo_clamp_eps_lower})")
    if r.grpo_clamp_eps_upper < 0:
        problems.append(f"--grpo-clamp-eps-upper must be >= 0 (got {r.grpo_clamp_eps_upper})")
    if r.grpo_kl_beta < 0:
        problems.append(f"--grpo-kl-beta must be >= 0 (got {r.grpo_kl_beta})")
    elif r.grpo_kl_beta > 0:
        if r.rpt_ref_load is None:
            problems.append("--grpo-kl-beta > 0 needs --rpt-ref-load (the reference policy's checkpoint folder)")
        elif check_files and not os.path.isdir(r.rpt_ref_load):
            problems.append(f"--rpt-ref-load: {r.rpt_ref_load} is not a folder")
    if r.rpt_eval_max_tasks is not None and r.rpt_eval_max_tasks < 1:
        problems.append(f"--rpt-eval-max-tasks must be >= 1 (got {r.rpt_eval_max_tasks})")
    if r.rpt_eval_samples < 1:
        problems.append(f"--rpt-eval-samples must be >= 1 (got {r.rpt_eval_samples})")
    if not 0.0 < r.rlp_ema_decay < 1.0:
        problems.append(f"--rlp-ema-decay must be in (0, 1) (got {r.rlp_ema_decay}): the EMA teacher's tau")
    if r.rlp_target_tokens < 1:
        problems.append(f"--rlp-target-tokens must be >= 1 (got {r.rlp_target_tokens})")
    if r.rl_reward == "information_gain" and r.rpt_chat_template:
        problems.append("--rpt-chat-template does not apply to --rl-reward information_gain: RLP's prompt is the bare "
                        "context's token ids + '<think>' (docs/rlp.md)")
    if r.rl_reward == "information_gain" and r.rpt_prompt_template is not None:
        problems.append("--rpt-prompt-template does not apply to --rl-reward information_gain: RLP's prompt is the "
                        "bare context's token ids + '<think>' (docs/rlp.md)")
    if r.rl_reward != "information_gain":
        defaults = type(r)()        # config.schema's defaults of the flags
        given = [flag for flag, name in (("--rlp-ema-decay", "rlp_ema_decay"), ("--rlp-target-tokens", "rlp_target_tokens"))
                 if getattr(r, name) != getattr(defaults, name)]
        if given:
            problems.append(f"{' and '.join(given)} only apply to --rl-reward information_gain (RLP); this run's "
                            f"reward is {r.rl_reward}")
    if r.rl_reward == "information_gain" and p.overlap_param_gather:
        problems.append("--overlap-param-gather is not supported with --rl-reward information_gain: RLP's EMA "
                        "teacher reads the weights right after each optimizer step, before the overlapped "
                        "all-gather has delivered them")
    if p.num_layers_per_virtual_pipeline_stage is not None:
        problems.append("--num-layers-per-virtual-pipeline-stage is not supported by mrpt-rpt (Megatron-Core's "
                        "inference engine runs one model chunk per rank)")
    return problems


_SHAPE_FLAGS = {"--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length"}


