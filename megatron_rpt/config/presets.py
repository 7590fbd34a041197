"""Model presets (`--model-preset NAME`): Qwen3-style shapes from the loss paper plus a CPU `tiny`.

A preset fills the model's architecture and shape fields (the Qwen3 family: SwiGLU, RMSNorm with
epsilon 1e-6, no biases, RoPE, grouped-query attention, QK-norm, no dropout); any flag given
explicitly on the command line wins.
Shapes of dense-1b / dense-4b and the MoE presets follow "Diversity or Precision?" (arXiv 2512.22955),
head dim 128; tiny / tiny-moe train on CPU.
"""

from __future__ import annotations

QWEN3_FAMILY = dict(swiglu=True, normalization="RMSNorm", norm_epsilon=1e-6, add_bias_linear=False,
                   position_embedding_type="rope", group_query_attention=True, qk_layernorm=True,
                   attention_dropout=0.0, hidden_dropout=0.0)

_MOE = dict(untie_embeddings_and_output_weights=True, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
            moe_router_bias_update_rate=1e-3)

PRESETS: dict[str, dict] = {
    # Small enough for a few hundred TP=2 iterations on 2 CPU cores in a few minutes.
    "tiny": dict(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                 num_query_groups=2, kv_channels=32, seq_length=128, max_position_embeddings=128,
                 rotary_base=10000.0),
    "dense-1b": dict(num_layers=28, hidden_size=1536, ffn_hidden_size=4608, num_attention_heads=16,
                     num_query_groups=4, kv_channels=128, seq_length=4096,
                     max_position_embeddings=4096, rotary_base=10000.0),
    # A small MoE that trains on CPU: 8 experts, top-2, expert-bias balancing, untied output layer
    # (as the big ones, which are Qwen3-MoE style: ~9.8B total with a 152k vocabulary).
    "tiny-moe": dict(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                     num_query_groups=2, kv_channels=32, seq_length=128, max_position_embeddings=128,
                     rotary_base=10000.0, **_MOE, num_experts=8, moe_ffn_hidden_size=64, moe_router_topk=2),
    # The loss paper's MoE models (methods note): 384 experts, top-12, expert FFN 320, head dim 128,
    # auxiliary-loss-free balancing with a per-expert bias (sigmoid scores), router in fp32.
    "moe-5b-a0.3b": dict(num_layers=12, hidden_size=1024, ffn_hidden_size=320, num_attention_heads=32,
                         num_query_groups=4, kv_channels=128, seq_length=4096, max_position_embeddings=4096,
                         rotary_base=10000.0, **_MOE, num_experts=384, moe_ffn_hidden_size=320, moe_router_topk=12),
    "moe-10b-a0.5b": dict(num_layers=16, hidden_size=1536, ffn_hidden_size=320, num_attention_heads=32,
                          num_query_groups=4, kv_channels=128, seq_length=4096, max_position_embeddings=4096,
                          rotary_base=10000.0, **_MOE, num_experts=384, moe_ffn_hidden_size=320, moe_router_topk=12),
    "dense-4b": dict(num_layers=36, hidden_size=2560, ffn_hidden_size=9728, num_attention_heads=32,
                     num_query_groups=8, kv_channels=128, seq_length=4096,
                     max_position_embeddings=4096, rotary_base=10000.0),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> dict:
    """The model fields of preset `name`; a clear error lists the known ones."""
    try:
        return {**QWEN3_FAMILY, **PRESETS[name]}
    except KeyError:
        raise ValueError(f"--model-preset: unknown preset {name!r}; known presets: "
                         f"{', '.join(preset_names())}") from None
