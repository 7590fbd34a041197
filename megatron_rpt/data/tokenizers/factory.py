"""Tokenizers by Megatron-LM `--tokenizer-type` name: `build_tokenizer`, the data tools' flags
(`add_tokenizer_arguments`, `tokenizer_kwargs_from_args`) and a run configuration's tokenizer
(`tokenizer_from_config`)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from megatron_rpt.config.schema import TOKENIZER_TYPES  # the flag's choices; each one is built below
from megatron_rpt.data.tokenizers.base import Tokenizer, TokenizerError
from megatron_rpt.data.tokenizers.huggingface_tokenizer import GPT2BPETokenizer, HuggingFaceTokenizer
from megatron_rpt.data.tokenizers.null_tokenizer import NullTokenizer
from megatron_rpt.data.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from megatron_rpt.data.tokenizers.tiktoken_tokenizer import TikTokenizer


def _require_file(path: Optional[str], flag: str, kind: str) -> str:
    if path is None:
        raise TokenizerError(f"{kind} needs {flag}")
    if not os.path.exists(path):
        raise TokenizerError(f"{flag}: {path} not found")
    return path


def build_tokenizer(tokenizer_type: str, *, tokenizer_model: Optional[str] = None, vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None, vocab_size: Optional[int] = None, tiktoken_pattern: str = "v2",
                    tiktoken_num_special_tokens: int = 1000,
                    tiktoken_special_tokens: Optional[Sequence[str]] = None) -> Tokenizer:
    """The tokenizer for Megatron-LM's --tokenizer-type and file flags."""
    if tokenizer_type == "TikTokenizer":
        return TikTokenizer(_require_file(tokenizer_model, "--tokenizer-model", tokenizer_type),
                            pattern=tiktoken_pattern, num_special_tokens=tiktoken_num_special_tokens,
                            special_tokens=tiktoken_special_tokens, vocab_size=vocab_size)
    if tokenizer_type in ("SentencePieceTokenizer", "Llama2Tokenizer"):
        return SentencePieceTokenizer(_require_file(tokenizer_model, "--tokenizer-model", tokenizer_type),
                                      eod_is_eos=tokenizer_type == "Llama2Tokenizer")
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(_require_file(tokenizer_model, "--tokenizer-model", tokenizer_type))
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(_require_file(vocab_file, "--vocab-file", tokenizer_type),
                                _require_file(merge_file, "--merge-file", tokenizer_type))
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or int(vocab_size) < 1:
            raise TokenizerError("NullTokenizer needs --vocab-size >= 1")
        return NullTokenizer(int(vocab_size))
    raise TokenizerError(f"--tokenizer-type: unknown {tokenizer_type!r}; known: {', '.join(TOKENIZER_TYPES)}")


def add_tokenizer_arguments(group) -> None:
    """The tokenizer flags of the data tools (Megatron-LM's names), on an argparse group."""
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", help="sentencepiece .model, HF tokenizer folder/json, or tiktoken ranks")
    group.add_argument("--vocab-file")
    group.add_argument("--merge-file")
    group.add_argument("--vocab-size", type=int, help="NullTokenizer size; TikTokenizer size (default: all ranks)")
    group.add_argument("--tiktoken-pattern", default="v2", choices=["v1", "v2"])
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
    group.add_argument("--tiktoken-special-tokens", nargs="+")


def tokenizer_kwargs_from_args(args) -> dict:
    """`build_tokenizer` keyword arguments (all but the type) from `add_tokenizer_arguments`' flags."""
    kwargs = dict(tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file, merge_file=args.merge_file,
                  vocab_size=args.vocab_size)
    if args.tokenizer_type == "TikTokenizer":
        kwargs.update(tiktoken_pattern=args.tiktoken_pattern, tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
                      tiktoken_special_tokens=args.tiktoken_special_tokens)
    return kwargs


def tokenizer_from_config(cfg) -> Tokenizer:
    """The tokenizer of a run configuration's --tokenizer-* flags (NullTokenizer when none is given).

    `cfg` is a `config.schema.RunConfig` (not imported here: the config package imports this module).
    """
    d = cfg.data
    kind = d.tokenizer_type or "NullTokenizer"
    tiktoken = dict(tiktoken_pattern=d.tiktoken_pattern, tiktoken_num_special_tokens=d.tiktoken_num_special_tokens,
                    tiktoken_special_tokens=d.tiktoken_special_tokens or None) if kind == "TikTokenizer" else {}
    return build_tokenizer(kind, tokenizer_model=d.tokenizer_model, vocab_file=d.vocab_file,
                           merge_file=d.merge_file, vocab_size=cfg.model.vocab_size, **tiktoken)
