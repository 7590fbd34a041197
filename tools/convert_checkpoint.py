#!/usr/bin/env python
"""Convert between Hugging Face folders and megatron-rpt (Megatron-Core torch_dist) checkpoints.

  import --hf-dir HF_DIR --save CKPT_DIR [--force]
      LlamaForCausalLM / Qwen3ForCausalLM / Qwen3MoeForCausalLM safetensors -> a model-only checkpoint
      that `mrpt-pretrain --load CKPT_DIR` starts from (any TP/PP/EP; it reshards on load).
  export --load CKPT_DIR --output HF_DIR [--dtype bf16|fp32|fp16] [--iteration N] [--force]
      a checkpoint saved at any layout -> config.json, generation_config.json, safetensors shards
      (+ index), tokenizer files.
Library code: megatron_rpt.convert.checkpoint.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face folder -> checkpoint")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--save", required=True)
    imp.add_argument("--force", action="store_true", help="replace a non-empty --save folder")
    exp = sub.add_parser("export", help="checkpoint -> Hugging Face folder")
    exp.add_argument("--load", required=True)
    exp.add_argument("--output", required=True)
    exp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    exp.add_argument("--iteration", type=int)
    exp.add_argument("--force", action="store_true", help="replace a non-empty --output folder")
    for p in (imp, exp):
        p.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from megatron_rpt.convert.checkpoint import ConversionError, export_hf, import_hf
    from megatron_rpt.platform import quiet_optional_backend_warnings
    quiet_optional_backend_warnings()
    try:
        if args.command == "import":
            r = import_hf(args.hf_dir, args.save, force=args.force, progress=not args.no_progress)
            flags = " ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else
                             (f"--{k.replace('_', '-')}" if v else "") for k, v in r["flags"].items()).split()
            print(f"imported {r['architecture']} -> {r['path']}")
            print("the run configuration is recorded in the checkpoint; train from it with e.g.\n  mrpt-pretrain --load "
                  f"{args.save} " + " ".join(flags) + f" --vocab-size {r['vocab_size']}"
                  + (f" --tokenizer-type HuggingFaceTokenizer --tokenizer-model {r['tokenizer']}" if r["tokenizer"]
                     else "") + " ...")
        else:
            r = export_hf(args.load, args.output, dtype=args.dtype, iteration=args.iteration, force=args.force,
                          progress=not args.no_progress)
            print(f"exported iteration {r['iteration']} as {r['architecture']} -> {r['path']} ({r['files']} file(s))")
    except (ConversionError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
