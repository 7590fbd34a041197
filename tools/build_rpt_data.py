#!/usr/bin/env python
"""Build RPT next-token-reasoning tasks from a jsonl corpus with a proxy model's entropy filter.

Writes PREFIX_train.jsonl, PREFIX_heldout.jsonl (held out by document) and PREFIX.meta.json;
resumable: rerun the same command after an interruption (byte-identical result).
Tokenizer flags as tools/preprocess_data.py (the POLICY's tokenizer); the proxy is a Hugging Face
folder (--proxy-hf-dir) or a megatron-rpt checkpoint (--proxy-load). Behaviour: megatron_rpt.rpt.tasks.
"""

from __future__ import annotations

import argparse
import os
import sys


def _heldout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"{text}: a document count (integer >= 1) or a fraction in [0, 1)")
    return int(value) if value >= 1 else value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    g = ap.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help="jsonl / jsonl.gz files or globs")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="the ONE key holding each document's text")
    g.add_argument("--doc-id-key", help="key of a unique document id (default: FILE_NAME:LINE)")
    g = ap.add_argument_group("tokenizer (the policy's)")
    from megatron_rpt.data.tokenizers import add_tokenizer_arguments
    add_tokenizer_arguments(g)
    g = ap.add_argument_group("proxy model (entropy filter)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--proxy-hf-dir", help="Hugging Face causal LM folder (safetensors)")
    src.add_argument("--proxy-load", help="megatron-rpt checkpoint folder (e.g. from tools/convert_checkpoint.py "
                                          "import), run single-process")
    g.add_argument("--proxy-ckpt-step", type=int, help="--proxy-load iteration (default: the latest)")
    g.add_argument("--proxy-seq-length", type=int, default=2048,
                   help="window length; long documents are scored in windows overlapping by --min-context-tokens")
    g.add_argument("--proxy-dtype", default="fp32", choices=["fp32", "fp64"],
                   help="proxy arithmetic; fp64 to check results (transformers keeps RMSNorm and RoPE in fp32)")
    g.add_argument("--proxy-device", default="cpu", choices=["cpu", "cuda"], help="--proxy-hf-dir device")
    g.add_argument("--proxy-threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    g.add_argument("--batch-size", type=int, default=8,
                   help="windows per proxy forward (entropies agree to ~1e-6 nats across sizes; a resumed run "
                        "must use the same)")
    g = ap.add_argument_group("task selection")
    g.add_argument("--entropy-threshold", type=float, default=0.5,
                   help="keep positions whose proxy top-16 entropy (nats) exceeds this (paper splits: easy > 0.5, "
                        "medium > 1.0, hard > 1.5)")
    g.add_argument("--min-context-tokens", type=int, default=32,
                   help="positions need at least this many tokens of context (in the document and in the window)")
    g.add_argument("--target-tokens", type=int, default=16, help="ground-truth tokens stored per task")
    g.add_argument("--max-tasks-per-doc", type=int, help="at most N tasks per document (seeded choice)")
    g.add_argument("--heldout-docs", type=_heldout, default=0,
                   help="documents held out for evaluation: a count, or a fraction < 1 (seeded choice)")
    g.add_argument("--seed", type=int, default=1234)
    g = ap.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.json_keys) != 1:
        print(f"error: --json-keys takes exactly one key for RPT tasks, got {len(args.json_keys)}", file=sys.stderr)
        return 2
    import torch

    from megatron_rpt.data.tokenizers import TokenizerError, build_tokenizer, tokenizer_kwargs_from_args
    from megatron_rpt.rpt.tasks import BuildConfig, HFProxy, MegatronProxy, TaskError, build_tasks, scan_documents
    torch.set_num_threads(max(1, args.proxy_threads))
    tokenizer_kwargs = tokenizer_kwargs_from_args(args)
    cfg = BuildConfig(inputs=args.input, output_prefix=args.output_prefix, json_key=args.json_keys[0],
                      doc_id_key=args.doc_id_key, entropy_threshold=args.entropy_threshold,
                      min_context_tokens=args.min_context_tokens, target_tokens=args.target_tokens,
                      proxy_seq_length=args.proxy_seq_length, batch_size=args.batch_size,
                      heldout_docs=args.heldout_docs, max_tasks_per_doc=args.max_tasks_per_doc, seed=args.seed,
                      progress=not args.no_progress)
    proxy = None
    try:
        cfg.validate()
        tokenizer = build_tokenizer(args.tokenizer_type, **tokenizer_kwargs)
        n_docs = scan_documents(cfg, tokenizer)   # input problems are reported before the (slow) proxy loads
        if args.proxy_hf_dir:
            if args.proxy_device == "cuda" and not torch.cuda.is_available():
                raise TaskError("--proxy-device cuda: no CUDA device")
            proxy = HFProxy(args.proxy_hf_dir, device=args.proxy_device, dtype=args.proxy_dtype)
        else:
            proxy = MegatronProxy(args.proxy_load, args.proxy_ckpt_step, dtype=args.proxy_dtype)
        r = build_tasks(cfg, tokenizer, proxy, n_docs)
    except (TaskError, TokenizerError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if proxy is not None:
            proxy.close()
    c, run = r["counts"], r["run"]
    secs = max(run["seconds"], 1e-9)
    for split in ("train", "heldout"):
        s = c[split]
        print(f"{split}: {s['documents']} documents, {s['tasks']} tasks (easy {s['easy']}, medium {s['medium']}, "
              f"hard {s['hard']}) -> {args.output_prefix}_{split}.jsonl")
    print(f"{c['positions_scored']} positions scored; this run: {run['new_positions_scored']} positions, "
          f"{run['new_tasks']} tasks in {run['seconds']:.1f} s ({run['new_positions_scored'] / secs:,.0f} "
          f"positions/s, {run['new_tasks'] / secs:,.1f} tasks/s)")
    return 0


if __name__ == "__main__":
    # --proxy-load runs a 1-rank gloo group: leave without the teardown that can abort (exit_without_teardown)
    from megatron_rpt.distributed import exit_without_teardown
    exit_without_teardown(main())
