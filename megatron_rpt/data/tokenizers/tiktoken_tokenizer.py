"""--tokenizer-type TikTokenizer: Megatron-LM's tiktoken tokenizer on a BPE ranks file."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from megatron_rpt.data.tokenizers.base import Tokenizer, TokenizerError


def _megatron_tiktoken_conventions() -> tuple[dict[str, str], tuple[str, ...]]:
    """Megatron-Core's TikTokenizer split patterns (v1, v2) and fixed special tokens.

    Imported, not copied, so that our ids follow Megatron-Core's definition.
    """
    from megatron.core.tokenizers.text.libraries import tiktoken_tokenizer as mt
    return {"v1": mt._PATTERN_TIKTOKEN_V1, "v2": mt._PATTERN_TIKTOKEN_V2}, tuple(mt.SPECIAL_TOKENS)


def load_bpe_ranks(path: str) -> dict[bytes, int]:
    """BPE ranks from Megatron-LM's tiktoken JSON (a list of {rank, token_bytes, token_str}) or a
    `.tiktoken` file (one `base64 rank` per line, as cl100k_base or Qwen's ranks ship)."""
    import base64
    ranks: dict[bytes, int] = {}
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
        if not isinstance(vocab, list):
            raise TokenizerError(f"--tokenizer-model: {path} is not a tiktoken JSON vocabulary (a list)")
        for i, item in enumerate(vocab):
            if not isinstance(item, dict) or item.get("rank") != i or "token_bytes" not in item:
                raise TokenizerError(f"--tokenizer-model: {path}: entry {i} is not {{rank: {i}, token_bytes: ...}}")
            ranks[base64.b64decode(item["token_bytes"])] = i
    else:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise TokenizerError(f"--tokenizer-model: {path}:{lineno}: not a 'base64 rank' line") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"--tokenizer-model: {path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


class TikTokenizer(Tokenizer):
    """Megatron-LM's TikTokenizer: specials at ids 0..num_special_tokens-1 ("</s>" = 2 is eod), then
    the BPE ranks shifted by num_special_tokens.

    Ids equal Megatron-Core's `TikTokenTokenizer` for the same file, pattern, special-token count
    and vocabulary size, including Megatron's choice that special-token text in a document ("</s>")
    becomes the special id (as Hugging Face tokenizers do with their added tokens).
    `vocab_size` defaults to all the file's ranks plus the specials.
    """

    def __init__(self, path: str, *, pattern: str = "v2", num_special_tokens: int = 1000,
                 special_tokens: Optional[Sequence[str]] = None, vocab_size: Optional[int] = None):
        import tiktoken
        patterns, required = _megatron_tiktoken_conventions()
        if pattern not in patterns:
            raise TokenizerError(f"--tiktoken-pattern must be one of {', '.join(patterns)}, got {pattern!r}")
        specials = list(special_tokens) if special_tokens else list(required)
        if any(t not in specials for t in required) or len(set(specials)) != len(specials):
            raise TokenizerError("--tiktoken-special-tokens must be unique and include " + " ".join(required))
        if not len(specials) <= num_special_tokens:
            raise TokenizerError(f"--tiktoken-num-special-tokens {num_special_tokens} < {len(specials)} special tokens")
        ranks = load_bpe_ranks(path)
        if vocab_size is None:
            vocab_size = num_special_tokens + len(ranks)
        inner = vocab_size - num_special_tokens
        if not 256 <= inner <= len(ranks):
            raise TokenizerError(f"--vocab-size {vocab_size}: must leave 256..{len(ranks)} BPE ranks of {path} after "
                                 f"{num_special_tokens} special tokens")
        super().__init__(path=os.path.abspath(path), pattern=pattern, num_special_tokens=num_special_tokens,
                         vocab_size=vocab_size)
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special_tokens)]
        self._enc = tiktoken.Encoding(
            name=Path(path).stem, pat_str=patterns[pattern],
            mergeable_ranks={b: r + num_special_tokens for b, r in ranks.items() if r < inner},
            special_tokens={t: i for i, t in enumerate(specials)})
        self._specials = specials
        self.vocab_size = vocab_size
        self.eod = specials.index("</s>")
        self.pad = specials.index("<pad>")
        self.bos = specials.index("<s>")

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    @functools.cached_property
    def _table(self) -> list:
        # Special tokens (ids below num_special_tokens) decode to their text, as detokenize does.
        return [self._enc.decode_single_token_bytes(i) for i in range(self.vocab_size)]

    def _byte_table(self) -> list:
        return self._table
