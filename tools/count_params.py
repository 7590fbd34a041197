#!/usr/bin/env python
"""Total and active parameters (with and without embeddings) and training FLOPs per token of a model.

Takes the pretraining flags (`--model-preset NAME` plus any model flag, e.g. `--num-experts`), so
the numbers are those of the model `mrpt-pretrain` builds and the ones its MFU uses
(megatron_rpt.models.flops). The vocabulary is the tokenizer's size padded as training pads it:
give `--vocab-size` (default 151,643, the Qwen BPE the loss paper's sizes assume) and the
tensor-parallel size if it is not 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_rpt.config import ConfigError, parse_args
from megatron_rpt.models.flops import count_parameters, training_flops_per_token
from megatron_rpt.models.gpt import padded_vocab_size

DEFAULT_VOCAB = 151_643


def _extra(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("count_params")
    g.add_argument("--json", dest="count_json", action="store_true", help="print JSON instead of a table")


def count(argv: list[str]) -> dict:
    """The numbers as a dict (raises ConfigError for an incomplete model shape)."""
    cfg = parse_args(argv, extra_args_provider=_extra)
    m = cfg.model
    missing = [f for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length")
               if getattr(m, f) is None]
    if missing:
        raise ConfigError([f"--{f.replace('_', '-')} is required (or use --model-preset)" for f in missing])
    tokenizer_vocab = m.vocab_size or DEFAULT_VOCAB
    vocab = padded_vocab_size(tokenizer_vocab, m.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)
    p = count_parameters(m, vocab)
    return {"model": cfg.model_preset or "custom", "tokenizer_vocab": tokenizer_vocab, "padded_vocab": vocab,
            "seq_length": m.seq_length, "experts": m.num_experts, "topk": m.moe_router_topk if m.num_experts else None,
            "total": p.total, "total_non_embedding": p.non_embedding, "active": p.active,
            "active_non_embedding": p.active_non_embedding, "embedding": p.embedding,
            "training_flops_per_token": training_flops_per_token(m, vocab)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        r = count(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "--json" in argv:
        print(json.dumps(r, indent=1))
        return 0
    moe = f", {r['experts']} experts, top-{r['topk']}" if r["experts"] else ""
    print(f"{r['model']}: vocabulary {r['tokenizer_vocab']:,} (padded {r['padded_vocab']:,}), "
          f"sequence {r['seq_length']}{moe}")
    rows = [("total parameters", r["total"]), ("  without embeddings", r["total_non_embedding"]),
            ("active parameters per token", r["active"]), ("  without embeddings", r["active_non_embedding"]),
            ("embedding (+ untied output layer)", r["embedding"])]
    for name, value in rows:
        print(f"  {name:<36}{value:>18,}  ({value / 1e9:.3f} B)")
    print(f"  {'training FLOPs per token':<36}{r['training_flops_per_token']:>18,.0f}  "
          f"({r['training_flops_per_token'] / 1e9:.3f} GFLOP)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
