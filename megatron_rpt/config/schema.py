"""Typed run configuration: one dataclass per concern, each field carrying its Megatron-LM flag.

The dataclasses are the single source of truth for the command line: `config.arguments` builds
the argparse groups from the `flag`/`help` metadata below, so a field and its flag cannot drift
apart. Library code receives these objects explicitly; there is no global argument singleton.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

# Megatron-LM's --tokenizer-type names this project builds (data.tokenizers.factory builds each).
TOKENIZER_TYPES = ("SentencePieceTokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer",
                   "TikTokenizer", "NullTokenizer")


def arg(default: Any = dataclasses.MISSING, *, flag: str | None = None, help: str = "",
        choices: tuple | None = None, nargs: str | int | None = None, negative: str | None = None,
        default_factory: Any = dataclasses.MISSING, aliases: tuple = (), type: Any = None) -> Any:
    """A dataclass field with its CLI metadata (flag name defaults to --field-name; `aliases`: other
    spellings Megatron-LM accepts; `type`: the element type of an `nargs` flag, default str)."""
    meta = {"flag": flag, "help": help, "choices": choices, "nargs": nargs, "negative": negative,
            "aliases": aliases, "type": type}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """The decoder's shape and architecture, with Megatron-LM's flags and defaults (a flag that is
    absent means what it means to pretrain_gpt.py: GeLU MLP, LayerNorm, biases, learned absolute
    positions, dropout 0.1). The presets set the Qwen3-style family (SwiGLU, RMSNorm, no biases,
    RoPE, grouped-query attention, QK-norm, no dropout)."""

    num_layers: Optional[int] = arg(None, help="Number of transformer layers.")
    hidden_size: Optional[int] = arg(None, help="Transformer hidden size.")
    ffn_hidden_size: Optional[int] = arg(None, help="FFN hidden size (per branch with --swiglu); default "
                                         "4 x hidden, or with --swiglu 8/3 x hidden rounded down to a multiple "
                                         "of 64, as Megatron-LM.")
    num_attention_heads: Optional[int] = arg(None, help="Number of attention heads.")
    group_query_attention: bool = arg(False, help="Grouped-query attention with --num-query-groups key/value heads.")
    num_query_groups: Optional[int] = arg(None, help="Key/value heads with --group-query-attention "
                                          "(without it: multi-head attention).")
    kv_channels: Optional[int] = arg(None, help="Head dimension (default hidden/heads).")
    swiglu: bool = arg(False, help="SwiGLU MLP (gated, SiLU) instead of the default GeLU MLP.")
    normalization: str = arg("LayerNorm", choices=("LayerNorm", "RMSNorm"), help="Normalization layers.")
    apply_layernorm_1p: bool = arg(False, help="Zero-centred norm weights: the norm multiplies by (1 + weight).")
    add_bias_linear: bool = arg(True, negative="--disable-bias-linear",
                                help="Biases in the linear layers (the default, as Megatron-LM); "
                                     "--disable-bias-linear removes them.")
    add_qkv_bias: bool = arg(False, help="Biases on the query/key/value projection only (Qwen2); implied "
                                         "by biases on all linear layers.")
    position_embedding_type: str = arg("learned_absolute", choices=("learned_absolute", "rope", "none"),
                                       help="Position embedding.")
    rotary_percent: float = arg(1.0, help="Fraction of each head's dimensions that RoPE rotates.")
    seq_length: Optional[int] = arg(None, help="Training sequence length.")
    max_position_embeddings: Optional[int] = arg(None, help="Maximum positions (default seq length).")
    vocab_size: Optional[int] = arg(None, help="Vocabulary size of the NullTokenizer, or the TikTokenizer's "
                                     "(default all its ranks). The model's vocabulary is the larger of this and the "
                                     "tokenizer's, padded (imported HF models may have more rows than tokens).")
    make_vocab_size_divisible_by: int = arg(128, help="Pad the vocabulary to a multiple of this "
                                            "times the tensor-parallel size.")
    rotary_base: float = arg(10000.0, help="RoPE base (theta).")
    norm_epsilon: float = arg(1e-5, help="Epsilon of the normalization layers.")
    qk_layernorm: bool = arg(False, flag="--qk-layernorm", negative="--no-qk-layernorm",
                             help="Normalization of queries and keys per head (Qwen3).")
    untie_embeddings_and_output_weights: bool = arg(False, help="Separate output layer weights.")
    init_method_std: float = arg(0.02, help="Std of the normal weight initialisation.")
    attention_dropout: float = arg(0.1, help="Attention dropout.")
    hidden_dropout: float = arg(0.1, help="Hidden dropout.")
    # Mixture of experts (Megatron-LM flag names).
    num_experts: Optional[int] = arg(None, help="Routed experts per MoE layer (MoE when set).")
    moe_layer_freq: str = arg("1", help="Which layers are MoE layers: N (every N-th layer, starting with the "
                              "first) or a Python list pattern of 0/1 per layer such as \"[1,0]*4\" (Megatron-LM).")
    moe_ffn_hidden_size: Optional[int] = arg(None, help="FFN hidden size of each expert (default --ffn-hidden-size).")
    moe_shared_expert_intermediate_size: Optional[int] = arg(None, help="FFN hidden size of the shared expert(s) "
                                                             "every token also passes through (none when unset).")
    moe_router_topk: int = arg(2, help="Experts each token is routed to.")
    moe_router_score_function: str = arg("softmax", choices=("softmax", "sigmoid"),
                                         help="Router score function (sigmoid for expert-bias balancing).")
    moe_router_load_balancing_type: str = arg("aux_loss", choices=("aux_loss", "seq_aux_loss", "sinkhorn", "none"),
                                              help="Load-balancing loss ('none' with expert-bias balancing).")
    moe_aux_loss_coeff: float = arg(0.0, help="Weight of the load-balancing auxiliary loss.")
    moe_z_loss_coeff: Optional[float] = arg(None, help="Weight of the router z-loss (off when unset).")
    moe_router_enable_expert_bias: bool = arg(False, help="Auxiliary-loss-free balancing with a per-expert bias "
                                              "(DeepSeek-V3; needs --moe-router-score-function sigmoid).")
    moe_router_bias_update_rate: float = arg(1e-3, help="Expert-bias step per update (sign of the load error).")
    moe_router_dtype: Optional[str] = arg(None, choices=("fp32", "fp64"),
                                          help="Router computation dtype (default: the model's).")
    moe_token_dispatcher_type: str = arg("alltoall", choices=("allgather", "alltoall"),
                                         help="How tokens reach experts across expert-parallel ranks.")
    moe_grouped_gemm: bool = arg(False, help="Grouped GEMM for the local experts (Transformer Engine, CUDA).")

    def describe(self) -> str:
        """One line of the architecture the flags select (the start-up banner, --dry-run)."""
        mlp = f"{'SwiGLU' if self.swiglu else 'GeLU'} MLP {self.ffn_hidden_size}"
        if self.num_experts:
            mlp += (f", MoE {self.num_experts} experts x {self.moe_ffn_hidden_size or self.ffn_hidden_size} "
                    f"top-{self.moe_router_topk} (layer freq {self.moe_layer_freq})")
            if self.moe_shared_expert_intermediate_size:
                mlp += f" + shared {self.moe_shared_expert_intermediate_size}"
        norm = f"{self.normalization}{'-1p' if self.apply_layernorm_1p else ''} eps {self.norm_epsilon:g}"
        bias = "biases" if self.add_bias_linear else ("Q/K/V biases" if self.add_qkv_bias else "no biases")
        pos = self.position_embedding_type
        if pos == "rope":
            pos += f" {self.rotary_percent:.0%} base {self.rotary_base:g}"
        kv = self.num_query_groups if self.group_query_attention else self.num_attention_heads
        attention = f"{self.num_attention_heads} heads / {kv} kv x {self.kv_channels}"
        return ", ".join([mlp, norm, bias, pos, attention] + (["QK-norm"] if self.qk_layernorm else [])
                         + [f"dropout {self.attention_dropout:g}/{self.hidden_dropout:g}",
                            "untied output" if self.untie_embeddings_and_output_weights else "tied output"])


@dataclass
class ParallelConfig:
    """How the model and the batch are split over ranks."""

    tensor_model_parallel_size: int = arg(1, help="Tensor-parallel size.")
    pipeline_model_parallel_size: int = arg(1, help="Pipeline-parallel size.")
    num_layers_per_virtual_pipeline_stage: Optional[int] = arg(
        None, help="Layers per virtual pipeline stage (enables the interleaved schedule).")
    context_parallel_size: int = arg(1, help="Context-parallel size.")
    expert_model_parallel_size: int = arg(1, help="Expert-parallel size (experts split over this many ranks).")
    expert_tensor_parallel_size: Optional[int] = arg(None, help="Tensor-parallel size inside each expert "
                                                     "(default: --tensor-model-parallel-size).")
    sequence_parallel: bool = arg(False, help="Sequence parallelism (needs TP > 1).")
    use_distributed_optimizer: bool = arg(False, help="Shard optimizer states over data parallel.")
    overlap_grad_reduce: bool = arg(False, help="Overlap the gradient reduce with backward.")
    overlap_param_gather: bool = arg(False, help="Overlap the parameter all-gather (distributed optimizer).")
    distributed_timeout_minutes: int = arg(10, help="Timeout of collective operations.")


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate / weight-decay schedule."""

    optimizer: str = arg("adam", choices=("adam", "sgd"), help="Optimizer (adam = AdamW).")
    lr: Optional[float] = arg(None, help="Peak learning rate.")
    min_lr: float = arg(0.0, help="Minimum learning rate at the end of decay.")
    lr_decay_style: str = arg("cosine", choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"),
                              help="Learning-rate decay style (default cosine; Megatron-LM's is linear: give "
                              "--lr-decay-style linear to match a Megatron-LM script that omits it).")
    lr_warmup_iters: int = arg(0, help="Linear warmup iterations.")
    lr_warmup_samples: int = arg(0, help="Linear warmup samples (sample-based training, --train-samples).")
    lr_warmup_fraction: Optional[float] = arg(None, help="Warmup as a fraction of the decay steps (--lr-decay-iters "
                                              "or --lr-decay-samples); instead of --lr-warmup-iters/-samples.")
    lr_warmup_init: float = arg(0.0, help="Learning rate at the start of warmup.")
    lr_decay_iters: Optional[int] = arg(None, help="Decay iterations (default: --train-iters).")
    lr_decay_samples: Optional[int] = arg(None, help="Decay samples (sample-based training; default: "
                                          "--train-samples).")
    lr_wsd_decay_iters: Optional[int] = arg(None, help="WSD: iterations of the final decay phase.")
    lr_wsd_decay_samples: Optional[int] = arg(None, help="WSD: samples of the final decay phase (sample-based "
                                              "training).")
    lr_wsd_decay_style: str = arg("exponential", choices=("exponential", "linear", "cosine", "minus_sqrt"),
                                  help="WSD: shape of the decay phase.")
    weight_decay: float = arg(0.01, help="AdamW weight decay.")
    clip_grad: float = arg(1.0, help="Gradient clipping by global norm (0 disables).")
    # fp16 loss scaling (Megatron-LM's flags and defaults; Megatron-Core's grad scalers).
    loss_scale: Optional[float] = arg(None, help="--fp16: a static loss scale (default: dynamic scaling).")
    initial_loss_scale: float = arg(2.0 ** 32, help="--fp16: the dynamic loss scale to start from (iterations "
                                    "whose gradients overflow are skipped while it comes down).")
    min_loss_scale: float = arg(1.0, help="--fp16: the smallest dynamic loss scale.")
    loss_scale_window: float = arg(1000, help="--fp16: iterations without overflow before the dynamic scale "
                                   "doubles.")
    hysteresis: int = arg(2, help="--fp16: overflows tolerated before the dynamic scale halves.")
    adam_beta1: float = arg(0.9, help="Adam beta1.")
    adam_beta2: float = arg(0.999, help="Adam beta2.")
    adam_eps: float = arg(1e-8, help="Adam epsilon.")
    sgd_momentum: float = arg(0.9, help="SGD momentum.")
    decoupled_lr: Optional[float] = arg(None, help="Separate peak learning rate for the input embedding and the "
                                        "output layer (Megatron-Core's is_embedding_or_output_parameter groups); "
                                        "same schedule shape as --lr.")
    decoupled_min_lr: Optional[float] = arg(None, help="Minimum learning rate of the --decoupled-lr parameters "
                                            "(default --min-lr).")
    override_opt_param_scheduler: bool = arg(False, aliases=("--override-opt_param-scheduler",),
                                             help="On resume, take the schedule (learning rates, warmup, decay "
                                             "steps and style, weight decay) from the command line, continuing "
                                             "from the checkpoint's step count.")
    use_checkpoint_opt_param_scheduler: bool = arg(False, aliases=("--use-checkpoint-opt_param-scheduler",),
                                                   help="On resume, take the schedule from the checkpoint and "
                                                   "ignore the command line's. Without either flag a resume whose "
                                                   "schedule differs from the checkpoint's is an error.")


