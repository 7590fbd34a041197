#!/usr/bin/env python
"""Tokenize jsonl into Megatron indexed datasets ({prefix}_{key}_{document|sentence}.bin/.idx).

Megatron-LM's flags and output format (readable by Megatron-Core's IndexedDataset and so by
Megatron-LM); streams with bounded memory; output identical for any --workers/--partitions.
Behaviour: megatron_rpt.data.preprocess.
"""

import argparse
import sys

from megatron_rpt.data.jsonl import BadInputError
from megatron_rpt.data.preprocess import preprocess
from megatron_rpt.data.tokenizers import TokenizerError, add_tokenizer_arguments, tokenizer_kwargs_from_args


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    g = ap.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help="jsonl / jsonl.gz files or globs (several allowed)")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (one output per key)")
    g.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (Punkt, offline); output suffix _sentence")
    g.add_argument("--keep-newlines", action="store_true",
                   help="with --split-sentences: keep the whitespace and newlines after each sentence")
    g.add_argument("--lang", default="english", help="language of the Punkt model for --split-sentences")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines (reporting the count and the first locations) instead of stopping")
    g = ap.add_argument_group("tokenizer")
    add_tokenizer_arguments(g)
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g = ap.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True)
    g = ap.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    g.add_argument("--partitions", type=int, default=1,
                   help="read/decompress/write the input as N concurrent contiguous ranges (same output)")
    g.add_argument("--chunk-mb", type=float, default=1.0, help="input per worker task (memory ~ 2*workers+1 chunks)")
    g.add_argument("--log-interval", type=int, default=0,
                   help="also print a line every N documents (default off: the progress bar shows rates and ETA)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (batch logs)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tokenizer_kwargs = tokenizer_kwargs_from_args(args)
    try:
        stats = preprocess(args.input, args.output_prefix, json_keys=args.json_keys,
                           tokenizer_type=args.tokenizer_type, append_eod=args.append_eod,
                           split_sentences=args.split_sentences, keep_newlines=args.keep_newlines, lang=args.lang,
                           workers=args.workers, partitions=args.partitions, skip_bad_lines=args.skip_bad_lines,
                           chunk_bytes=max(1, int(args.chunk_mb * 2**20)), log_interval=args.log_interval,
                           progress=not args.no_progress, **tokenizer_kwargs)
    except (BadInputError, TokenizerError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mb = stats.bytes_read / 2**20
    print(f"{stats.documents} documents, {stats.tokens} tokens, {mb:.1f} MB in {stats.seconds:.1f} s "
          f"({mb / max(stats.seconds, 1e-9):.1f} MB/s, {stats.tokens / max(stats.seconds, 1e-9):,.0f} tokens/s)")
    for key, (bin_path, idx_path) in stats.outputs.items():
        print(f"  {key}: {bin_path} {idx_path}")
    if stats.skipped:
        print(f"skipped {stats.skipped} bad lines; first: " + "; ".join(stats.skipped_examples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
