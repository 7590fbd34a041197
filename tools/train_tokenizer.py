#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE or unigram) with <pad>/<unk>/<s>/<eod> specials.

Writes PREFIX.model and PREFIX.vocab, loadable with
--tokenizer-type SentencePieceTokenizer --tokenizer-model PREFIX.model.
Library code: megatron_rpt.data.tokenizers.train_sentencepiece.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_rpt.data.preprocess import expand_inputs
from megatron_rpt.data.tokenizers import TokenizerError, iter_texts, train_sentencepiece


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--input", nargs="+", required=True,
                    help="jsonl[.gz] files (texts under --json-keys) or plain text files; globs allowed")
    ap.add_argument("--json-keys", nargs="+", default=["text"])
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    ap.add_argument("--max-sentences", type=int, default=10_000,
                    help="train on a uniform sample of at most this many lines (bounds time and memory)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the line sample")
    ap.add_argument("--num-threads", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = train_sentencepiece(iter_texts(expand_inputs(args.input), args.json_keys), args.output_prefix,
                                   vocab_size=args.vocab_size, model_type=args.model_type,
                                   max_sentences=args.max_sentences, seed=args.seed, num_threads=args.num_threads)
    except (TokenizerError, FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # sentencepiece's own errors, e.g. a vocab too large for the text
        print(f"error: sentencepiece training failed: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer written to {path} and {path.with_suffix('.vocab')} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