@dataclass
class TrainingConfig:
    """Batching, precision, iterations, recompute, seeds."""

    micro_batch_size: int = arg(1, help="Sequences per micro-batch per data-parallel rank.")
    global_batch_size: Optional[int] = arg(None, help="Sequences per optimizer step "
                                           "(default micro batch x data-parallel size).")
    train_iters: Optional[int] = arg(None, help="Optimizer steps to train (or --train-samples).")
    train_samples: Optional[int] = arg(None, help="Samples to train, instead of --train-iters: the iterations are "
                                       "derived (train samples // global batch, or with --rampup-batch-size the "
                                       "iterations that consume them) and the schedule flags are in samples.")
    rampup_batch_size: Optional[list] = arg(None, nargs=3, type=int,
                                            help="START INCR SAMPLES: start with global batch START and grow it by "
                                            "INCR every SAMPLES / ((--global-batch-size - START) / INCR) samples "
                                            "(Megatron-Core 0.16's ramp-up; needs --train-samples).")
    step_batch_size_schedule: Optional[str] = arg(None, help="\"THRESHOLD:BATCH ...\" (e.g. \"0:16 2.4B:320 4.8B:624\"): "
                                                  "the global batch from each threshold of consumed tokens on (K, M, "
                                                  "B, T suffixes; tokens // --seq-length samples), the last one the "
                                                  "global batch (as Megatron-LM; a --global-batch-size must equal it).")
    bf16: bool = arg(False, help="bf16 mixed precision (GPU).")
    grad_reduce_in_bf16: bool = arg(False, help="With --bf16: accumulate and reduce gradients in bf16 instead of "
                                    "fp32 (half the bytes, less precise).")
    fp16: bool = arg(False, help="fp16 mixed precision with loss scaling (GPU).")
    calculate_per_token_loss: bool = arg(False, help="Average the loss over all tokens of the "
                                         "global batch instead of per micro-batch.")
    recompute_granularity: Optional[str] = arg(None, choices=("full", "selective"),
                                               help="Activation recomputation.")
    recompute_method: Optional[str] = arg(None, choices=("uniform", "block"),
                                          help="How layers are recomputed with --recompute-granularity full.")
    recompute_num_layers: Optional[int] = arg(None, help="Layers per recompute unit (full recompute).")
    seed: int = arg(1234, help="Random seed.")
    eval_interval: int = arg(1000, help="Evaluate on the validation split every N iterations (0: never).")
    eval_iters: int = arg(10, help="Validation iterations per evaluation.")
    exit_interval: Optional[int] = arg(None, help="Exit after an iteration divisible by N (after saving).")
    exit_duration_in_mins: Optional[float] = arg(None, help="Save and exit once training has run this many "
                                                 "minutes (checked after every iteration, agreed by all ranks).")
    nonfinite_grad_skip_limit: int = arg(5, help="Skip the update of an iteration whose gradients contain "
                                         "NaN/inf (bf16/fp32; fp16 has its loss scaler) and stop with an error "
                                         "after more than N consecutive ones (0: stop at the first).")
    exit_signal_handler: bool = arg(False, help="Save and exit cleanly on SIGTERM or SIGUSR1 (SLURM preemption, --signal=USR1@T).")
    # Host-side run-time controls (Megatron-LM's flags; applied by training.driver / training.step).
    manual_gc: bool = arg(False, help="Disable Python's automatic garbage collector for the run and collect "
                          "at fixed points instead (every --manual-gc-interval iterations and around evaluation), "
                          "the same on every rank, so collection pauses do not stagger the ranks (Megatron-LM). "
                          "The collector is re-enabled when the run returns.")
    manual_gc_interval: int = arg(0, help="With --manual-gc: a full collection after every N-th iteration "
                                  "(0: only around evaluation).")
    manual_gc_eval: bool = arg(True, flag="--manual-gc-eval", negative="--no-manual-gc-eval",
                               help="With --manual-gc: a full collection before each evaluation and a "
                               "young-generation one after it (--no-manual-gc-eval: none).")
    empty_unused_memory_level: int = arg(0, choices=(0, 1, 2),
                                         help="Release the CUDA caching allocator's unused blocks "
                                         "(torch.cuda.empty_cache): 1 after each forward-backward (training and "
                                         "evaluation), 2 also after each optimizer step; 0 never. No effect on "
                                         "CPU (no caching allocator; one line says so).")
    use_cpu: bool = arg(False, flag="--use-cpu", help="Force the CPU/gloo platform even when CUDA is present.")
    dry_run: bool = arg(False, help="Check every flag and the data/tokenizer files, print the resolved model, layout, "
                        "parameter counts and a per-GPU memory estimate, and exit without starting a process "
                        "group (the world size comes from the launcher's environment: WORLD_SIZE or SLURM_NTASKS).")
    # Fused kernels (Megatron-LM's --no-* flags). Each applies only where its kernel exists (see
    # models.gpt.transformer_config); the unfused paths compute the same values.
    bias_swiglu_fusion: bool = arg(True, flag="--bias-swiglu-fusion", negative="--no-bias-swiglu-fusion",
                                   help="Fused SwiGLU (CUDA).")
    bias_gelu_fusion: bool = arg(True, flag="--bias-gelu-fusion", negative="--no-bias-gelu-fusion",
                                 help="Fused bias + GeLU (CUDA; needs the linear layers' biases).")
    apply_rope_fusion: bool = arg(True, flag="--rope-fusion", negative="--no-rope-fusion",
                                  help="Transformer Engine's fused RoPE (CUDA with TE).")
    gradient_accumulation_fusion: bool = arg(True, flag="--gradient-accumulation-fusion",
                                             negative="--no-gradient-accumulation-fusion",
                                             help="Weight-gradient GEMM accumulating into the fp32 main grad "
                                             "(CUDA with Apex's fused_weight_gradient_mlp_cuda).")


