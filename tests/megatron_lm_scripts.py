"""The launch lines of three Megatron-LM example scripts, as data (their flags and values are facts):
examples/llama/train_llama3_8b_h100_fp8.sh (its MOCK data branch), examples/mixtral/
train_mixtral_8x7b_distributed.sh and examples/gpt3/train_gpt3_175b_distributed.sh, as of Megatron-LM
main in August 2026 (core 0.20.0 in tree). Paths the scripts take as arguments are placeholders
(CKPT, TOKENIZER, DATA, ...) that a test replaces; `WORLD` is the world size each script launches.

`shrink(argv, **sizes)` replaces the flags that size the model, the batch and the run with tiny values
and the parallel layout with one that fits a CPU test, keeping every other flag of the script.
"""

from __future__ import annotations

LLAMA3_8B = [
    # MODEL_ARGS
    "--use-mcore-models", "--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "14336",
    "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "8", "--kv-channels", "128",
    "--seq-length", "8192", "--max-position-embeddings", "8192", "--position-embedding-type", "rope",
    "--rotary-base", "1000000", "--rotary-percent", "1.0", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
    "--swiglu", "--normalization", "RMSNorm", "--init-method-std", "0.0134", "--attention-backend", "fused",
    "--apply-layernorm-1p", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    # TRAINING_ARGS
    "--micro-batch-size", "1", "--global-batch-size", "128", "--train-samples", "1953125000",
    "--lr-decay-samples", "1949218748", "--lr-warmup-samples", "3906252", "--lr", "0.00015", "--min-lr", "0.00001",
    "--decoupled-lr", "5.0e-4", "--decoupled-min-lr", "4.5e-5", "--lr-decay-style", "cosine", "--clip-grad", "1.0",
    "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--bf16", "--grad-reduce-in-bf16",
    "--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--manual-gc", "--empty-unused-memory-level", "1",
    "--exit-duration-in-mins", "235",
    # DTYPE_ARGS (fp8)
    "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max",
    "--fp8-param-gather",
    # MODEL_PARALLEL_ARGS + DDP_ARGS
    "--tensor-model-parallel-size", "1", "--context-parallel-size", "1", "--sequence-parallel",
    "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
    # DATA_ARGS_LIST (MOCK)
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128256", "--data-cache-path", "CACHE",
    "--tiktoken-pattern", "v2", "--split", "99,1,0", "--no-create-attention-mask-in-dataloader",
    "--no-mmap-bin-files", "--num-workers", "1",
    # EVAL_AND_LOGGING_ARGS
    "--log-interval", "1", "--eval-iters", "32", "--eval-interval", "100", "--save-interval", "1000",
    "--log-throughput", "--profile", "--profile-step-start", "4", "--profile-step-end", "6",
    "--ckpt-format", "torch_dist", "--distributed-timeout-minutes", "60", "--save", "CKPT", "--load", "CKPT",
    "--tensorboard-dir", "TB",
]

MIXTRAL_8X7B = [
    # MODEL_ARGS
    "--use-mcore-models", "--disable-bias-linear", "--seq-length", "4096", "--max-position-embeddings", "32768",
    "--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "14336", "--num-attention-heads", "32",
    "--init-method-std", "0.01", "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--swiglu", "--untie-embeddings-and-output-weights",
    "--group-query-attention", "--num-query-groups", "8", "--no-masked-softmax-fusion", "--no-position-embedding",
    "--rotary-base", "1000000",
    # MOE_ARGS
    "--num-experts", "8", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
    "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
    "--overlap-param-gather", "--overlap-grad-reduce",
    # DATA_ARGS
    "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "TOKENIZER", "--data-path", "DATA",
    "--split", "99990,8,2",
    # TRAINING_ARGS
    "--micro-batch-size", "1", "--global-batch-size", "256", "--lr", "1e-4", "--train-iters", "500000",
    "--lr-decay-iters", "320000", "--lr-decay-style", "cosine", "--min-lr", "1.0e-5", "--weight-decay", "0.1",
    "--lr-warmup-iters", "500", "--clip-grad", "1.0", "--bf16",
    # MODEL_PARALLEL_ARGS
    "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "4", "--expert-model-parallel-size", "8",
    "--use-distributed-optimizer", "--sequence-parallel",
    # LOGGING_ARGS (+ the W&B pair the script adds when WANDB_API_KEY is set)
    "--log-interval", "1", "--save-interval", "10000", "--eval-interval", "1000", "--eval-iters", "10",
    "--save", "CKPT", "--load", "CKPT", "--tensorboard-dir", "TB", "--no-load-optim", "--no-load-rng",
    "--wandb-project", "Mixtral", "--wandb-exp-name", "Mixtral_8x7B",
]

