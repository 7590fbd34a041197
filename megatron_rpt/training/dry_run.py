"""`mrpt-pretrain ... --dry-run` / `mrpt-rpt ... --dry-run`: check a launch line on a login node.

Every flag is validated as the real launch would (the world size from the launcher's environment:
WORLD_SIZE or SLURM_NTASKS), data prefixes and tokenizer files are checked where given, and the
resolved model, parallel layout, parameter counts and a per-GPU memory estimate
(`models.memory`) are printed; no process group, device or model is created. What depends on the
machine the job runs on (a CUDA GPU, Transformer Engine, compute capability) is listed as
"checked at launch". Problems are one ConfigError (the entry point prints it and exits 2).
"""

from __future__ import annotations

from typing import Callable, Optional

from megatron_rpt.config.schedule import schedule_summary
from megatron_rpt.config.schema import RunConfig
from megatron_rpt.config.validation import FP8_MIN_CAPABILITY


def launch_requirements(cfg: RunConfig) -> list[str]:
    """What the run asks of the machine it will run on (checked at launch, not here)."""
    m, p, f, t = cfg.model, cfg.parallel, cfg.fp8, cfg.training
    needs = []
    if not t.use_cpu:
        needs.append("a CUDA GPU per rank (else --use-cpu)")
    if f.fp8_format:
        major, minor = FP8_MIN_CAPABILITY[f.fp8_recipe]
        needs.append(f"Transformer Engine and compute capability >= {major}.{minor} (--fp8-format {f.fp8_format} "
                     f"--fp8-recipe {f.fp8_recipe})")
    if m.moe_grouped_gemm:
        needs.append("Transformer Engine (--moe-grouped-gemm)")
    if p.context_parallel_size > 1:
        needs.append(f"Transformer Engine's attention (--context-parallel-size {p.context_parallel_size})")
    return needs


def dry_run(cfg: RunConfig, validate: Optional[Callable] = None, environ=None) -> None:
    """Validate `cfg` for the launch's world size and print what the run would be (module docstring)."""
    from megatron_rpt.data.tokenizers import tokenizer_from_config
    from megatron_rpt.distributed import launch_world_size
    from megatron_rpt.models.flops import count_parameters, training_flops_per_token
    from megatron_rpt.models.gpt import num_virtual_stages, run_vocab_size
    from megatron_rpt.models.memory import GIB, estimate_memory
    from megatron_rpt.validate import validate_config

    world, source = launch_world_size(environ)
    (validate or validate_config)(cfg, world)
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tokenizer = tokenizer_from_config(cfg)
    vocab = run_vocab_size(tokenizer.vocab_size, cfg)
    tp, pp, cp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                      p.expert_model_parallel_size)
    dp = world // (tp * pp * cp)
    vp = num_virtual_stages(cfg)
    params = count_parameters(m, vocab)
    mem = estimate_memory(cfg, vocab, world)
    lines = [
        f"> dry run: world size {world} from {source}; no process group started",
        f"> layout: TP={tp} PP={pp}{f' (VPP={vp})' if vp else ''} CP={cp} EP={ep} "
        f"ETP={p.expert_tensor_parallel_size or tp} DP={dp}; sequence parallel "
        f"{'on' if p.sequence_parallel else 'off'}; distributed optimizer "
        f"{'on' if p.use_distributed_optimizer else 'off'}",
        f"> model: {m.num_layers} layers, hidden {m.hidden_size}, sequence {m.seq_length}, vocab {vocab} "
        f"(padded from {tokenizer.vocab_size})",
        f"> architecture: {m.describe()}",
        f"> parameters: {params.total / 1e9:.3f}B total ({params.non_embedding / 1e9:.3f}B non-embedding)"
        + (f", {params.active / 1e9:.3f}B active ({params.active_non_embedding / 1e9:.3f}B non-embedding)"
           if params.active != params.total else ""),
        f"> training: global batch {t.global_batch_size} x {m.seq_length} tokens, micro batch "
        f"{t.micro_batch_size}, {t.global_batch_size // (t.micro_batch_size * dp)} micro-batches per step, "
        f"{t.train_iters} iterations{schedule_summary(cfg)}; {training_flops_per_token(m, vocab) / 1e9:.2f} GFLOP "
        "per token",
        f"> memory per GPU (estimate, busiest pipeline stage): {mem.total / GIB:.1f} GiB = weights "
        f"{mem.weights / GIB:.2f} + gradients {mem.gradients / GIB:.2f} + optimizer {mem.optimizer / GIB:.2f} "
        f"+ activations {mem.activations / GIB:.2f} + logits {mem.logits / GIB:.2f} "
        f"({(mem.dense_params + mem.expert_params) / 1e6:.1f}M parameters per GPU)",
    ]
    needs = launch_requirements(cfg)
    lines.append("> checked at launch: " + ("; ".join(needs) if needs else "nothing machine-specific"))
    print("\n".join(lines), flush=True)
