"""Hugging Face <-> Megatron-Core weight mapping as declarative tables, one per architecture family.

A `Rule` names a Megatron-Core parameter (local layer spec names; `{L}` = layer index, `{E}` =
expert index), the Hugging Face tensor(s) it is made of, and a `kind` saying how the two relate
and how the Megatron side is split over tensor-parallel ranks:

- `replicated`: same tensor on every rank (norms, routers).
- `vocab`: embedding / output layer; Megatron pads the vocabulary (zero rows) and splits rows.
- `column` / `row`: a linear layer split along dim 0 / dim 1.
- `qkv`: Megatron's fused QKV, grouped per query group as [q heads of the group, k, v]
  (GQA interleave) from HF's separate q/k/v projections (weights, or biases: Qwen2); split over TP
  by query groups.
- `gated`: Megatron's fc1 = [gate; up] from HF's gate_proj and up_proj; each TP rank holds
  [gate shard; up shard].

`to_megatron` builds one Megatron tensor (a TP shard) from the HF tensors it needs and
`to_hf` inverts it from the full (TP-merged) Megatron tensor, one parameter at a time, so a
converter streams tensor by tensor. Families: Llama (LlamaForCausalLM), Qwen2 (Qwen2ForCausalLM:
Llama + Q/K/V biases; the DeepSeek-R1-Distill-Qwen models), Qwen3 (Qwen3ForCausalLM: Llama + QK-norm),
Qwen3-MoE (Qwen3MoeForCausalLM: routed experts, softmax router, QK-norm), Mixtral
(MixtralForCausalLM: routed experts w1/w3/w2, softmax router).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

KINDS = ("replicated", "vocab", "column", "row", "qkv", "gated")


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    kind: str
    per_expert: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown mapping kind {self.kind!r}")


@dataclass(frozen=True)
class Shape:
    """What the mapping needs to know about the model (from the HF config or ours)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int          # the tokenizer's (HF) vocabulary
    padded_vocab_size: int   # Megatron's
    tied: bool
    num_experts: int = 0


_ATTENTION = (
    Rule("decoder.layers.{L}.input_layernorm.weight", ("model.layers.{L}.input_layernorm.weight",), "replicated"),
    Rule("decoder.layers.{L}.self_attention.linear_qkv.weight",
         ("model.layers.{L}.self_attn.q_proj.weight", "model.layers.{L}.self_attn.k_proj.weight",
          "model.layers.{L}.self_attn.v_proj.weight"), "qkv"),
    Rule("decoder.layers.{L}.self_attention.linear_proj.weight", ("model.layers.{L}.self_attn.o_proj.weight",), "row"),
    Rule("decoder.layers.{L}.pre_mlp_layernorm.weight", ("model.layers.{L}.post_attention_layernorm.weight",),
         "replicated"),
)
_QKV_BIAS = (
    Rule("decoder.layers.{L}.self_attention.linear_qkv.bias",
         ("model.layers.{L}.self_attn.q_proj.bias", "model.layers.{L}.self_attn.k_proj.bias",
          "model.layers.{L}.self_attn.v_proj.bias"), "qkv"),
)
_QK_NORM = (
    Rule("decoder.layers.{L}.self_attention.q_layernorm.weight", ("model.layers.{L}.self_attn.q_norm.weight",),
         "replicated"),
    Rule("decoder.layers.{L}.self_attention.k_layernorm.weight", ("model.layers.{L}.self_attn.k_norm.weight",),
         "replicated"),
)
_DENSE_MLP = (
    Rule("decoder.layers.{L}.mlp.linear_fc1.weight",
         ("model.layers.{L}.mlp.gate_proj.weight", "model.layers.{L}.mlp.up_proj.weight"), "gated"),
    Rule("decoder.layers.{L}.mlp.linear_fc2.weight", ("model.layers.{L}.mlp.down_proj.weight",), "row"),
)
_MOE_MLP = (
    Rule("decoder.layers.{L}.mlp.router.weight", ("model.layers.{L}.mlp.gate.weight",), "replicated"),
    Rule("decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.weight",
         ("model.layers.{L}.mlp.experts.{E}.gate_proj.weight", "model.layers.{L}.mlp.experts.{E}.up_proj.weight"),
         "gated", per_expert=True),
    Rule("decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight",
         ("model.layers.{L}.mlp.experts.{E}.down_proj.weight",), "row", per_expert=True),
)
_MIXTRAL_MOE = (
    Rule("decoder.layers.{L}.mlp.router.weight", ("model.layers.{L}.block_sparse_moe.gate.weight",), "replicated"),
    Rule("decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.weight",
         ("model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
          "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight"), "gated", per_expert=True),
    Rule("decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight",
         ("model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",), "row", per_expert=True),
)
_OUTER = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
)
_OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), "vocab")

