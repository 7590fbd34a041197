"""The GPT built from Megatron-Core's GPTModel: TransformerConfig, layer spec, model chunks.

The architecture follows Megatron-LM's flags as pretrain_gpt.py maps them (`transformer_config`,
`build_model_chunks`): MLP GeLU or SwiGLU, LayerNorm or RMSNorm (optionally zero-centred),
biases on all linear layers / on Q,K,V only / none, learned absolute positions, RoPE (partial with
--rotary-percent) or none, multi-head or grouped-query attention, optional QK-norm, dense or MoE
layers (--moe-layer-freq, shared experts), tied or untied embeddings. Transformer Engine specs are
used when the platform has TE on CUDA, Megatron-Core's local specs otherwise (the same modules the
CPU path tests).

The per-token head: training and RPT pass labels into the model, as Megatron-LM does, and the
model computes a per-token function of its vocab-parallel logits right where the output layer
leaves them ([s, b, V/TP], the model's dtype). Without labels Megatron-Core returns
``logits.transpose(0, 1).contiguous()`` and, under bf16/fp16, Float16Module upcasts that copy to
fp32: two full-vocabulary copies per micro-batch that the loss does not need. `TokenHeadGPTModel`
overrides only `compute_language_model_loss` (Megatron-Core's hook for the LM loss, also used for
multi-token prediction); `token_head(model, fn)` chooses the function for the forwards inside it
(the loss of the pretraining step, log-probs of RPT's policy and reference).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_rpt.config.schema import RunConfig
from megatron_rpt.config.validation import moe_layer_pattern
from megatron_rpt.platform import Platform


# head(vocab_parallel_logits [s, b, V/TP], labels [s, b]) -> per-token values [s, b] (with autograd)
TokenHead = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TokenHeadGPTModel(GPTModel):
    """Megatron-Core's GPTModel whose loss, when labels are passed, is the per-token head chosen by
    `token_head` (Megatron-Core's cross-entropy when none is). Same parameters and state dict."""

    token_head_fn: Optional[TokenHead] = None

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.token_head_fn is None:
            return super().compute_language_model_loss(labels, logits)
        # labels [b, s] -> [s, b] and the per-token result back to a contiguous [b, s] (small), as
        # Megatron-Core's does: the step then sums the losses in the same order (bit-identical at CE)
        return self.token_head_fn(logits, labels.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while isinstance(module, (DistributedDataParallel, Float16Module)):
        module = module.module
    return module


@contextlib.contextmanager
def token_head(model: torch.nn.Module, head: TokenHead) -> Iterator[None]:
    """Forwards of `model` with labels inside this block return `head(logits, labels)` as [b, s]."""
    inner = unwrap(model)
    if not isinstance(inner, TokenHeadGPTModel):
        raise TypeError(f"{type(inner).__name__} is not a TokenHeadGPTModel (built by build_model_chunks)")
    previous, inner.token_head_fn = inner.token_head_fn, head
    try:
        yield
    finally:
        inner.token_head_fn = previous


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron-LM's padding: a multiple of divisible_by x TP so every shard is equal."""
    multiple = divisible_by * tensor_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def model_vocab_size(tokenizer_vocab_size: int, cfg: RunConfig) -> int:
    """The vocabulary the model embeds, before padding: the tokenizer's, as in Megatron-LM, or the
    recorded --vocab-size when that is larger (an imported HF model may have more embedding rows
    than its tokenizer has tokens: Qwen 151,936 vs 151,665)."""
    return max(tokenizer_vocab_size, cfg.model.vocab_size or 0)


def run_vocab_size(tokenizer_vocab_size: int, cfg: RunConfig) -> int:
    """The vocabulary a run allocates: `model_vocab_size` padded for its tensor-parallel size."""
    return padded_vocab_size(model_vocab_size(tokenizer_vocab_size, cfg), cfg.model.make_vocab_size_divisible_by,
                             cfg.parallel.tensor_model_parallel_size)


def num_virtual_stages(cfg: RunConfig) -> int | None:
    p = cfg.parallel
    if p.num_layers_per_virtual_pipeline_stage is None:
        return None
    return cfg.model.num_layers // (p.pipeline_model_parallel_size * p.num_layers_per_virtual_pipeline_stage)


def params_dtype(cfg: RunConfig) -> torch.dtype:
    if cfg.training.bf16:
        return torch.bfloat16
    if cfg.training.fp16:
        return torch.float16
    return torch.float32


def transformer_config(cfg: RunConfig, platform: Platform) -> TransformerConfig:
    """The Megatron-Core TransformerConfig of this run (model shape + parallel layout + precision)."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    dtype = params_dtype(cfg)
    recompute_num_layers = t.recompute_num_layers
    if t.recompute_granularity == "full" and recompute_num_layers is None:
        recompute_num_layers = 1
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        # As Megatron-LM: without --group-query-attention, multi-head attention.
        num_query_groups=m.num_query_groups if m.group_query_attention else None,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        layernorm_zero_centered_gamma=m.apply_layernorm_1p,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        add_bias_linear=m.add_bias_linear,
        # Megatron-LM keeps the two in sync: biases on every linear layer include Q/K/V's.
        add_qkv_bias=m.add_qkv_bias or m.add_bias_linear,
        qk_layernorm=m.qk_layernorm,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=num_virtual_stages(cfg),
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=t.bf16,
        fp16=t.fp16,
        use_cpu_initialization=platform.device_type == "cpu",
        **fusion_config(cfg, platform),
        batch_p2p_comm=platform.batch_p2p_comm,
        calculate_per_token_loss=t.calculate_per_token_loss,
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method if t.recompute_granularity == "full" else None,
        recompute_num_layers=recompute_num_layers if t.recompute_granularity == "full" else None,
        deallocate_pipeline_outputs=True,
        **fp8_config(cfg),
        **moe_config(cfg),
    )


def fusion_config(cfg: RunConfig, platform: Platform) -> dict:
    """TransformerConfig's fused-kernel switches: the user's flags where the kernel exists on this platform.

    On CPU every fusion is off (they are CUDA kernels); the unfused paths compute the same values.
    Masked-softmax and persistent-layer-norm fusions only concern the local (non-TE) layers, which
    run on CPU or on CUDA without TE, and stay off.
    """
    t, m, cuda = cfg.training, cfg.model, platform.device_type == "cuda"
    # As Megatron-LM: the SwiGLU or the GeLU fusion by the activation; bias + GeLU needs the bias.
    activation = t.bias_swiglu_fusion if m.swiglu else (t.bias_gelu_fusion and m.add_bias_linear)
    return dict(
        bias_activation_fusion=cuda and activation,
        apply_rope_fusion=platform.transformer_engine and t.apply_rope_fusion and m.position_embedding_type == "rope",
        gradient_accumulation_fusion=platform.wgrad_accumulation_fusion and t.gradient_accumulation_fusion,
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )


def fp8_config(cfg: RunConfig) -> dict:
    """TransformerConfig fields of the FP8 flags (empty without --fp8-format).

    Megatron-Core applies them itself: TransformerBlock enters TE's FP8 autocast per layer (bf16 for the
    --first-last-layers-bf16 ones) and TE's fp8_model_init when building with fp8_param.
    """
    f = cfg.fp8
    if not f.fp8_format:
        return {}
    return dict(
        fp8=f.fp8_format,
        fp8_recipe=f.fp8_recipe,
        fp8_margin=f.fp8_margin,
        fp8_amax_history_len=f.fp8_amax_history_len,
        fp8_amax_compute_algo=f.fp8_amax_compute_algo,
        fp8_wgrad=f.fp8_wgrad,
        fp8_param=f.fp8_param_gather,
        first_last_layers_bf16=f.first_last_layers_bf16,
        num_layers_at_start_in_bf16=f.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=f.num_layers_at_end_in_bf16,
    )



def moe_config(cfg: RunConfig) -> dict:
    """TransformerConfig fields of the MoE flags (empty for a dense model)."""
    m, p = cfg.model, cfg.parallel
    if not m.num_experts:
        return {}
    return dict(
        num_moe_experts=m.num_experts,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
        moe_layer_freq=moe_layer_pattern(m),
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_router_topk=m.moe_router_topk,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_load_balancing_type=m.moe_router_load_balancing_type,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_z_loss_coeff=m.moe_z_loss_coeff,
        moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=m.moe_router_bias_update_rate,
        moe_router_dtype=m.moe_router_dtype,
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        moe_grouped_gemm=m.moe_grouped_gemm,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
    )


def layer_spec(cfg: RunConfig, platform: Platform, config: TransformerConfig | None = None,
               vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """Transformer Engine layers on CUDA with TE, Megatron-Core's local ones otherwise. Dense: one layer
    spec for every layer. MoE: Megatron-Core's decoder block spec (as pretrain_gpt.py builds it), which
    makes the layers --moe-layer-freq selects MoE layers and the others dense, for one pipeline stage
    (`pp_rank`, default this rank's; `vp_stage`: its virtual stage)."""
    m = cfg.model
    if m.moe_grouped_gemm and not platform.transformer_engine:
        raise ValueError("--moe-grouped-gemm needs Transformer Engine on CUDA (this platform has none); "
                         "drop the flag to use the sequential experts")
    if m.num_experts:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        return get_gpt_decoder_block_spec(config or transformer_config(cfg, platform),
                                          use_transformer_engine=platform.transformer_engine,
                                          normalization=m.normalization, vp_stage=vp_stage, pp_rank=pp_rank)
    if platform.transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=m.qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=m.qk_layernorm, normalization=m.normalization)


def build_model_chunks(cfg: RunConfig, platform: Platform, vocab_size: int, device: torch.device,
                       config: TransformerConfig | None = None) -> list[GPTModel]:
    """This rank's GPTModel chunk(s): one, or one per virtual pipeline stage (unwrapped, on device).

    `vocab_size` is the padded vocabulary size (see `padded_vocab_size`).
    """
    config = config or transformer_config(cfg, platform)
    vp = num_virtual_stages(cfg)
    chunks = []
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        spec = layer_spec(cfg, platform, config, vp_stage)
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = TokenHeadGPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
            position_embedding_type=cfg.model.position_embedding_type,
            rotary_percent=cfg.model.rotary_percent,
            rotary_base=int(cfg.model.rotary_base),
            vp_stage=vp_stage,
        )
        model.to(device)
        chunks.append(model)
    return chunks
