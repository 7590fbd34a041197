"""Megatron-LM's architecture flags build the model Megatron-Core builds from a TransformerConfig
written by hand (as pretrain_gpt.py would map the flags): same parameter names and shapes, same
config fields, and the analytic parameter count equals the built model's.

The hand-written references state Megatron-LM's meaning of each flag (defaults: GeLU MLP, LayerNorm
eps 1e-5, biases on every linear layer, learned absolute positions, dropout 0.1, multi-head attention).
All cases run in one forked rank (model building needs a process group; it is cheap at these sizes).
"""

import pytest

from tests.dist_harness import run_ranks

SHAPE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
         "--max-position-embeddings", "32", "--lr", "1e-3", "--train-iters", "1", "--mock-data", "--vocab-size", "100"]

# flags -> TransformerConfig fields (beyond the shape) and GPTModel arguments Megatron-LM would use
CASES = {
    "megatron-defaults": ([], dict(), dict()),
    "swiglu": (["--swiglu"], dict(gated_linear_unit=True, activation_func="silu", ffn_hidden_size=128), dict()),
    "rmsnorm-eps": (["--normalization", "RMSNorm", "--norm-epsilon", "1e-6"],
                    dict(normalization="RMSNorm", layernorm_epsilon=1e-6), dict()),
    "no-bias": (["--disable-bias-linear"], dict(add_bias_linear=False, add_qkv_bias=False), dict()),
    "qkv-bias-only": (["--disable-bias-linear", "--add-qkv-bias"], dict(add_bias_linear=False, add_qkv_bias=True),
                      dict()),
    "gqa": (["--group-query-attention", "--num-query-groups", "2"], dict(num_query_groups=2), dict()),
    "gqa-default-groups": (["--group-query-attention"], dict(num_query_groups=1), dict()),
    "rope-partial": (["--position-embedding-type", "rope", "--rotary-percent", "0.5", "--rotary-base", "500000"],
                     dict(), dict(position_embedding_type="rope", rotary_percent=0.5, rotary_base=500000)),
    "no-positions": (["--position-embedding-type", "none"], dict(), dict(position_embedding_type="none")),
    "qk-norm-kv-channels": (["--qk-layernorm", "--kv-channels", "8"], dict(qk_layernorm=True, kv_channels=8), dict()),
    "layernorm-1p": (["--apply-layernorm-1p", "--qk-layernorm"],
                     dict(layernorm_zero_centered_gamma=True, qk_layernorm=True), dict()),
    "untied": (["--untie-embeddings-and-output-weights"], dict(), dict(share_embeddings_and_output_weights=False)),
    "dropout": (["--attention-dropout", "0.0", "--hidden-dropout", "0.25"],
                dict(attention_dropout=0.0, hidden_dropout=0.25), dict()),
    "qwen3-family": (["--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--group-query-attention",
                      "--num-query-groups", "2", "--qk-layernorm", "--position-embedding-type", "rope",
                      "--ffn-hidden-size", "96"],
                     dict(gated_linear_unit=True, activation_func="silu", normalization="RMSNorm",
                          add_bias_linear=False, add_qkv_bias=False, num_query_groups=2, qk_layernorm=True,
                          ffn_hidden_size=96), dict(position_embedding_type="rope")),
    "moe-freq-shared": (["--swiglu", "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
                         "--moe-router-topk", "2", "--moe-layer-freq", "[1,0]*2",
                         "--moe-shared-expert-intermediate-size", "48"],
                        dict(gated_linear_unit=True, activation_func="silu", add_bias_linear=False,
                             add_qkv_bias=False, num_moe_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2,
                             moe_layer_freq=[1, 0, 1, 0], moe_shared_expert_intermediate_size=48,
                             ffn_hidden_size=128), dict()),
    "moe-every-2nd-with-biases": (["--num-experts", "2", "--moe-layer-freq", "2"],
                                  dict(num_moe_experts=2, moe_ffn_hidden_size=256, moe_layer_freq=[1, 0, 1, 0]),
                                  dict()),
}
HAND_DEFAULTS = dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, kv_channels=None,
                     num_query_groups=None, normalization="LayerNorm", layernorm_epsilon=1e-5,
                     gated_linear_unit=False, activation_func="gelu", add_bias_linear=True, add_qkv_bias=True,
                     qk_layernorm=False, layernorm_zero_centered_gamma=False, attention_dropout=0.1, hidden_dropout=0.1, init_method_std=0.02)
