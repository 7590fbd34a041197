#!/usr/bin/env python
"""Tokenize jsonl into Megatron indexed datasets ({prefix}_{key}_document.bin/.idx).

Megatron-LM compatible flags; see megatron_rpt.data.preprocess for the behaviour.
"""

import argparse
import sys

from megatron_rpt.data.preprocess import BadInputError, preprocess
from megatron_rpt.data.tokenizers import TOKENIZER_TYPES, TokenizerError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--input", nargs="+", required=True, help="jsonl / jsonl.gz files or globs")
    ap.add_argument("--json-keys", nargs="+", default=["text"])
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    ap.add_argument("--tokenizer-model")
    ap.add_argument("--vocab-file")
    ap.add_argument("--merge-file")
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--append-eod", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--log-interval", type=int, default=1000,
                    help="print a progress line every N documents (default 1000 as in Megatron-LM; 0: off)")
    ap.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines and report them")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        stats = preprocess(args.input, args.output_prefix, json_keys=args.json_keys, tokenizer_type=args.tokenizer_type,
                           tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                           merge_file=args.merge_file, vocab_size=args.vocab_size, append_eod=args.append_eod,
                           workers=args.workers, skip_bad_lines=args.skip_bad_lines, log_interval=args.log_interval,
                           progress=not args.no_progress)
    except (BadInputError, TokenizerError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{stats.documents} documents, {stats.tokens} tokens, {stats.bytes_read / 2**20:.1f} MB in "
          f"{stats.seconds:.1f} s ({stats.bytes_read / 2**20 / max(stats.seconds, 1e-9):.1f} MB/s)")
    for key, (bin_path, idx_path) in stats.outputs.items():
        print(f"  {key}: {bin_path} {idx_path}")
    if stats.skipped:
        print(f"skipped {stats.skipped} bad lines; first: " + "; ".join(stats.skipped_examples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