FAMILIES: dict[str, tuple[Rule, ...]] = {
    "LlamaForCausalLM": _OUTER + _ATTENTION + _DENSE_MLP,
    "Qwen2ForCausalLM": _OUTER + _ATTENTION + _QKV_BIAS + _DENSE_MLP,
    "Qwen3ForCausalLM": _OUTER + _ATTENTION + _QK_NORM + _DENSE_MLP,
    "Qwen3MoeForCausalLM": _OUTER + _ATTENTION + _QK_NORM + _MOE_MLP,
    "MixtralForCausalLM": _OUTER + _ATTENTION + _MIXTRAL_MOE,
}


def family_rules(architecture: str) -> tuple[Rule, ...]:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {', '.join(FAMILIES)}") from None


def expand(rules: tuple[Rule, ...], shape: Shape, layers: Optional[range] = None,
           experts: Optional[range] = None) -> Iterator[tuple[str, tuple[str, ...], Rule, int, int]]:
    """(megatron name, hf names, rule, layer, expert) for every parameter; `layers`/`experts`
    select this rank's global layer/expert numbers (Megatron names use local indices)."""
    layers = layers if layers is not None else range(shape.num_layers)
    experts = experts if experts is not None else range(shape.num_experts)
    for rule in rules + (() if shape.tied else (_OUTPUT,)):
        if "{L}" not in rule.megatron:
            yield rule.megatron, rule.hf, rule, -1, -1
            continue
        for local_l, layer in enumerate(layers):
            for local_e, expert in (enumerate(experts) if rule.per_expert else [(0, -1)]):
                name = rule.megatron.replace("{L}", str(local_l)).replace("{E}", str(local_e))
                hf = tuple(h.replace("{L}", str(layer)).replace("{E}", str(expert)) for h in rule.hf)
                yield name, hf, rule, layer, expert


def _split(t: torch.Tensor, dim: int, rank: int, size: int, what: str) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"{what}: dimension {dim} of shape {tuple(t.shape)} is not divisible by TP {size}")
    return t.chunk(size, dim=dim)[rank].clone()


def to_megatron(rule: Rule, hf: list[torch.Tensor], shape: Shape, tp_rank: int = 0, tp_size: int = 1,
                name: str = "") -> torch.Tensor:
    """The Megatron tensor (this TP rank's shard) of one rule from its HF tensors."""
    k = rule.kind
    if k == "replicated":
        return hf[0].clone()
    if k == "vocab":
        (w,) = hf
        if w.shape[0] != shape.vocab_size:
            raise ValueError(f"{rule.hf[0]}: {w.shape[0]} rows, the config says vocab_size {shape.vocab_size}")
        padded = w.new_zeros((shape.padded_vocab_size, w.shape[1]))
        padded[: w.shape[0]] = w
        return _split(padded, 0, tp_rank, tp_size, name)
    if k == "column":
        return _split(hf[0], 0, tp_rank, tp_size, name)
    if k == "row":
        return _split(hf[0], 1, tp_rank, tp_size, name)
    if k == "gated":
        gate, up = hf
        return torch.cat([_split(gate, 0, tp_rank, tp_size, name), _split(up, 0, tp_rank, tp_size, name)], dim=0)
    # qkv: [groups, (heads/groups) q + k + v, d (, h)] then split by groups; a bias has no h
    q, key, v = hf
    g, d, rest = shape.num_query_groups, shape.head_dim, tuple(q.shape[1:])
    per = shape.num_attention_heads // g
    fused = torch.cat([q.reshape(g, per * d, *rest), key.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    return _split(fused, 0, tp_rank, tp_size, name).reshape(-1, *rest)


def merge_tp(rule: Rule, shards: list[torch.Tensor], shape: Shape) -> torch.Tensor:
    """The full Megatron tensor from its TP shards (inverse of the split in `to_megatron`)."""
    if rule.kind == "replicated" or len(shards) == 1:
        return shards[0]
    if rule.kind in ("vocab", "column"):
        return torch.cat(shards, dim=0)
    if rule.kind == "row":
        return torch.cat(shards, dim=1)
    if rule.kind == "gated":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)  # qkv: shards are whole query groups


def to_hf(rule: Rule, full: torch.Tensor, shape: Shape) -> list[torch.Tensor]:
    """The HF tensors of one rule from the full (TP-merged) Megatron tensor."""
    k = rule.kind
    if k in ("replicated", "column", "row"):
        return [full.clone()]
    if k == "vocab":
        return [full[: shape.vocab_size].clone()]
    if k == "gated":
        gate, up = full.chunk(2, dim=0)
        return [gate.clone(), up.clone()]
    g, d = shape.num_query_groups, shape.head_dim
    per = shape.num_attention_heads // g
    rest = tuple(full.shape[1:])   # (h,) for a weight, () for a bias
    grouped = full.reshape(g, (per + 2) * d, *rest)
    q = grouped[:, : per * d].reshape(-1, *rest)
    key = grouped[:, per * d: (per + 1) * d].reshape(-1, *rest)
    v = grouped[:, (per + 1) * d:].reshape(-1, *rest)
    return [q.clone(), key.clone(), v.clone()]


def hf_names(rules: tuple[Rule, ...], shape: Shape) -> set[str]:
    return {h for _, hfs, _, _, _ in expand(rules, shape) for h in hfs}

