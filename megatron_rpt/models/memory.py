"""Per-GPU memory estimate of a training run from its flags (printed by `--dry-run`), before any
process group or device exists. An estimate, stated with its formulas:

- Parameters on the busiest pipeline stage: its layers (`models.flops` per-layer counts), plus the
  embedding (first stage) and an untied output layer (last stage). Dense parameters are split over
  TP, expert parameters over EP x expert-TP.
- Bytes per parameter (Megatron-Core's DDP and optimizer as this project configures them): weights 2
  (bf16/fp16) or 4; gradients 4 (fp32 main grads: `grad_reduce_in_fp32`; 2 with --grad-reduce-in-bf16); optimizer 12 with mixed
  precision (fp32 master + Adam m, v) or 8 in fp32 (4 for SGD with momentum + master); with
  --use-distributed-optimizer the optimizer part is divided by the data-parallel size (dense: DP x
  CP, experts: expert data parallel).
- Activations per layer and micro-batch (Korthikanti et al. 2022, bf16, flash/fused attention that
  keeps no s x s scores): 34 s b h bytes, divided by TP with sequence parallelism (else
  s b h (10 + 24 / TP)); with full recompute only the layer inputs, 2 s b h, plus one layer's
  worth. MoE layers are counted as dense ones (an under-estimate with top-k > 1). The first stage of
  1F1B holds min(PP, micro-batches) micro-batches in flight.
- Logits: the loss keeps fp32 logits, 4 s b V / TP bytes, on the last stage.
Not counted: the CUDA context and NCCL buffers (~1-3 GiB), allocator fragmentation, Transformer
Engine workspaces, FP8 weight copies.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rpt.config.schema import RunConfig
from megatron_rpt.config.validation import moe_layer_pattern
from megatron_rpt.models.flops import layer_params, norm_params

GIB = 2 ** 30


@dataclass(frozen=True)
class MemoryEstimate:
    dense_params: int        # per GPU, busiest stage
    expert_params: int
    weights: float           # bytes
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def estimate_memory(cfg: RunConfig, padded_vocab_size: int, world_size: int) -> MemoryEstimate:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp, cp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                      p.expert_model_parallel_size)
    etp = p.expert_tensor_parallel_size or tp
    h, s, b = m.hidden_size, m.seq_length // cp, t.micro_batch_size
    pattern = moe_layer_pattern(m) or [0] * m.num_layers
    per_stage = m.num_layers // pp

    def stage_params(first: bool, last: bool) -> tuple[int, int]:
        """(dense, expert) parameters per GPU of the first or the last pipeline stage."""
        dense = expert = 0
        for is_moe in (pattern[:per_stage] if first else pattern[-per_stage:]):
            x = layer_params(m, bool(is_moe))
            expert += x["experts"]
            dense += x["matmul"] + x["other"] - x["experts"]
        if first:
            dense += padded_vocab_size * h
            if m.position_embedding_type == "learned_absolute":
                dense += (m.max_position_embeddings or m.seq_length) * h
        if last:
            dense += norm_params(m, h)
            if m.untie_embeddings_and_output_weights or pp > 1:   # tied at PP > 1: the last stage holds a copy
                dense += padded_vocab_size * h
        return dense // tp, expert // (ep * etp)

    stages = [stage_params(True, pp == 1)] + ([stage_params(False, True)] if pp > 1 else [])
    dense, expert = max(stages, key=lambda x: x[0] + x[1])
    mixed = t.bf16 or t.fp16
    weights = (2 if mixed else 4) * (dense + expert)
    gradients = (2 if cfg.training.grad_reduce_in_bf16 else 4) * (dense + expert)
    opt_bytes = (12 if mixed else 8) if cfg.optimizer.optimizer == "adam" else (8 if mixed else 4)
    dp = max(world_size // (tp * pp * cp), 1)
    expert_dp = max(world_size // (ep * etp * pp), 1)
    if p.use_distributed_optimizer:
        optimizer = opt_bytes * (dense / (dp * cp) + expert / expert_dp)
    else:
        optimizer = opt_bytes * (dense + expert)
    if t.recompute_granularity == "full":
        per_layer = 2 * s * b * h
        activations = per_layer * per_stage + 34 * s * b * h / tp
    else:
        per_layer = 34 * s * b * h / tp if p.sequence_parallel else s * b * h * (10 + 24 / tp)
        activations = per_layer * per_stage
    gbs = t.global_batch_size or b * dp
    in_flight = min(pp, max(gbs // (b * dp), 1)) if pp > 1 else 1
    activations *= in_flight
    logits = 4 * s * b * padded_vocab_size / tp
    return MemoryEstimate(dense, expert, weights, gradients, optimizer, activations, logits)
