"""The proxy models and their entropy scores: `top_k_entropy` (nats of the renormalised top-16
next-token probabilities), `score_windows`, the proxies (`HFProxy`: a Hugging Face folder;
`MegatronProxy`: a megatron-rpt checkpoint) and `check_vocabulary` (the proxy must predict over
the policy tokenizer's ids).

Scoring (`score_windows`): windows are right-padded to a per-window length bucket (causal
attention: the padding never influences the positions scored) and batched by bucket; only the
hidden states of scored positions go through the output layer, so full [batch, seq, vocab]
logits never exist.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch

from megatron_rpt.rpt.tasks.format import TaskError
from megatron_rpt.rpt.tasks.windows import Window

TOP_K = 16
BUCKET = 64            # windows are padded to a multiple of this (per window, not per batch)
PROXY_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}   # --proxy-dtype


def top_k_entropy(logits: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Entropy (nats, float64) of the renormalised top-k probabilities of each row of logits
    (softmax over the k largest logits = the top-k probabilities renormalised)."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).values.double()
    logp = torch.log_softmax(top, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def score_windows(proxy, windows: Sequence[Window], batch_size: int, pad_id: int = 0) -> list[list[float]]:
    """Entropy at each window's targets (same order). Windows are grouped by padded length so that a
    window's numbers do not depend on which other windows share its batch."""
    buckets: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        length = min(-(-len(w.tokens) // BUCKET) * BUCKET, proxy.max_length)
        buckets.setdefault(max(length, len(w.tokens)), []).append(i)
    out: list[list[float]] = [[] for _ in windows]
    # output-layer chunk: ~128 MB of logits
    rows_per_head = max(1, 2**27 // (max(proxy.vocab_size, 1) * PROXY_DTYPES[proxy.dtype].itemsize))
    for length in sorted(buckets):
        members = buckets[length]
        for b in range(0, len(members), batch_size):
            batch = [windows[i] for i in members[b:b + batch_size]]
            x = torch.full((len(batch), length), pad_id, dtype=torch.long)
            rows, cols = [], []
            for r, w in enumerate(batch):
                x[r, :len(w.tokens)] = torch.tensor(w.tokens, dtype=torch.long)
                rows += [r] * len(w.targets)
                cols += [t - w.start - 1 for t in w.targets]
            hidden = proxy.hidden(x.to(proxy.device))
            picked = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
            ent = torch.cat([top_k_entropy(proxy.logits(picked[i:i + rows_per_head]))
                             for i in range(0, picked.shape[0], rows_per_head)]).cpu().tolist() if rows else []
            k = 0
            for w, i in zip(batch, members[b:b + batch_size]):
                out[i] = ent[k:k + len(w.targets)]
                k += len(w.targets)
    return out


class HFProxy:
    """A Hugging Face causal LM folder (safetensors), eval mode, in `dtype` (fp32 by default).

    fp64 does not make transformers' Llama/Qwen3 fully float64: they compute RMSNorm and the RoPE
    table in fp32 whatever the model's dtype, so their fp64 logits carry fp32 rounding from those
    steps (~1e-6 relative, measured)."""

    kind = "hf"

    def __init__(self, folder: str, device: str = "cpu", dtype: str = "fp32"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModelForCausalLM
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise TaskError(f"--proxy-hf-dir {folder}: no config.json (not a Hugging Face model folder)")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=PROXY_DTYPES[dtype], local_files_only=True,
                                                         use_safetensors=True)
        except (OSError, ValueError) as e:
            raise TaskError(f"--proxy-hf-dir {folder}: cannot load the model ({e})") from None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.path, self.dtype = os.path.abspath(folder), dtype
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vocab_size = int(text.vocab_size)
        self.max_length = int(getattr(text, "max_position_embeddings", 0) or 2**31)
        self.architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        self._base = model.base_model
        self._head = model.get_output_embeddings()
        self._check_head()

    def _check_head(self) -> None:
        # Scoring applies the output layer to picked hidden states only; that must be what the
        # model's own forward computes (no logit soft-capping / scaling in between).
        x = torch.arange(min(8, self.vocab_size), device=self.device)[None]
        with torch.no_grad():
            ref = self.model(input_ids=x, use_cache=False).logits[..., :self.vocab_size]
            ours = self.logits(self.hidden(x))
        if not torch.allclose(ref, ours, rtol=1e-4, atol=1e-4):
            raise TaskError(f"--proxy-hf-dir {self.path}: {self.architecture}'s logits are not its output layer "
                            "applied to the last hidden state (e.g. logit soft-capping); not supported as a proxy")

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self._base(input_ids=x, use_cache=False).last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._head(h)[..., :self.vocab_size]

    def tokenizer(self):
        """The tokenizer shipped with the folder (None if it has none)."""
        from megatron_rpt.data.tokenizers import HuggingFaceTokenizer
        if not any(os.path.isfile(os.path.join(self.path, f)) for f in ("tokenizer.json", "tokenizer.model")):
            return None
        return HuggingFaceTokenizer(self.path)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "architecture": self.architecture, "vocab_size": self.vocab_size,
                "dtype": self.dtype}

    def close(self) -> None:
        pass


class _CaptureHidden(torch.nn.Module):
    """Stands in for GPTModel.output_layer: returns the final hidden states unchanged."""

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return hidden_states, None


class MegatronProxy:
    """A checkpoint written by this repo (recorded run config + torch_dist weights), single process,
    TP=PP=1 (the checkpoint reshards on load), in `dtype` (fp32 by default; fp64 is float64
    throughout except Megatron-Core's RoPE table, which it computes in fp32)."""

    kind = "megatron"

    def __init__(self, load: str, iteration: Optional[int] = None, dtype: str = "fp32"):
        with warnings.catch_warnings():
            # torch DCP / ShardedTensor deprecation notices raised inside Megatron-Core's loader
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message="full scope is deprecated")  # Megatron-Core's own default
            self._build(load, iteration, dtype)

    def _build(self, load: str, iteration: Optional[int], dtype: str) -> None:
        from megatron_rpt.checkpoint.layout import CheckpointError, read_run_config
        from megatron_rpt.checkpoint.sharded import load_weights
        from megatron_rpt.convert.checkpoint import _single_process_model
        from megatron_rpt.data.tokenizers import tokenizer_from_config
        from megatron_rpt.models.gpt import model_vocab_size, padded_vocab_size
        try:
            it, _, cfg = read_run_config(load, iteration, "--proxy-load", "--proxy-ckpt-step")
        except CheckpointError as e:
            raise TaskError(str(e)) from None
        self.cfg = cfg
        self._tokenizer = tokenizer_from_config(cfg) if cfg.data.tokenizer_type else None
        self.vocab_size = model_vocab_size(self._tokenizer.vocab_size if self._tokenizer else 0, cfg)
        padded = padded_vocab_size(self.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
        model = _single_process_model(cfg, padded)[0].eval()
        try:
            load_weights(load, [model], iteration=it)
        except CheckpointError as e:
            raise TaskError(f"--proxy-load {load}: {e}") from None
        model.to(PROXY_DTYPES[dtype])
        self.dtype = dtype
        self._weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                        else model.output_layer.weight)
        model.output_layer = _CaptureHidden()
        self.model, self.device, self.path, self.iteration = model, torch.device("cpu"), os.path.abspath(load), it
        self.max_length = int(cfg.model.max_position_embeddings or cfg.model.seq_length or 2**31)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
        return self.model(x, torch.arange(s)[None].expand(b, s), mask)   # [b, s, h] via _CaptureHidden

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(h, self._weight[:self.vocab_size])

    def tokenizer(self):
        return self._tokenizer

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "iteration": self.iteration, "vocab_size": self.vocab_size,
                "dtype": self.dtype}

    def close(self) -> None:
        from megatron_rpt.convert.checkpoint import _teardown
        _teardown()