@dataclass
class FP8Config:
    """FP8 GEMMs in Transformer Engine layers (Megatron-LM's flags; CUDA with TE, compute capability >= 8.9).

    Megatron-Core enters TE's FP8 autocast per transformer layer (and TE's fp8_model_init with
    --fp8-param-gather); the embedding, output layer and loss stay in the --bf16/--fp16 dtype.
    """

    fp8_format: Optional[str] = arg(None, choices=("e4m3", "hybrid"),
                                    help="FP8 GEMMs: 'e4m3' everywhere, or 'hybrid' (E4M3 forward, E5M2 "
                                    "gradients); off when unset. Needs --bf16 or --fp16.")
    fp8_recipe: str = arg("delayed", choices=("delayed", "tensorwise", "blockwise", "mxfp8"),
                          help="Scaling recipe: 'delayed' (amax history), 'tensorwise' (current scaling), "
                          "'blockwise' (1x128/128x128 blocks, Hopper), 'mxfp8' (Blackwell).")
    fp8_margin: int = arg(0, help="Delayed scaling: margin (power of 2) of the scaling factor.")
    fp8_amax_history_len: int = arg(1, help="Delayed scaling: length of the amax history window.")
    fp8_amax_compute_algo: str = arg("most_recent", choices=("most_recent", "max"),
                                     help="Delayed scaling: amax from the history's most recent value or its max.")
    fp8_wgrad: bool = arg(True, flag="--fp8-wgrad", negative="--no-fp8-wgrad",
                          help="Weight-gradient GEMMs in FP8 (--no-fp8-wgrad: in high precision).")
    fp8_param_gather: bool = arg(False, help="Keep the compute weights in FP8 (TE's fp8_model_init) and "
                                 "all-gather them in FP8 (needs --use-distributed-optimizer).")
    first_last_layers_bf16: bool = arg(False, help="Keep the first and last transformer layers in bf16 "
                                       "(not with --fp8-recipe delayed).")
    num_layers_at_start_in_bf16: int = arg(1, help="With --first-last-layers-bf16: leading layers kept in bf16.")
    num_layers_at_end_in_bf16: int = arg(1, help="With --first-last-layers-bf16: trailing layers kept in bf16.")


