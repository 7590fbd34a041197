"""Parameter and FLOP accounting for the Qwen3-style GPT, dense and MoE (drives MFU logging and
tools/count_params.py).

Conventions (stated because papers differ):
- parameters: every weight of the built model, norms included; the embedding counted once when
  tied; `padded_vocab_size` is the vocabulary actually allocated (Megatron pads it). Buffers (the
  router's expert bias) are not parameters.
- MoE layers: the router (h x E) plus E experts of SwiGLU width moe_ffn_hidden_size replace the
  dense MLP. Active parameters = everything a token passes through: the router and top-k experts
  (not the E - k others).
- training FLOPs per token = 3 x forward (backward = 2 x forward); forward = 2 x (matmul weights a
  token uses: active ones for MoE) + attention scores and values over the full sequence (PaLM's
  12·L·heads·d·s for fwd+bwd, no causal halving) + logits 2·h·V. Norm, softmax, RoPE, activation
  and token-dispatch costs are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rpt.config.schema import ModelConfig

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


def _layer_params(m: ModelConfig) -> dict[str, int]:
    """Per-layer parameter groups; for MoE "mlp" is all experts and "mlp_active" the top-k ones."""
    h, d = m.hidden_size, m.kv_channels or m.hidden_size // m.num_attention_heads
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    qkv = h * (heads * d + 2 * groups * d)
    proj = heads * d * h
    norms = 2 * h + (2 * d if m.qk_layernorm else 0)
    if m.num_experts:
        expert = 3 * h * (m.moe_ffn_hidden_size or m.ffn_hidden_size)
        router = h * m.num_experts
        return {"qkv": qkv, "proj": proj, "mlp": m.num_experts * expert + router,
                "mlp_active": m.moe_router_topk * expert + router, "norms": norms}
    mlp = 3 * h * m.ffn_hidden_size
    return {"qkv": qkv, "proj": proj, "mlp": mlp, "mlp_active": mlp, "norms": norms}


def count_parameters(m: ModelConfig, padded_vocab_size: int) -> ParamCount:
    layer = _layer_params(m)
    per_layer = layer["qkv"] + layer["proj"] + layer["mlp"] + layer["norms"]
    per_layer_active = per_layer - layer["mlp"] + layer["mlp_active"]
    embedding = padded_vocab_size * m.hidden_size
    output = 0 if not m.untie_embeddings_and_output_weights else padded_vocab_size * m.hidden_size
    final_norm = m.hidden_size
    non_embedding = m.num_layers * per_layer + final_norm
    active_non_embedding = m.num_layers * per_layer_active + final_norm
    return ParamCount(total=non_embedding + embedding + output, embedding=embedding + output,
                      non_embedding=non_embedding, active=active_non_embedding + embedding + output,
                      active_non_embedding=active_non_embedding)


def training_flops_per_token(m: ModelConfig, padded_vocab_size: int, seq_length: int | None = None) -> float:
    """Model FLOPs of one trained token (forward + backward), see module docstring."""
    s = seq_length or m.seq_length
    layer = _layer_params(m)
    matmul_weights = m.num_layers * (layer["qkv"] + layer["proj"] + layer["mlp_active"])
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
