"""Check an sbatch script's mrpt-pretrain / mrpt-rpt flags without a cluster, as the program would at start-up.

The script is run with MRPT_PRINT_ARGS=1 (it prints its arguments one per line and exits before
touching anything), --nodes / --ntasks-per-node come from its `#SBATCH --key=value` header (or
--nodes here), and the flags go through megatron_rpt.config.parse_args + validate_config (scripts
with MRPT_ENTRY=mrpt-rpt: parse_rpt_args + validate_rpt_config) with world size = nodes x tasks
per node. Data and tokenizer paths are checked only with --check-files.

    python examples/slurm/check_flags.py [SCRIPT] [--nodes N] [--check-files]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository, when not installed


def sbatch_header(path: str) -> dict[str, str]:
    """`#SBATCH --key=value` lines (not `##SBATCH`) -> {key: value}."""
    header = {}
    for line in open(path):
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            header[m.group(1)] = m.group(2) or ""
    return header


def script_args(path: str) -> list[str]:
    env = dict(os.environ, MRPT_PRINT_ARGS="1")
    out = subprocess.run(["bash", path], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{path}: exited with {out.returncode} in MRPT_PRINT_ARGS mode:\n{out.stderr}")
    return out.stdout.splitlines()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("script", nargs="?", default=os.path.join(HERE, "pretrain_moe_10b.sbatch"))
    ap.add_argument("--nodes", type=int, help="override the #SBATCH --nodes of the script")
    ap.add_argument("--check-files", action="store_true", help="also check data and tokenizer paths")
    ap.add_argument("--vocab", type=int, default=151643, help="tokenizer vocabulary for the summary "
                    "(default: Qwen's 151,643 BPE ranks)")
    a = ap.parse_args(argv)

    from megatron_rpt.config import ConfigError, data_parallel_size, parse_args, parse_rpt_args
    from megatron_rpt.config.schedule import samples_after
    from megatron_rpt.validate import validate_config, validate_rpt_config
    from megatron_rpt.models.flops import count_parameters, training_flops_per_token
    from megatron_rpt.models.gpt import padded_vocab_size

    header = sbatch_header(a.script)
    nodes = a.nodes or int(header.get("nodes", 1))
    tasks = int(header.get("ntasks-per-node", 1))
    world = nodes * tasks
    flags = script_args(a.script)
    rpt = re.search(r"^\s*MRPT_ENTRY=mrpt-rpt\b", open(a.script).read(), re.M) is not None
    cfg = (parse_rpt_args if rpt else parse_args)(flags)
    try:
        (validate_rpt_config if rpt else validate_config)(cfg, world, check_files=a.check_files)
    except ConfigError as e:
        print(f"{a.script} with {nodes} nodes x {tasks} tasks: {e}", file=sys.stderr)
        return 1

    m, p, t = cfg.model, cfg.parallel, cfg.training
    dp = data_parallel_size(cfg, world)
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    vocab = padded_vocab_size(a.vocab, m.make_vocab_size_divisible_by, p.tensor_model_parallel_size)
    params = count_parameters(m, vocab)
    tokens = t.global_batch_size * m.seq_length
    print(f"ok: {len(flags)} arguments of {os.path.basename(a.script)} validate for {nodes} nodes x "
          f"{tasks} tasks = world size {world}")
    print(f"  layout: TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size} "
          f"EP={ep} ETP={etp} DP={dp} expert-DP={world // (ep * etp * p.pipeline_model_parallel_size)}")
    print(f"  batch: {t.global_batch_size} x {m.seq_length} = {tokens:,} tokens per step{' at most' if rpt else ''}, "
          f"{t.global_batch_size // (t.micro_batch_size * dp)} micro-batches of {t.micro_batch_size} per rank, "
          f"{t.train_iters} steps = {samples_after(cfg, t.train_iters) * m.seq_length / 1e9:.1f}B tokens")
    if rpt:
        r = cfg.rpt
        print(f"  RPT: {r.rpt_contexts_per_step} contexts x G={r.rpt_group_size} per step "
              f"({r.rpt_contexts_per_step // dp} contexts per DP rank), responses up to {r.rpt_max_response_length} "
              f"tokens, engine {r.rollout_engine}")
    if m.num_experts:
        print(f"  model (vocab {vocab}): {params.total / 1e9:.3f}B parameters, {params.active / 1e9:.3f}B active, "
              f"{training_flops_per_token(m, vocab) / 1e9:.3f} GFLOP per trained token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