@dataclass
class DataConfig:
    """Datasets and the tokenizer."""

    data_path: list = arg(None, nargs="*", default_factory=list,
                          help="Blend for all splits: 'PREFIX', 'PREFIX1 PREFIX2 ...' (weighted by size) "
                          "or 'W1 PREFIX1 W2 PREFIX2 ...'; divided by --split.")
    split: str = arg("969,30,1", help="Train/valid/test shares of --data-path, e.g. 969,30,1 (ignored "
                     "with --train-data-path/--valid-data-path/--test-data-path).")
    train_data_path: list = arg(None, nargs="*", default_factory=list,
                                help="Training blend (like --data-path), instead of --data-path; "
                                "--split is then ignored and each split uses only its own flag.")
    valid_data_path: list = arg(None, nargs="*", default_factory=list,
                                help="Validation blend (like --data-path), with --train-data-path; "
                                "without it there is no validation set.")
    test_data_path: list = arg(None, nargs="*", default_factory=list,
                               help="Test blend (like --data-path), with --train-data-path; "
                               "without it there is no test set.")
    data_cache_path: Optional[str] = arg(None, help="Folder for the dataset index caches, reused by "
                                         "later runs (default, as in Megatron-Core: PREFIX/cache/"
                                         "GPTDataset_indices, and blend indices are not cached).")
    mock_data: bool = arg(False, help="Random tokens instead of a dataset (smoke tests).")
    tokenizer_type: Optional[str] = arg(None, choices=TOKENIZER_TYPES, help="Tokenizer kind.")
    tokenizer_model: Optional[str] = arg(None, help="Tokenizer model file or folder.")
    vocab_file: Optional[str] = arg(None, help="Vocabulary file (GPT2BPETokenizer).")
    merge_file: Optional[str] = arg(None, help="BPE merges file (GPT2BPETokenizer).")
    tiktoken_pattern: str = arg("v2", choices=("v1", "v2"), help="TikTokenizer split pattern (Megatron-LM's).")
    tiktoken_num_special_tokens: int = arg(1000, help="TikTokenizer: ids reserved for special tokens before the "
                                           "BPE ranks.")
    tiktoken_special_tokens: list = arg(None, nargs="*", default_factory=list,
                                        help="TikTokenizer special tokens (must include Megatron-LM's <unk> <s> </s> "
                                        "<mask> <pad> <cls> <sep>; default exactly those).")
    num_workers: int = arg(0, help="DataLoader worker processes reading the pretraining micro-batches of each "
                           "iterator (training, validation; one per virtual pipeline stage); 0 reads them in the "
                           "training process. Workers start at the first batch and live for the run; the batches are "
                           "the same either way. Megatron-LM's default is 2; ours is 0 because starting workers (a "
                           "fork of the training process each) costs more than short runs gain (docs/architecture.md). "
                           "mrpt-rpt reads its tasks without workers.")
    mmap_bin_files: bool = arg(True, flag="--mmap-bin-files", negative="--no-mmap-bin-files",
                               help="Memory-map the .bin token files (--no-mmap-bin-files: read each sample "
                               "with file reads instead; Megatron-Core's mmap_bin_files).")
    reset_position_ids: bool = arg(False, help="Reset position ids at document ends.")
    reset_attention_mask: bool = arg(False, help="Reset the attention mask at document ends.")
    eod_mask_loss: bool = arg(False, help="Mask the loss at end-of-document tokens.")


