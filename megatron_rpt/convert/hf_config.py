"""Hugging Face config.json <-> our model flags, for the architectures in `convert.mapping.FAMILIES`.

`model_flags_from_hf(config)` gives the ModelConfig fields (Megatron-LM flag names) of an HF
model and refuses, naming the field, anything the Megatron model would compute differently (RoPE
scaling, biases, sliding windows, tied/untied mismatches, non-normalised top-k routing, ...).
`hf_config_from_model(model, ...)` is the inverse used by export.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_rpt.convert.mapping import FAMILIES, Shape


def _rope_theta(c: dict) -> float:
    params = c.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default" or c.get("rope_scaling"):
        raise ValueError(f"config.json: RoPE scaling {params.get('rope_type') or c.get('rope_scaling')} is not "
                         "supported (Megatron model uses plain RoPE)")
    theta = params.get("rope_theta", c.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json: no rope_theta")
    return float(theta)


def architecture(c: dict) -> str:
    archs = c.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return arch
    raise ValueError(f"config.json: architectures {archs} not supported; supported: {', '.join(FAMILIES)}")


def model_flags_from_hf(c: dict) -> dict[str, Any]:
    """ModelConfig fields for the HF config dict `c` (see module docstring for what is refused)."""
    arch = architecture(c)
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ValueError(f"config.json: {key}=true is not supported (the Megatron model has biases on Q/K/V "
                             "only for Qwen2, none elsewhere)")
    if c.get("use_sliding_window") or (arch in ("LlamaForCausalLM", "MixtralForCausalLM") and c.get("sliding_window")):
        raise ValueError("config.json: sliding-window attention is not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {c.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    heads = c["num_attention_heads"]
    flags: dict[str, Any] = dict(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
        num_attention_heads=heads, num_query_groups=c.get("num_key_value_heads") or heads,
        kv_channels=c.get("head_dim") or c["hidden_size"] // heads,
        max_position_embeddings=c["max_position_embeddings"], rotary_base=_rope_theta(c),
        norm_epsilon=float(c["rms_norm_eps"]), qk_layernorm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        add_qkv_bias=arch == "Qwen2ForCausalLM",
        untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False),
        # The families' architecture, stated (Megatron-LM's defaults are a GeLU/LayerNorm GPT):
        swiglu=True, normalization="RMSNorm", add_bias_linear=False, position_embedding_type="rope",
        group_query_attention=True, attention_dropout=0.0, hidden_dropout=0.0)
    if arch == "Qwen3MoeForCausalLM":
        if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
            raise ValueError("config.json: dense layers inside a Qwen3-MoE model (mlp_only_layers / "
                             "decoder_sparse_step) are not supported")
        if not c.get("norm_topk_prob", False):
            raise ValueError("config.json: norm_topk_prob=false is not supported (Megatron's softmax top-k "
                             "router renormalises the top-k probabilities)")
        flags.update(num_experts=c.get("num_experts") or c.get("num_local_experts"),
                     moe_ffn_hidden_size=c["moe_intermediate_size"], moe_router_topk=c["num_experts_per_tok"],
                     moe_router_score_function="softmax", moe_router_load_balancing_type="aux_loss",
                     moe_aux_loss_coeff=float(c.get("router_aux_loss_coef", 0.0)), moe_router_dtype="fp32",
                     moe_router_enable_expert_bias=False)
    if arch == "MixtralForCausalLM":
        if c.get("router_jitter_noise"):
            raise ValueError("config.json: router_jitter_noise is not supported (Megatron's router has no jitter)")
        # Mixtral's intermediate_size is each expert's; its router renormalises the top-k (softmax over them).
        flags.update(num_experts=c["num_local_experts"], moe_ffn_hidden_size=c["intermediate_size"],
                     moe_router_topk=c["num_experts_per_tok"], moe_router_score_function="softmax",
                     moe_router_load_balancing_type="aux_loss",
                     moe_aux_loss_coeff=float(c.get("router_aux_loss_coef", 0.0)), moe_router_dtype="fp32",
                     moe_router_enable_expert_bias=False)
    return flags


def shape_from_hf(c: dict, padded_vocab_size: Optional[int] = None) -> Shape:
    f = model_flags_from_hf(c)
    return Shape(num_layers=f["num_layers"], hidden_size=f["hidden_size"],
                 num_attention_heads=f["num_attention_heads"], num_query_groups=f["num_query_groups"],
                 head_dim=f["kv_channels"], vocab_size=c["vocab_size"],
                 padded_vocab_size=padded_vocab_size or c["vocab_size"],
                 tied=not f["untie_embeddings_and_output_weights"], num_experts=f.get("num_experts") or 0)
