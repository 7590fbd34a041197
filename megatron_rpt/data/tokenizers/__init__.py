"""Tokenizers by Megatron-LM `--tokenizer-type` name (one module per family) and their factory.

Layout: `base` (the `Tokenizer` interface, `TokenizerError`), `sentencepiece_tokenizer`,
`huggingface_tokenizer` (HuggingFaceTokenizer, GPT2BPETokenizer, the tiktoken equivalence proof),
`tiktoken_tokenizer`, `null_tokenizer`, `factory` (`build_tokenizer`, the tools' flags,
`tokenizer_from_config`, `TOKENIZER_TYPES`) and `training` (train_sentencepiece,
train_byte_level_bpe). This package exports the interface, the tokenizers and the factory.
"""

from megatron_rpt.data.tokenizers.base import Tokenizer, TokenizerError
from megatron_rpt.data.tokenizers.factory import (TOKENIZER_TYPES, add_tokenizer_arguments, build_tokenizer,
                                                  tokenizer_from_config, tokenizer_kwargs_from_args)
from megatron_rpt.data.tokenizers.huggingface_tokenizer import GPT2BPETokenizer, HuggingFaceTokenizer
from megatron_rpt.data.tokenizers.null_tokenizer import NullTokenizer
from megatron_rpt.data.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from megatron_rpt.data.tokenizers.tiktoken_tokenizer import TikTokenizer

__all__ = ["GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer", "SentencePieceTokenizer", "TOKENIZER_TYPES",
           "TikTokenizer", "Tokenizer", "TokenizerError", "add_tokenizer_arguments", "build_tokenizer",
           "tokenizer_from_config", "tokenizer_kwargs_from_args"]