@dataclass
class CheckpointConfig:
    """Megatron-Core distributed checkpoints (torch_dist)."""

    save: Optional[str] = arg(None, help="Directory to save checkpoints in.")
    load: Optional[str] = arg(None, help="Directory to resume from (its latest complete checkpoint).")
    save_interval: Optional[int] = arg(None, help="Save every N iterations (and at the end).")
    ckpt_step: Optional[int] = arg(None, help="Load this iteration instead of the latest.")
    no_load_optim: bool = arg(False, help="Do not load optimizer state.")
    no_load_rng: bool = arg(False, help="Do not load RNG state.")
    finetune: bool = arg(False, help="Load weights only and start at iteration 0.")
    ckpt_fallback_to_previous: bool = arg(False, help="When the latest checkpoint is incomplete or unreadable, "
                                          "load the newest earlier one that is intact (with a warning) instead "
                                          "of stopping with the error.")
    ckpt_fully_parallel_save: bool = arg(True, flag="--ckpt-fully-parallel-save",
                                         negative="--no-ckpt-fully-parallel-save",
                                         help="Spread the save over data-parallel ranks.")
    async_save: bool = arg(False, help="Write checkpoints in the background (Megatron-Core's async "
                           "dist-checkpointing: a forked writer process per save) while training goes on; "
                           "a checkpoint becomes the latest only once every rank's writer finished. The next "
                           "save and the end of the run wait for a pending one (Megatron-LM lets saves queue).")
    ckpt_keep_last: Optional[int] = arg(None, help="Keep only the newest N complete checkpoints in --save: after "
                                        "each successful save, older iter_* folders are deleted (never the one "
                                        "this run resumed from, nor ones newer than the save). megatron-rpt's own "
                                        "flag (Megatron-LM has none); default: keep all.")


