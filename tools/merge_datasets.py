#!/usr/bin/env python
"""Merge several Megatron indexed datasets (.bin/.idx prefixes) into one, in the given order.

Megatron-LM's tools/merge_datasets.py flags (--input DIR merges every prefix in a folder, sorted;
--output-prefix) plus explicit prefixes (--datasets A B ...). Streams with constant memory;
the output appears only when complete. Library code: megatron_rpt.data.indexed.merge_datasets.
"""

from __future__ import annotations

import argparse
import os
import sys
import time



def find_prefixes(folder: str) -> list[str]:
    """Sorted prefixes of the complete .bin/.idx pairs in a folder; a clear error for a half pair."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--input: {folder} is not a folder")
    names = set(os.listdir(folder))
    stems = sorted({n[:-4] for n in names if n.endswith((".bin", ".idx"))})
    for stem in stems:
        for ext in (".bin", ".idx"):
            if stem + ext not in names:
                raise FileNotFoundError(f"--input: {os.path.join(folder, stem + ext)} missing (its pair exists)")
    if not stems:
        raise FileNotFoundError(f"--input: no .bin/.idx pairs in {folder}")
    return [os.path.join(folder, s) for s in stems]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="folder whose .bin/.idx pairs are merged (sorted by name)")
    src.add_argument("--datasets", nargs="+", help="prefixes to merge, in this order")
    ap.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    args = ap.parse_args(argv)
    from megatron_rpt.data.indexed import merge_datasets
    t0 = time.perf_counter()
    try:
        prefixes = find_prefixes(args.input) if args.input else args.datasets
        out = os.path.abspath(args.output_prefix)
        prefixes = [p for p in prefixes if os.path.abspath(p) != out] if args.input else prefixes
        writer = merge_datasets(prefixes, args.output_prefix)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(prefixes)} datasets: {writer.documents} documents, {writer.sequences} sequences, "
          f"{writer.tokens} tokens -> {args.output_prefix}.bin/.idx ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