MODEL_DEFAULTS = dict(position_embedding_type="learned_absolute", rotary_percent=1.0, rotary_base=10000,
                      share_embeddings_and_output_weights=True)


def _compare_all(rank, world):

    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_rpt import distributed as dist
    from megatron_rpt.config import parse_args
    from megatron_rpt.models.flops import count_parameters
    from megatron_rpt.models.gpt import build_model_chunks, padded_vocab_size
    from megatron_rpt.platform import setup_platform
    from megatron_rpt.validate import validate_config

    platform = setup_platform(force_cpu=True)
    dist.init_distributed(backend="gloo", device_type="cpu", tensor_model_parallel_size=1,
                          pipeline_model_parallel_size=1)
    report = {}
    for name, (flags, config_fields, model_args) in CASES.items():
        cfg = validate_config(parse_args(SHAPE + flags), 1)
        vocab = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
        torch.manual_seed(0)
        ours = build_model_chunks(cfg, platform, vocab, torch.device("cpu"))[0]

        hand = {**HAND_DEFAULTS, **config_fields}
        hand["activation_func"] = {"gelu": F.gelu, "silu": F.silu}[hand["activation_func"]]
        experts = hand.get("num_moe_experts")
        ref_config = TransformerConfig(**hand, use_cpu_initialization=True, bias_activation_fusion=False,
                                       bias_dropout_fusion=False, masked_softmax_fusion=False,
                                       persist_layer_norm=False, apply_rope_fusion=False,
                                       gradient_accumulation_fusion=False)
        # pretrain_gpt.py: the decoder block spec for MoE (dense layers where --moe-layer-freq says 0)
        spec = (get_gpt_decoder_block_spec(ref_config, use_transformer_engine=False,
                                           normalization=hand["normalization"]) if experts else
                get_gpt_layer_local_spec(qk_layernorm=hand["qk_layernorm"], normalization=hand["normalization"]))
        margs = {**MODEL_DEFAULTS, **model_args}
        torch.manual_seed(0)
        ref = GPTModel(config=ref_config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=32,
                       pre_process=True, post_process=True, parallel_output=True, **margs)

        def shapes(model):
            return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}

        assert shapes(ours) == shapes(ref), (name, set(shapes(ours)) ^ set(shapes(ref)))
        for field in hand:
            assert getattr(ours.config, field) == getattr(ref_config, field), (name, field)
        assert ours.position_embedding_type == ref.position_embedding_type, name
        if margs["position_embedding_type"] == "rope":
            assert torch.equal(ours.rotary_pos_emb.inv_freq, ref.rotary_pos_emb.inv_freq), name
        built = sum(p.numel() for p in ours.parameters())
        report[name] = (built, count_parameters(cfg.model, vocab).total)
    return report


def test_architecture_flags_build_megatrons_model_and_count():
    report = run_ranks(_compare_all, 1)[0]
    assert set(report) == set(CASES)
    for name, (built, counted) in report.items():
        assert counted == built, (name, counted, built)
    # the flags matter: the defaults (biases, LayerNorm with bias, learned positions) differ from the family
    assert report["megatron-defaults"][0] != report["qwen3-family"][0]