@dataclass
class LoggingConfig:
    """Stdout, TensorBoard and W&B logging, timers."""

    log_interval: int = arg(10, help="Log every N iterations.")
    tensorboard_dir: Optional[str] = arg(None, help="TensorBoard event directory.")
    tensorboard_log_interval: int = arg(1, help="Write TensorBoard scalars every N iterations.")
    log_throughput: bool = arg(True, flag="--log-throughput", negative="--no-log-throughput",
                               help="Log tokens/s, TFLOP/s per device and MFU.")
    log_memory: bool = arg(True, flag="--log-memory", negative="--no-log-memory",
                           help="Log peak memory.")
    peak_tflops: Optional[float] = arg(None, help="Device peak TFLOP/s used for MFU "
                                       "(default: known GPUs' dense bf16 peak; CPU: none).")
    # Megatron-LM's observability flags (training.timers, training.params_norm, training.sinks).
    timing_log_level: int = arg(0, choices=(0, 1, 2),
                                help="Megatron-Core timers after each interval line (Megatron-LM's levels): 0 none "
                                "(the save-checkpoint time only); 1 once-per-iteration parts (forward-backward, "
                                "all-grads-sync, params-all-gather, optimizer and its parts); 2 also per micro-batch "
                                "ones (batch-generator, forward-compute, backward-compute, pipeline sends/receives). "
                                "Averaged over the interval's iterations (Megatron-LM divides by --log-interval).")
    timing_log_option: str = arg("minmax", choices=("max", "minmax", "all"),
                                 help="How timers are reported across ranks: max, (min, max) or every rank.")
    log_timers_to_tensorboard: bool = arg(False, help="Write the timers (max over ranks, seconds per iteration, "
                                          "'<name>-time') and 'iteration-time' to TensorBoard/W&B every log interval.")
    barrier_with_L1_time: bool = arg(True, flag="--barrier-with-level-1-timing",
                                     negative="--no-barrier-with-level-1-timing",
                                     help="Barrier before level-1 timers start (Megatron-LM's default; the positive "
                                     "flag is megatron-rpt's, Megatron-LM has only the negative one).")
    log_params_norm: bool = arg(False, help="Log the L2 norm of the parameters (each counted once over TP/PP/EP "
                                "replicas; the fp32 main parameters with bf16), computed on logged iterations.")
    log_num_zeros_in_grad: bool = arg(False, help="Log the number of zeros in the gradients (Megatron-Core's "
                                      "optimizer counts them every step).")
    log_validation_ppl_to_tensorboard: bool = arg(False, help="Also write the validation perplexity "
                                                  "('lm loss validation ppl') to TensorBoard/W&B.")
    wandb_project: Optional[str] = arg(None, help="Weights & Biases project: the TensorBoard scalars also go to "
                                       "W&B, from global rank 0 (needs the wandb package; offline with "
                                       "WANDB_MODE=offline). Empty: off.")
    wandb_exp_name: Optional[str] = arg(None, help="W&B run name (default: W&B's own).")
    wandb_save_dir: Optional[str] = arg(None, help="Local folder of the W&B run files (default SAVE/wandb).")
    wandb_entity: Optional[str] = arg(None, help="W&B entity (team or user).")