def check_vocabulary(policy, proxy) -> None:
    """The proxy must predict over the policy tokenizer's ids: at least its vocabulary size, and when
    the proxy carries a tokenizer, the same bytes for every id."""
    if proxy.vocab_size < policy.vocab_size:
        raise TaskError(f"the proxy ({proxy.path}) predicts over {proxy.vocab_size} ids but the policy tokenizer "
                        f"({type(policy).__name__}) has {policy.vocab_size}: the proxy must share the policy's "
                        "vocabulary")
    theirs = proxy.tokenizer()
    if theirs is None:
        return
    if theirs.vocab_size != policy.vocab_size:
        raise TaskError(f"the proxy's tokenizer ({proxy.path}) has {theirs.vocab_size} tokens, the policy's "
                        f"{policy.vocab_size}: different vocabularies")
    try:
        a, b = policy._byte_table(), theirs._byte_table()
    except Exception:  # noqa: BLE001 - a tokenizer without token bytes (NullTokenizer): sizes were compared
        return
    for i in range(policy.vocab_size):
        if a[i] != b[i]:
            raise TaskError(f"the proxy's tokenizer ({proxy.path}) differs from the policy tokenizer at id {i} "
                            f"({b[i]!r} vs {a[i]!r}): the proxy must share the policy's vocabulary")
