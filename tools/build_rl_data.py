#!/usr/bin/env python
"""Build RLVR problem files (questions with verifiable final answers) for `mrpt-rpt --rl-reward math_answer`.

Writes PREFIX_train.jsonl, PREFIX_heldout.jsonl and PREFIX.meta.json (format "mrpt-rl-problems/1"),
each under a temporary name and renamed when complete, from a reasoning-gym procedural dataset
(`--dataset chain_sum --dataset-config '{"min_terms": 2}'`; train and held-out drawn with different
seeds, held-out questions deduplicated against train) or the CHAMP competition problems (`--champ`;
those without a short final answer are skipped). Behaviour: megatron_rpt.rpt.tasks.problem_sources.
"""

from __future__ import annotations

import argparse
import json
import sys


def _config(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a JSON object of the dataset's config fields")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a reasoning-gym dataset name (e.g. chain_sum, basic_arithmetic, gsm_symbolic)")
    src.add_argument("--champ", action="store_true", help="the CHAMP competition problems (package champ-dataset)")
    ap.add_argument("--dataset-config", type=_config, default={}, help="reasoning-gym config fields as a JSON object")
    ap.add_argument("--train-size", type=_count, help="training problems (--dataset; CHAMP: all not held out)")
    ap.add_argument("--heldout-size", type=_count, default=0, help="held-out problems")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--output-prefix", required=True)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rpt.rpt.tasks import TaskError
    from megatron_rpt.rpt.tasks.problem_sources import (champ_problem_set, reasoning_gym_problems,
                                                        write_problem_files)
    try:
        if args.champ:
            if args.train_size is not None or args.dataset_config:
                raise TaskError("--champ takes --heldout-size only (train is every other problem)")
            from megatron_rpt.demo_assets.corpus import CorpusError, champ_problems
            try:
                records = champ_problems()
            except CorpusError as e:
                raise TaskError(str(e)) from None
            train, heldout, skipped = champ_problem_set(records, args.heldout_size, args.seed)
            meta = {"source": "champ", "seed": args.seed, "skipped_without_short_answer": skipped}
        else:
            if args.train_size is None:
                raise TaskError("--dataset needs --train-size")
            train, heldout = reasoning_gym_problems(args.dataset, args.dataset_config, args.train_size,
                                                    args.heldout_size, args.seed)
            meta = {"source": f"reasoning_gym/{args.dataset}", "dataset_config": args.dataset_config,
                    "seed": args.seed}
        meta = write_problem_files(args.output_prefix, train, heldout, {"family": "math", **meta})
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{meta['source']}: {meta['train']} train -> {args.output_prefix}_train.jsonl, {meta['heldout']} held-out "
          f"-> {args.output_prefix}_heldout.jsonl"
          + (f"; {meta['skipped_without_short_answer']} skipped (no short final answer)" if args.champ else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