@dataclass
class ProfilingConfig:
    """Profiler capture of a range of iterations (Megatron-LM's flags; `training.profiling`)."""

    profile: bool = arg(False, help="Profile iterations --profile-step-start + 1 .. --profile-step-end on "
                        "--profile-ranks. CUDA: a cudaProfilerStart/Stop capture range for nsys (nsys profile "
                        "--capture-range=cudaProfilerApi), each iteration an NVTX range; with "
                        "--use-pytorch-profiler, or on CPU (no nsys), a torch profiler Chrome trace "
                        "TENSORBOARD_DIR/../torch_profile/rank-R.json.gz.")
    profile_step_start: int = arg(10, help="Start profiling once this many iterations are done.")
    profile_step_end: int = arg(12, help="Stop profiling after this iteration.")
    profile_ranks: list = arg(None, nargs="+", type=int, default_factory=list,
                              help="Global ranks to profile (default: all, as Megatron-LM).")
    use_pytorch_profiler: bool = arg(False, help="Use the torch profiler (CPU and CUDA activities, a Chrome "
                                     "trace readable by Perfetto, chrome://tracing and TensorBoard's profile "
                                     "plugin) instead of an nsys capture range.")
    pytorch_profiler_collect_shapes: bool = arg(False, help="Torch profiler: record tensor shapes.")
    pytorch_profiler_collect_callstack: bool = arg(False, help="Torch profiler: record Python call stacks.")
    record_shapes: bool = arg(False, help="nsys (CUDA): NVTX ranges for every autograd op with their input "
                              "shapes (torch.autograd.profiler.emit_nvtx) inside the capture range.")


@dataclass
class LossConfig:
    """Which per-token loss the pretraining step uses; the defaults give cross-entropy."""

    loss_function: str = arg("generalized", help="Registered per-token loss: 'generalized' (the "
                             "beta/lambda loss; cross-entropy at zero settings, with distribution "
                             "metrics) or 'cross_entropy' (Megatron-Core's own, no metrics).")
    loss_beta: float = arg(0.0, help="Target-weight exponent beta of the generalized loss: < 0 "
                           "precision (lower entropy), > 0 diversity; must be >= -1.")
    loss_lambda_high: float = arg(0.0, help="Reward lambda-tilde on top-k non-target tokens.")
    loss_lambda_low: float = arg(0.0, help="Reward lambda-hat on tail (non-top-k) non-target tokens; "
                                 "< 0 pushes mass out of the tail.")
    loss_topk: int = arg(100, help="k of the top-k set that separates high- from low-ranked negatives.")


# --rl-reward's choices: the names of megatron_rpt.rpt.rewards' registry (kept equal by its tests; the
# config layer does not import the RL package).
RL_REWARDS = ("prefix_match", "math_answer", "information_gain")


