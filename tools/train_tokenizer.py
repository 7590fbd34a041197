#!/usr/bin/env python
"""Train a tokenizer: sentencepiece (BPE or unigram) or Hugging Face byte-level BPE.

sentencepiece (default): writes PREFIX.model and PREFIX.vocab with <pad>/<unk>/<s>/<eod> specials,
loadable with --tokenizer-type SentencePieceTokenizer --tokenizer-model PREFIX.model.
--library huggingface: writes the folder PREFIX/ (vocab.json, merges.txt, tokenizer.json) with
<|endoftext|> (eod) and <|pad|>, loadable as GPT2BPETokenizer (--vocab-file/--merge-file) or
HuggingFaceTokenizer (--tokenizer-model PREFIX).
Library code: megatron_rpt.data.tokenizers.training (train_sentencepiece / train_byte_level_bpe).
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_rpt.data.jsonl import expand_inputs, iter_texts
from megatron_rpt.data.tokenizers import TokenizerError
from megatron_rpt.data.tokenizers.training import train_byte_level_bpe, train_sentencepiece


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--input", nargs="+", required=True,
                    help="jsonl[.gz] files (texts under --json-keys) or plain text files; globs allowed")
    ap.add_argument("--json-keys", nargs="+", default=["text"])
    ap.add_argument("--library", choices=["sentencepiece", "huggingface"], default="sentencepiece")
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                    help="unigram only with --library sentencepiece")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--output-prefix", required=True,
                    help="sentencepiece: writes PREFIX.model and PREFIX.vocab; huggingface: the folder PREFIX")
    ap.add_argument("--max-sentences", type=int, default=10_000,
                    help="train on a uniform sample of at most this many lines (bounds time and memory)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the line sample")
    ap.add_argument("--num-threads", type=int, default=2, help="sentencepiece training threads")
    args = ap.parse_args(argv)
    if args.library == "huggingface" and args.model_type != "bpe":
        ap.error("--library huggingface trains byte-level BPE only (--model-type bpe)")
    t0 = time.perf_counter()
    try:
        texts = iter_texts(expand_inputs(args.input), args.json_keys)
        if args.library == "huggingface":
            path = train_byte_level_bpe(texts, args.output_prefix, vocab_size=args.vocab_size,
                                        max_sentences=args.max_sentences, seed=args.seed)
            written = f"{path}/ (vocab.json, merges.txt, tokenizer.json)"
        else:
            path = train_sentencepiece(texts, args.output_prefix, vocab_size=args.vocab_size,
                                       model_type=args.model_type, max_sentences=args.max_sentences,
                                       seed=args.seed, num_threads=args.num_threads)
            written = f"{path} and {path.with_suffix('.vocab')}"
    except (TokenizerError, FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # sentencepiece's own errors, e.g. a vocab too large for the text
        print(f"error: sentencepiece training failed: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer written to {written} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