def test_architecture_flag_errors_are_named():
    from megatron_rpt.config import ConfigError, parse_args
    from megatron_rpt.validate import validate_config

    def problems(flags):
        with pytest.raises(ConfigError) as e:
            validate_config(parse_args(SHAPE + flags), 1)
        return "\n".join(e.value.problems)

    assert "without --group-query-attention" in problems(["--num-query-groups", "2"])
    assert "--rotary-percent must be in (0, 1]" in problems(["--rotary-percent", "0"])
    assert "RoPE rotates pairs" in problems(["--position-embedding-type", "rope", "--rotary-percent", "0.1875"])  # 3 of 16
    assert "--hidden-dropout must be in [0, 1)" in problems(["--hidden-dropout", "1.0"])
    assert "--max-position-embeddings 32 < --seq-length 64" in problems(["--seq-length", "64"])
    assert "needs --num-experts" in problems(["--moe-layer-freq", "2"])
    assert "gives 3 layers, --num-layers is 4" in problems(["--num-experts", "2", "--moe-layer-freq", "[1,0,1]"])
    assert "expected N or a list pattern" in problems(["--num-experts", "2", "--moe-layer-freq", "__import__('os')"])
    assert "--moe-shared-expert-intermediate-size needs --num-experts" in problems(
        ["--moe-shared-expert-intermediate-size", "8"])
    assert "--moe-grouped-gemm has no biases" in problems(["--num-experts", "2", "--moe-grouped-gemm"])


def _layernorm_1p(rank, world):
    import torch
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_rpt import distributed as dist
    from megatron_rpt.config import parse_args
    from megatron_rpt.models.gpt import build_model_chunks, padded_vocab_size
    from megatron_rpt.platform import setup_platform
    from megatron_rpt.validate import validate_config

    platform = setup_platform(force_cpu=True)
    dist.init_distributed(backend="gloo", device_type="cpu", tensor_model_parallel_size=1,
                          pipeline_model_parallel_size=1)
    dist.set_random_seed(0)
    out = {}
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16).unsqueeze(0).expand(2, 16)
    for norm in ("LayerNorm", "RMSNorm"):
        flags = SHAPE + ["--normalization", norm, "--qk-layernorm", "--hidden-dropout", "0", "--attention-dropout", "0"]
        models = {}
        for one_p in (True, False):
            cfg = validate_config(parse_args(flags + (["--apply-layernorm-1p"] if one_p else [])), 1)
            vocab = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
            torch.manual_seed(0)
            models[one_p] = build_model_chunks(cfg, platform, vocab, torch.device("cpu"))[0].eval()
        zc, plain = models[True], models[False]
        norm_keys = [k for k, v in zc.state_dict().items() if "norm.weight" in k or "layernorm.weight" in k]
        # every norm (input, pre-MLP, Q/K, final) starts at weight 0, i.e. gamma 1 (TE's zero_centered_gamma)
        initial = {k: float(zc.state_dict()[k].abs().max()) for k in norm_keys}
        with torch.no_grad():
            for k in norm_keys:
                zc.state_dict()[k].normal_(0, 0.3)
        state = {k: (v + 1 if k in norm_keys else v) for k, v in zc.state_dict().items()}
        plain.load_state_dict(state)
        with torch.no_grad():
            a = zc(tokens, positions, None)
            b = plain(tokens, positions, None)
        out[norm] = (sorted(k.split(".")[-2] for k in norm_keys), initial, float((a - b).abs().max()),
                     float(a.abs().max()))
    # composed with the sequence-parallel norm (P7: MoE with TP > 1 on CPU): both apply
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, sequence_parallel=True,
                               tensor_model_parallel_size=2, layernorm_zero_centered_gamma=True)
    n = WrappedTorchNorm(config, 8)
    out["sp"] = (type(n).__name__, all(getattr(p, "sequence_parallel", False) for p in n.parameters()),
                 config.layernorm_zero_centered_gamma, float(n.weight.abs().max()))
    return out


def test_apply_layernorm_1p_is_the_norm_times_one_plus_weight():
    """--apply-layernorm-1p on the torch norm (P17): weights start at 0 and a model with norm weights w
    computes exactly what the plain model computes with weights 1 + w, for LayerNorm and RMSNorm and
    every norm of the model (input, pre-MLP, Q/K, final)."""
    out = run_ranks(_layernorm_1p, 1)[0]
    for norm in ("LayerNorm", "RMSNorm"):
        names, initial, diff, scale = out[norm]
        assert set(names) == {"input_layernorm", "pre_mlp_layernorm", "q_layernorm", "k_layernorm",
                              "final_layernorm"}, names
        assert all(v == 0.0 for v in initial.values()), initial
        assert diff == 0.0 and scale > 0, (norm, diff)
    assert out["sp"] == ("ZeroCentredLayerNorm", True, True, 0.0)
