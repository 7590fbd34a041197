"""Parameter and FLOP accounting of the GPT as the architecture flags build it, dense and MoE (drives
MFU logging and tools/count_params.py).

Conventions (stated because papers differ):
- parameters: every weight of the built model, norms and biases included; the embedding counted
  once when tied; learned absolute position embeddings count as embedding; `padded_vocab_size` is
  the vocabulary actually allocated (Megatron pads it). Buffers (the router's expert bias) are not
  parameters.
- MoE layers (those --moe-layer-freq selects): the router (h x E) plus E experts of width
  moe_ffn_hidden_size and the shared expert replace the dense MLP. Active parameters = everything a
  token passes through: the router, the top-k experts and the shared expert (not the E - k others).
- training FLOPs per token = 3 x forward (backward = 2 x forward); forward = 2 x (matmul weights a
  token uses: active ones for MoE) + attention scores and values over the full sequence (PaLM's
  12·L·heads·d·s for fwd+bwd, no causal halving) + logits 2·h·V. Norm, softmax, RoPE, activation
  and token-dispatch costs are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rpt.config.schema import ModelConfig
from megatron_rpt.config.validation import moe_layer_pattern

# Dense bf16 peaks (TFLOP/s) used for MFU when --peak-tflops is not given.
# MFU stays relative to this bf16 peak with --fp8-format too (the usual convention: FP8 shows as higher MFU).
KNOWN_PEAK_TFLOPS = {"H100": 989.4, "H100 PCIE": 756.5, "H100 NVL": 835.5, "H200": 989.4, "H800": 989.4,
                     "A100": 312.0, "GH200": 989.4, "B200": 2250.0, "L40S": 362.1}


@dataclass(frozen=True)
class ParamCount:
    total: int
    embedding: int          # input embedding (and the output layer when untied)
    non_embedding: int
    active: int             # parameters one token uses (= total for a dense model)
    active_non_embedding: int

    @property
    def total_with_embeddings(self) -> int:
        return self.total


def norm_params(m: ModelConfig, width: int) -> int:
    """Parameters of one normalization layer of `width`."""
    return width * (2 if m.normalization == "LayerNorm" else 1)   # LayerNorm: weight and bias


def mlp_params(m: ModelConfig, ffn: int) -> tuple[int, int]:
    """(weights, biases) of one MLP of hidden width `ffn`: fc1 (two branches with SwiGLU) and fc2."""
    h, branches = m.hidden_size, 2 if m.swiglu else 1
    weights = h * ffn * branches + ffn * h
    return weights, (ffn * branches + h if m.add_bias_linear else 0)


def kv_groups(m: ModelConfig) -> int:
    """Key/value heads as the model is built: --num-query-groups with --group-query-attention
    (Megatron-LM's default 1 when not given), else one per attention head."""
    if m.group_query_attention:
        return m.num_query_groups or 1
    return m.num_attention_heads


def layer_params(m: ModelConfig, moe: bool) -> dict[str, int]:
    """Parameter groups of one layer. "matmul"/"matmul_active": the GEMM weights (all / those one
    token uses: router, top-k and shared experts); "other": biases and norms; "experts": the routed
    experts' weights and biases (part of "matmul" + "other"; split over expert parallelism)."""
    h, d = m.hidden_size, m.kv_channels or m.hidden_size // m.num_attention_heads
    heads, groups = m.num_attention_heads, kv_groups(m)
    qkv_out = heads * d + 2 * groups * d
    attention = h * qkv_out + heads * d * h
    other = (qkv_out if (m.add_qkv_bias or m.add_bias_linear) else 0) + (h if m.add_bias_linear else 0)
    other += 2 * norm_params(m, h) + (2 * norm_params(m, d) if m.qk_layernorm else 0)
    if moe:
        expert_w, expert_b = mlp_params(m, m.moe_ffn_hidden_size or m.ffn_hidden_size)
        router = h * m.num_experts
        shared_w, shared_b = mlp_params(m, m.moe_shared_expert_intermediate_size) \
            if m.moe_shared_expert_intermediate_size else (0, 0)
        router_b = m.num_experts if m.add_bias_linear else 0   # Megatron-Core's router takes the linear biases
        return {"matmul": attention + m.num_experts * expert_w + router + shared_w,
                "matmul_active": attention + m.moe_router_topk * expert_w + router + shared_w,
                "other": other + m.num_experts * expert_b + shared_b + router_b,
                "other_active": other + m.moe_router_topk * expert_b + shared_b + router_b,
                "experts": m.num_experts * (expert_w + expert_b)}
    mlp_w, mlp_b = mlp_params(m, m.ffn_hidden_size)
    return {"matmul": attention + mlp_w, "matmul_active": attention + mlp_w,
            "other": other + mlp_b, "other_active": other + mlp_b, "experts": 0}


def _layers(m: ModelConfig) -> list[dict[str, int]]:
    pattern = moe_layer_pattern(m) or [0] * m.num_layers
    return [layer_params(m, bool(is_moe)) for is_moe in pattern]


def count_parameters(m: ModelConfig, padded_vocab_size: int) -> ParamCount:
    layers = _layers(m)
    embedding = padded_vocab_size * m.hidden_size
    if m.position_embedding_type == "learned_absolute":
        embedding += (m.max_position_embeddings or m.seq_length) * m.hidden_size
    output = 0 if not m.untie_embeddings_and_output_weights else padded_vocab_size * m.hidden_size
    final_norm = norm_params(m, m.hidden_size)
    non_embedding = sum(x["matmul"] + x["other"] for x in layers) + final_norm
    active_non_embedding = sum(x["matmul_active"] + x["other_active"] for x in layers) + final_norm
    return ParamCount(total=non_embedding + embedding + output, embedding=embedding + output,
                      non_embedding=non_embedding, active=active_non_embedding + embedding + output,
                      active_non_embedding=active_non_embedding)


def training_flops_per_token(m: ModelConfig, padded_vocab_size: int, seq_length: int | None = None) -> float:
    """Model FLOPs of one trained token (forward + backward), see module docstring."""
    s = seq_length or m.seq_length
    matmul_weights = sum(x["matmul_active"] for x in _layers(m))
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    attention = 2 * 2 * m.num_layers * m.num_attention_heads * d * s  # QK^T and AV, forward, per token
    logits = 2 * m.hidden_size * padded_vocab_size
    forward = 2 * matmul_weights + attention + logits
    return 3.0 * forward


def peak_tflops_for_device(name: str | None) -> float | None:
    """Known dense bf16 peak for a CUDA device name like 'NVIDIA H100 80GB HBM3'; None if unknown."""
    if not name:
        return None
    for key in sorted(KNOWN_PEAK_TFLOPS, key=len, reverse=True):
        if key in name.upper():
            return KNOWN_PEAK_TFLOPS[key]
    return None
