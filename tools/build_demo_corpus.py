#!/usr/bin/env python
"""Build the offline demo corpus (Jane Austen + Moby Dick from Debian packages) as jsonl.

Writes OUTPUT_DIR/demo_corpus.jsonl ({"text", "source", "title"} per line), reusing an existing
complete file unless --force. With --math, writes OUTPUT_DIR/math_corpus.jsonl instead: 270
competition math problems with worked solutions (PyPI champ-dataset), the RPT demo corpus.
See megatron_rpt.demo_assets.corpus for where the texts come from.
"""

from __future__ import annotations

import argparse
import sys

from megatron_rpt.demo_assets.corpus import PACKAGES, CorpusError, build_demo_corpus, math_corpus


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--output-dir", required=True, help="folder for demo_corpus.jsonl / math_corpus.jsonl")
    ap.add_argument("--sources", nargs="+", default=list(PACKAGES), choices=sorted(PACKAGES))
    ap.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    ap.add_argument("--math", action="store_true",
                    help="build math_corpus.jsonl (problems + worked solutions, champ-dataset) instead")
    args = ap.parse_args(argv)
    try:
        if args.math:
            path = math_corpus(args.output_dir, force=args.force)
        else:
            path = build_demo_corpus(args.output_dir, sources=tuple(args.sources), force=args.force)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