GPT3_175B = [
    # GPT_MODEL_ARGS
    "--num-layers", "96", "--hidden-size", "12288", "--num-attention-heads", "96", "--seq-length", "2048",
    "--max-position-embeddings", "2048", "--attention-backend", "auto",
    # TRAINING_ARGS
    "--micro-batch-size", "1", "--global-batch-size", "1536",
    "--step-batch-size-schedule", "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536",
    "--train-iters", "500000", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
    "--init-method-std", "0.006", "--clip-grad", "1.0", "--fp16", "--lr", "6.0e-5", "--lr-decay-style", "cosine",
    "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001", "--lr-decay-iters", "430000",
    # MODEL_PARALLEL_ARGS
    "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "16",
    # DATA_ARGS (the script gives the GPT-2 files without --tokenizer-type)
    "--data-path", "DATA", "--vocab-file", "VOCAB", "--merge-file", "MERGES", "--split", "949,50,1",
    # EVAL_AND_LOGGING_ARGS
    "--log-interval", "100", "--save-interval", "10000", "--eval-interval", "1000", "--save", "CKPT",
    "--load", "CKPT", "--eval-iters", "10", "--tensorboard-dir", "TB",
]

WORLD = {"LLAMA3_8B": 8, "MIXTRAL_8X7B": 64, "GPT3_175B": 1024}   # the GPT-3 script needs TP8 x PP16 x DP8


def with_values(argv: list[str], values: dict, drop: tuple = ()) -> list[str]:
    """`argv` with each flag of `values` given that value (True: present without a value; appended when
    absent) and the flags of `drop` removed, each with the values that follow it."""
    out, i = [], 0
    while i < len(argv):
        flag, j = argv[i], i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        if flag in values:
            out += [flag] if values[flag] is True else [flag, str(values[flag])]
        elif flag not in drop:
            out += argv[i:j]
        i = j
    for flag, value in values.items():
        if flag not in argv:
            out += [flag] if value is True else [flag, str(value)]
    return out


def fill(argv: list[str], paths: dict) -> list[str]:
    """The placeholders (CKPT, TB, CACHE, TOKENIZER, DATA, VOCAB, MERGES) replaced by `paths`."""
    return [str(paths.get(a, a)) for a in argv]


def write_script_files(folder) -> dict:
    """Small real files for the scripts' path arguments: a Llama-style sentencepiece tokenizer.model and a
    corpus in its vocabulary (enough documents that Mixtral's --split 99990,8,2 gives each split one), a
    GPT-2-vocabulary corpus for the GPT-3 script (--split 949,50,1), and the output folders."""
    import io
    import os

    import numpy as np
    import sentencepiece as spm

    from megatron_rpt.data.indexed import IndexedWriter

    text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
            "How vexingly quick daft zebras jump. Sphinx of black quartz, judge my vow.\n") * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=buf, vocab_size=48,
                                   minloglevel=2)
    paths = {name: os.path.join(folder, name.lower()) for name in ("CKPT", "TB", "CACHE")}
    paths["TOKENIZER"] = os.path.join(folder, "tokenizer.model")
    with open(paths["TOKENIZER"], "wb") as f:
        f.write(buf.getvalue())
    rng = np.random.default_rng(0)
    for name, vocab, eod, docs in (("DATA", 48, 2, 60000), ("GPT2_DATA", 50257, 50256, 1100)):
        paths[name] = os.path.join(folder, name.lower())
        writer = IndexedWriter(paths[name], vocab)
        lengths = rng.integers(4, 12, size=docs)
        for n in lengths:
            writer.add_document(rng.integers(3, vocab - 1, size=int(n)).tolist() + [eod])
        writer.finalize()
    return paths
