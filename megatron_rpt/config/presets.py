"""Model presets (`--model-preset NAME`): Qwen3-style shapes from the loss paper plus a CPU `tiny`.

A preset fills model-shape fields; any flag given explicitly on the command line wins.
Shapes of dense-1b / dense-4b follow "Diversity or Precision?" (arXiv 2512.22955), head dim 128.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # Small enough for a few hundred TP=2 iterations on 2 CPU cores in a few minutes.
    "tiny": dict(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                 num_query_groups=2, kv_channels=32, seq_length=128, max_position_embeddings=128,
                 rotary_base=10000.0),
    "dense-1b": dict(num_layers=28, hidden_size=1536, ffn_hidden_size=4608, num_attention_heads=16,
                     num_query_groups=4, kv_channels=128, seq_length=4096,
                     max_position_embeddings=4096, rotary_base=10000.0),
    "dense-4b": dict(num_layers=36, hidden_size=2560, ffn_hidden_size=9728, num_attention_heads=32,
                     num_query_groups=8, kv_channels=128, seq_length=4096,
                     max_position_embeddings=4096, rotary_base=10000.0),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> dict:
    """The model fields of preset `name`; a clear error lists the known ones."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"--model-preset: unknown preset {name!r}; known presets: "
                         f"{', '.join(preset_names())}") from None