@dataclass
class RPTConfig:
    """Reinforcement Pre-Training (`mrpt-rpt`): tasks, rollouts, rewards and the GRPO update."""

    rpt_data: Optional[str] = arg(None, help="Training tasks, PREFIX_train.jsonl of tools/build_rpt_data.py (RPT, "
                                  "RLP) or of tools/build_rl_data.py (--rl-reward math_answer).")
    rpt_eval_data: Optional[str] = arg(None, help="Held-out tasks of the same kind (PREFIX_heldout.jsonl).")
    rpt_contexts_per_step: int = arg(256, help="Contexts (tasks) per optimizer step over all data-parallel "
                                     "ranks; each gives --rpt-group-size rollouts.")
    rpt_group_size: int = arg(8, help="Rollouts (G) per context.")
    rpt_temperature: float = arg(0.8, help="Sampling temperature of the rollouts.")
    rpt_top_p: float = arg(1.0, help="Nucleus sampling of the rollouts (1.0: off).")
    rpt_top_k: int = arg(0, help="Top-k sampling of the rollouts (0: off).")
    rpt_max_response_length: int = arg(8192, help="Maximum generated tokens per rollout (prompt + response "
                                       "must fit --seq-length).")
    rl_reward: str = arg("prefix_match", choices=RL_REWARDS,
                         help="The reward (megatron_rpt/rpt/rewards.py): 'prefix_match' (RPT: next-token "
                         "prediction on --rpt-data task files of tools/build_rpt_data.py), 'math_answer' (RLVR: the "
                         "boxed final answer checked against the reference of problem files of "
                         "tools/build_rl_data.py), 'information_gain' (RLP, on RPT task files).")
    rpt_prompt_template: Optional[str] = arg(None, help="Prompt template: a built-in ('v0': RPT's, 'math': RLVR's, "
                                             "'rlp') or a text file with one {context} placeholder; default: the "
                                             "--rl-reward's own.")
    rpt_chat_template: bool = arg(False, help="Wrap the prompt in the tokenizer's chat template.")
    rpt_dynamic_sampling_start: Optional[int] = arg(None, help="From this iteration on, drop groups whose "
                                                    "rewards are all equal (no gradient); off when unset.")
    rollout_engine: str = arg("megatron", choices=("megatron", "openai"),
                              help="'megatron': Megatron-Core's engine on the trainer's own weights; 'openai': "
                              "an external OpenAI-compatible server (--rollout-url), synced by export.")
    rollout_url: Optional[str] = arg(None, help="Base URL of the external server (--rollout-engine openai).")
    rollout_max_batch_size: int = arg(64, help="Sequences per batch of the embedded engine.")
    rollout_reload: str = arg("none", choices=("none", "sglang", "vllm", "endpoint", "restart"),
                              help="External engine: how the server loads the exported weights after each update "
                              "('vllm': /collective_rpc reload_weights, server started with VLLM_SERVER_DEV_MODE=1; "
                              "'sglang': /update_weights_from_disk; 'restart': --rollout-restart-command).")
    rollout_reload_endpoint: Optional[str] = arg(None, help="External engine, --rollout-reload endpoint: the path "
                                                 "to POST {model_path} to.")
    rollout_restart_command: Optional[str] = arg(None, help="External engine, --rollout-reload restart: the server "
                                                 "command with a {model_path} placeholder.")
    rollout_sync_dir: Optional[str] = arg(None, help="External engine: folder of the weight sync, the rolling "
                                          "model-only checkpoint (weights/) and its HF export (hf/) the server "
                                          "loads (default SAVE/rollout_sync).")
    rollout_logprobs: str = arg("tempered", choices=("tempered", "raw"),
                                help="External engine: what the server's log-probs are. 'tempered': log softmax(z/T) "
                                "at the sampling temperature (vLLM --logprobs-mode processed_logprobs; SGLang's "
                                "default); 'raw': at temperature 1 (vLLM raw_logprobs, its default; SGLang with "
                                "SGLANG_RETURN_ORIGINAL_LOGPROB=1), accepted only with --rpt-temperature 1.")
    rollout_frozen_policy: bool = arg(False, help="External engine: the server keeps its initial weights on purpose "
                                      "(e.g. off-policy experiments): no weight sync at all. Without it "
                                      "--rollout-reload none is refused (the server would sample from a stale "
                                      "policy forever).")
    grpo_clamp_eps_lower: float = arg(0.2, help="Lower clip of the importance ratio (1 - eps).")
    grpo_clamp_eps_upper: float = arg(0.2, help="Upper clip of the importance ratio (1 + eps; > lower: "
                                      "clip-higher).")
    grpo_kl_beta: float = arg(0.0, help="Weight of the k3 KL penalty to the reference policy --rpt-ref-load "
                              "(0: off, as in the paper).")
    rpt_ref_load: Optional[str] = arg(None, help="Checkpoint folder of the frozen reference policy of the KL "
                                      "penalty (its latest iteration; usually the initial policy).")
    rpt_use_rollout_logprobs: bool = arg(False, help="Use the rollout engine's log-probs as the old policy's "
                                         "(skip the trainer's forward-only recompute; the ratio then also carries "
                                         "the engine-trainer numerical mismatch).")
    rpt_tis_cap: Optional[float] = arg(None, help="Truncated importance sampling: weight each token's loss by "
                                       "min(exp(logp_old - logp_engine), C), detached (corrects the rollouts "
                                       "for the engine-trainer mismatch). Off by default.")
    rpt_mini_batches: int = arg(1, help="Optimizer steps per rollout batch: its contexts are split into N equal "
                                "mini-batches, each updated in turn against the same old policy (PPO/GRPO epochs "
                                "of 1); 1 = on-policy, one update per batch, as the paper.")
    rpt_eval_samples: int = arg(1, help="Responses per held-out task in evaluation (k of pass@k/avg@k/cons@k).")
    rpt_eval_max_tasks: Optional[int] = arg(None, help="Evaluate on the first N held-out tasks only.")
    rlp_ema_decay: float = arg(0.999, help="RLP: decay tau of the EMA no-think teacher, phi <- tau phi + (1 - tau) "
                               "theta after each optimizer step (the paper's 0.999; 0 < tau < 1).")
    rlp_target_tokens: int = arg(1, help="RLP: target tokens N scored after the thought; the reward sums their "
                                 "teacher-forced log-probs (1: the paper's next token; at most the tasks' target length).")


@dataclass
class RunConfig:
    """Everything one pretraining run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    rpt: RPTConfig = field(default_factory=RPTConfig)
    model_preset: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            sub = _SECTIONS.get(f.name)
            if sub is not None:
                known = {sf.name for sf in dataclasses.fields(sub)}
                if f.name == "model" and "swiglu" not in value:
                    value = {**LEGACY_ARCHITECTURE, **value}
                kwargs[f.name] = sub(**{k: v for k, v in value.items() if k in known})
            else:
                kwargs[f.name] = value
        return cls(**kwargs)


# Run configurations recorded before the architecture flags existed (checkpoints' run_config.json)
# describe the one architecture the model code then built: SwiGLU, RMSNorm, no biases, RoPE, and the
# given --num-query-groups.
LEGACY_ARCHITECTURE = dict(swiglu=True, normalization="RMSNorm", add_bias_linear=False,
                           position_embedding_type="rope", group_query_attention=True)

_SECTIONS = {
    "model": ModelConfig, "parallel": ParallelConfig, "optimizer": OptimizerConfig,
    "training": TrainingConfig, "fp8": FP8Config, "data": DataConfig, "checkpoint": CheckpointConfig,
    "logging": LoggingConfig, "loss": LossConfig, "profiling": ProfilingConfig, "rpt": RPTConfig,
}
SECTIONS = dict(_SECTIONS)
# What `mrpt-pretrain` parses (RPT's flags belong to `mrpt-rpt` only).
PRETRAIN_SECTIONS = {k: v for k, v in _SECTIONS.items() if k != "rpt"}
