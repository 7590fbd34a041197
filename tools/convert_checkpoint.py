#!/usr/bin/env python
"""Convert between Hugging Face folders and megatron-rpt (Megatron-Core torch_dist) checkpoints.

  import --hf-dir HF_DIR --save CKPT_DIR [--tensor-model-parallel-size N --pipeline-model-parallel-size N
         --expert-model-parallel-size N] [--force]
      LlamaForCausalLM / Qwen3ForCausalLM / Qwen3MoeForCausalLM safetensors -> a model-only checkpoint
      that `mrpt-pretrain --load CKPT_DIR` starts from. The checkpoint reshards on load (any TP/PP/EP);
      the sizes given are checked against the model and recorded in its run configuration.
  export --load CKPT_DIR --output HF_DIR [--dtype bf16|fp32|fp16] [--iteration N] [--max-shard-size 2GB]
         [--force]
      a checkpoint saved at any layout -> config.json, generation_config.json, safetensors shards
      (+ index), tokenizer files.
Both stream one tensor at a time (peak memory ~ the largest tensor + one output shard).
Library code: megatron_rpt.convert.checkpoint.
"""

from __future__ import annotations

import argparse
import sys


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            value = int(float(t[: -len(unit)]) * factor)
            if value > 0:
                return value
    raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB or 2GB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face folder -> checkpoint")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--save", required=True)
    imp.add_argument("--force", action="store_true", help="replace a non-empty --save folder")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--expert-model-parallel-size", type=int, default=1)
    exp = sub.add_parser("export", help="checkpoint -> Hugging Face folder")
    exp.add_argument("--load", required=True)
    exp.add_argument("--output", required=True)
    exp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    exp.add_argument("--iteration", type=int)
    exp.add_argument("--force", action="store_true", help="replace a non-empty --output folder")
    exp.add_argument("--max-shard-size", type=_size, default="2GB",
                     help="largest safetensors file (e.g. 500MB, 5GB; a larger single tensor gets its own file)")
    for p in (imp, exp):
        p.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from megatron_rpt.convert.checkpoint import ConversionError, export_hf, import_hf
    from megatron_rpt.checkpoint.layout import CheckpointError
    try:
        if args.command == "import":
            layout = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                      args.expert_model_parallel_size)
            r = import_hf(args.hf_dir, args.save, force=args.force, progress=not args.no_progress, layout=layout)
            from megatron_rpt.config.arguments import model_flags_argv
            flags = model_flags_argv(r["flags"])
            print(f"imported {r['architecture']} -> {r['path']}")
            print("the run configuration is recorded in the checkpoint; train from it with e.g.\n  mrpt-pretrain --load "
                  f"{args.save} " + " ".join(flags) + f" --vocab-size {r['vocab_size']}"
                  + (f" --tokenizer-type HuggingFaceTokenizer --tokenizer-model {r['tokenizer']}" if r["tokenizer"]
                     else "") + " ...")
        else:
            r = export_hf(args.load, args.output, dtype=args.dtype, iteration=args.iteration, force=args.force,
                          progress=not args.no_progress, shard_bytes=args.max_shard_size)
            print(f"exported iteration {r['iteration']} as {r['architecture']} -> {r['path']} ({r['files']} file(s))")
    except (ConversionError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from megatron_rpt.distributed import exit_without_teardown
    exit_without_teardown(main())
