#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE or unigram) with <pad>/<unk>/<s>/<eod> specials.

Writes PREFIX.model and PREFIX.vocab, loadable with
--tokenizer-type SentencePieceTokenizer --tokenizer-model PREFIX.model.
"""

import argparse
import sys
import time

from megatron_rpt.data.preprocess import BadInputError, expand_inputs
from megatron_rpt.data.tokenizers import TokenizerError, train_sentencepiece


def _texts(files, keys):
    import gzip
    import json
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if path.endswith((".jsonl", ".json", ".jsonl.gz")):
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadInputError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                    for key in keys:
                        if not isinstance(obj.get(key), str):
                            raise BadInputError(f"{path}:{lineno}: missing or non-string key {key!r}")
                        yield obj[key]
                else:
                    yield line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--input", nargs="+", required=True, help="jsonl (uses --json-keys) or plain text files")
    ap.add_argument("--json-keys", nargs="+", default=["text"])
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--max-sentences", type=int, default=2_000_000)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = train_sentencepiece(_texts(expand_inputs(args.input), args.json_keys), args.output_prefix,
                                   vocab_size=args.vocab_size, model_type=args.model_type,
                                   max_sentences=args.max_sentences)
    except (BadInputError, TokenizerError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # sentencepiece's own errors, e.g. vocab too large for the text
        print(f"error: sentencepiece training failed: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer written to {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
