"""Megatron-LM flags that megatron-rpt does not carry as configuration fields, each with what a launch
line containing it gets: accepted with one printed line saying why it changes nothing here
(`IGNORED`), or refused with the reason and what to use instead (`REFUSED`). Flags in neither table
and not ours are unknown. `config.arguments` collects every such flag of a command line and reports
all refusals and unknown flags together in one ConfigError, so a Megatron-LM script is fixed in one
pass instead of one argparse error at a time.

Each entry: flag -> (number of values it takes, reason). A flag taking one value consumes the next
token unless that starts with "--"; `VALUES` restricts the accepted values of an ignored flag.
"""

from __future__ import annotations

_NOT_YET = "not implemented in megatron-rpt yet"

IGNORED: dict[str, tuple[int, str]] = {
    "--use-mcore-models": (0, "megatron-rpt always builds Megatron-Core models"),
    "--attention-backend": (1, "the attention kernel follows the platform: Transformer Engine's fused/flash "
                               "attention on CUDA with TE, Megatron-Core's local attention elsewhere"),
    "--use-flash-attn": (0, "the attention kernel follows the platform (Transformer Engine's flash attention "
                            "on CUDA with TE)"),
    "--no-masked-softmax-fusion": (0, "the masked-softmax fusion is always off here (local layers); TE's "
                                      "attention has its own kernels"),
    "--no-position-embedding": (0, "deprecated in Megatron-LM; --position-embedding-type decides"),
    "--cross-entropy-loss-fusion": (0, "the loss is megatron-rpt's vocab-parallel loss (--loss-function), "
                                       "fused on CUDA by its own kernels"),
    "--tp-comm-overlap": (0, f"{_NOT_YET}: tensor-parallel communication is not overlapped with GEMMs"),
    "--overlap-p2p-comm": (0, f"{_NOT_YET}: pipeline sends/receives are not overlapped"),
    "--no-create-attention-mask-in-dataloader": (0, "the data loader builds attention masks only where the "
                                                    "attention needs one (local attention, without Transformer "
                                                    "Engine)"),
    "--ckpt-format": (1, "checkpoints are torch_dist (Megatron-Core dist_checkpointing)"),
    "--use-persistent-ckpt-worker": (0, "--async-save forks one writer process per save (Megatron-Core's "
                                        "temporal caller); a persistent worker is not implemented"),
    "--async-strategy": (1, "--async-save uses Megatron-Core's own writer (mcore), not nvidia-resiliency-ext's"),
    "--record-memory-history": (0, f"{_NOT_YET}: no CUDA memory history is recorded (the log line reports "
                                   "peak memory)"),
    "--memory-snapshot-path": (1, f"{_NOT_YET} (see --record-memory-history)"),
    "--nvtx-ranges": (0, f"{_NOT_YET}: --profile on CUDA marks each iteration with an NVTX range; "
                         "--record-shapes adds one per operator"),
    "--pytorch-profiler-collect-chakra": (0, f"{_NOT_YET}: the torch profiler writes a Chrome trace only"),
}
# Ignored flags whose other values would change the run: those values are refused.
VALUES: dict[str, tuple[str, ...]] = {"--ckpt-format": ("torch_dist",)}

REFUSED: dict[str, tuple[int, str]] = {
    "--use-legacy-models": (0, "megatron-rpt builds Megatron-Core models only"),
    "--use-torch-fsdp2": (0, "FSDP is not supported; use --use-distributed-optimizer (ZeRO-1)"),
    "--use-megatron-fsdp": (0, "FSDP is not supported; use --use-distributed-optimizer (ZeRO-1)"),
    "--squared-relu": (0, "the MLP activation is GeLU or SwiGLU (--swiglu)"),
    "--quick-geglu": (0, "the MLP activation is GeLU or SwiGLU (--swiglu)"),
    "--openai-gelu": (0, "the MLP activation is GeLU or SwiGLU (--swiglu)"),
    "--multi-latent-attention": (0, "multi-latent attention (DeepSeek) is not supported"),
}


def classify(extra: list[str]) -> tuple[list[str], list[str]]:
    """(notices, problems) for the tokens argparse did not recognise: one notice per ignored flag, one
    problem per refused or unknown flag or stray value."""
    from difflib import get_close_matches

    notices, problems, known = [], [], None
    i = 0
    while i < len(extra):
        token = extra[i]
        flag, _, inline = token.partition("=")
        i += 1
        if not flag.startswith("--"):
            problems.append(f"unexpected argument {token!r} (a value without a flag?)")
            continue
        entry = IGNORED.get(flag) or REFUSED.get(flag)
        values: list[str] = [inline] if inline else []
        arity = entry[0] if entry else "+"   # an unknown flag: the tokens up to the next flag are its values
        while (not inline and i < len(extra) and not extra[i].startswith("--")
               and (arity == "+" or len(values) < arity)):
            values.append(extra[i])
            i += 1
        if flag in REFUSED:
            problems.append(f"{flag} is not supported: {REFUSED[flag][1]}")
        elif flag in IGNORED:
            allowed = VALUES.get(flag)
            if allowed and values and values[0] not in allowed:
                problems.append(f"{flag} {values[0]} is not supported: {IGNORED[flag][1]}")
            else:
                notices.append(f"> {flag}{' ' + ' '.join(values) if values else ''} ignored: {IGNORED[flag][1]}")
        else:
            known = known if known is not None else _known_flags()
            close = get_close_matches(flag, known, n=1)
            problems.append(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
    return notices, problems


def _known_flags() -> list[str]:
    from megatron_rpt.config.arguments import build_parser
    from megatron_rpt.config.schema import SECTIONS
    parser = build_parser(sections=SECTIONS)
    return [o for a in parser._actions for o in a.option_strings] + list(IGNORED) + list(REFUSED)


def checkpoint_args(cfg, **derived):
    """The `args` entry of a checkpoint's common state, as Megatron-LM writes it (an argparse.Namespace
    of its parsed flags: `generate_state_dict` in megatron/training/checkpointing.py): every field of
    `cfg` under its dest name (ours are Megatron-LM's dests), with the values Megatron-LM derives at
    start-up that its loaders read (`derived`: padded_vocab_size, world_size, data_parallel_size,
    consumed_train_samples, consumed_valid_samples, ...). Megatron-LM's `load_checkpoint` takes
    the data position from `consumed_*_samples` here and `check_checkpoint_args` compares num_layers,
    hidden_size, num_attention_heads, add_position_embedding (and with a vocab file
    max_position_embeddings, make_vocab_size_divisible_by, tokenizer_type); `--use-checkpoint-args`
    (load_args_from_checkpoint) reads the model's shape, parallel sizes and tokenizer from it."""
    import argparse
    import dataclasses

    values = {}
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if dataclasses.is_dataclass(sub):
            values.update({f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)})
    values.update(
        ckpt_format="torch_dist", use_dist_ckpt=True, skipped_train_samples=0,
        # Megatron-LM's default; it has the learned embedding follow --position-embedding-type
        add_position_embedding=True,
        use_rotary_position_embeddings=values.get("position_embedding_type") == "rope",
        no_save_optim=False, no_save_rng=False, data_parallel_random_init=False)
    values.update(derived)
    return argparse.Namespace(**values)
