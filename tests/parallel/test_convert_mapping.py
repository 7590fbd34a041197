"""HF <-> Megatron mapping: a random transformers model's weights, mapped into the Megatron model at
TP=1 and TP=2, give transformers' logits; mapped back they are bit-exact.

Models are small random Llama / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral configs created in the workers (no
downloads), fp32, norms and biases randomised so that a swapped norm or bias would show. Tolerance on logits: 2e-4 absolute
(fp32 sums in a different order; a wrong mapping is off by > 1e-1).
"""

import pytest

from tests.dist_harness import run_ranks

ATOL = 2e-4
SEQ = 16

HF_CONFIGS = {
    "LlamaForCausalLM": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=200, max_position_embeddings=64,
                             rms_norm_eps=1e-6, tie_word_embeddings=False),
    "Qwen2ForCausalLM": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=200, max_position_embeddings=64,
                             rms_norm_eps=1e-6, tie_word_embeddings=True),
    "MixtralForCausalLM": dict(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               vocab_size=200, max_position_embeddings=64, rms_norm_eps=1e-6,
                               tie_word_embeddings=False),
    "Qwen3ForCausalLM": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=200, max_position_embeddings=64,
                             rms_norm_eps=1e-6, tie_word_embeddings=True),
    "Qwen3MoeForCausalLM": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=200,
                                max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def _hf_model(arch):
    import torch
    import transformers
    cls = getattr(transformers, arch)
    config = getattr(transformers, cls.config_class.__name__)(architectures=[arch], **HF_CONFIGS[arch])
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):   # transformers initialises biases to zero
                p.normal_(0.0, 0.5)
    return model


def _save_hf(rank, world, arch, folder):
    """Write the random model as save_pretrained does (the layout the mapping is defined on: e.g. one
    tensor per expert, where transformers 5 holds experts stacked in memory). A 1-rank worker:
    transformers saves only on the main rank of an initialised process group."""
    _hf_model(arch).save_pretrained(folder)


def _check(rank, world, arch, folder):
    import dataclasses

    import torch
    from megatron.core import parallel_state as ps

    from megatron_rpt import distributed as dist
    from megatron_rpt.config import parse_args
    from megatron_rpt.validate import validate_config
    from megatron_rpt.convert.hf_config import model_flags_from_hf, shape_from_hf
    from megatron_rpt.convert.mapping import expand, family_rules, merge_tp, to_hf, to_megatron
    from megatron_rpt.models.gpt import build_model_chunks, padded_vocab_size
    from megatron_rpt.platform import setup_platform

    platform = setup_platform(force_cpu=True)
    import transformers
    from safetensors.torch import load_file
    hf = getattr(transformers, arch).from_pretrained(folder).eval()
    hf_sd = load_file(f"{folder}/model.safetensors")
    config = hf.config.to_dict()
    flags = model_flags_from_hf(config)
    argv = ["--mock-data", "--vocab-size", "200", "--lr", "1e-3", "--train-iters", "2", "--seq-length", str(SEQ),
            "--tensor-model-parallel-size", str(world)] + (["--sequence-parallel"] if world > 1 else [])
    base = parse_args(argv)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, **flags))
    cfg = validate_config(cfg, world)
    dist.init_distributed(backend="gloo", device_type="cpu", tensor_model_parallel_size=world)
    dist.set_random_seed(1)
    vocab = padded_vocab_size(200, cfg.model.make_vocab_size_divisible_by, world)
    model = build_model_chunks(cfg, platform, vocab, torch.device("cpu"))[0].eval()
    shape = shape_from_hf(config, vocab)
    rules = family_rules(arch)
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), world

    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    mapped = {}
    for name, hf_names, rule, _, _ in expand(rules, shape):
        mapped[name] = (rule, hf_names, to_megatron(rule, [hf_sd[n] for n in hf_names], shape, tp_rank, tp, name))
    assert set(mapped) == set(own), (sorted(set(own) - set(mapped)), sorted(set(mapped) - set(own)))
    with torch.no_grad():
        for name, (_, _, tensor) in mapped.items():
            assert own[name].shape == tensor.shape, (name, own[name].shape, tensor.shape)
            own[name].copy_(tensor)

    torch.manual_seed(5)
    tokens = torch.randint(0, 200, (2, SEQ))
    positions = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        logits = model(tokens, positions, mask)  # [b, s, V/TP]
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        ours = torch.cat(parts, dim=-1)[..., :200]
        ref = hf(tokens).logits
    diff = (ours - ref).abs().max().item()

    # Back to HF: merge the TP shards, invert the mapping, compare bit for bit.
    exact = True
    for name, (rule, hf_names, _) in mapped.items():
        shard = own[name].contiguous()
        shards = [torch.empty_like(shard) for _ in range(tp)]
        torch.distributed.all_gather(shards, shard, group=ps.get_tensor_model_parallel_group())
        for hf_name, tensor in zip(hf_names, to_hf(rule, merge_tp(rule, shards, shape), shape)):
            exact &= torch.equal(tensor, hf_sd[hf_name])
    return diff, exact, float(ref.abs().mean())


# Qwen2 and Mixtral at TP=2 only (the split and the logits in one run; keeps the suite's time).
@pytest.mark.parametrize("arch,world", [(arch, world) for arch in HF_CONFIGS for world in (1, 2)
                                        if world == 2 or arch not in ("Qwen2ForCausalLM", "MixtralForCausalLM")])
def test_hf_weights_in_megatron_give_transformers_logits(arch, world, tmp_path):
    run_ranks(_save_hf, 1, arch, str(tmp_path))
    for diff, exact, scale in run_ranks(_check, world, arch, str(tmp_path), timeout=240):
        assert scale > 1e-2  # logits are not trivially zero
        assert diff < ATOL, diff
        assert exact


def test_mapping_refuses_what_it_cannot_reproduce():
    from megatron_rpt.convert.hf_config import model_flags_from_hf
    base = dict(HF_CONFIGS["LlamaForCausalLM"], architectures=["LlamaForCausalLM"], num_hidden_layers=2,
                rope_parameters={"rope_theta": 1e4, "rope_type": "default"}, hidden_act="silu")
    assert model_flags_from_hf(base)["rotary_base"] == 1e4
    for change, msg in [(dict(architectures=["GPT2LMHeadModel"]), "not supported; supported"),
                        (dict(attention_bias=True), "attention_bias=true"),
                        (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "llama3"}), "RoPE scaling"),
                        (dict(hidden_act="gelu"), "hidden_act")]:
        with pytest.raises(ValueError, match=msg):
            model_flags_from_hf({**base, **change})
    moe = dict(HF_CONFIGS["Qwen3MoeForCausalLM"], architectures=["Qwen3MoeForCausalLM"], hidden_act="silu",
               rope_parameters={"rope_theta": 1e4, "rope_type": "default"})
    with pytest.raises(ValueError, match="norm_topk_prob=false"):
        model_flags_from_hf({**moe, "norm_topk_prob": False})
    with pytest.raises(ValueError, match="mlp_only_layers"):
        model_flags_from_hf({**moe, "mlp_only_layers": [0]})


@pytest.mark.parametrize("arch", list(HF_CONFIGS))
def test_printed_model_flags_rebuild_the_imported_model(arch):
    """The flags `convert_checkpoint.py import` prints (model_flags_argv) parse back to exactly the
    model fields the import recorded, booleans included (Megatron-LM's defaults are a GeLU/LayerNorm GPT
    with biases, so the family flags are printed; Qwen3: --qk-layernorm, Qwen2: --add-qkv-bias)."""
    from megatron_rpt.config import parse_args
    from megatron_rpt.config.arguments import model_flags_argv
    from megatron_rpt.convert.hf_config import model_flags_from_hf
    config = dict(HF_CONFIGS[arch], architectures=[arch], hidden_act="silu",
                  rope_parameters={"rope_theta": 1e4, "rope_type": "default"})
    flags = model_flags_from_hf(config)
    model = parse_args(model_flags_argv(flags)).model
    for name, value in flags.items():
        assert getattr(model, name) == value, (name, getattr(model, name), value)
    argv = model_flags_argv(flags)
    assert ("--qk-layernorm" in argv) == ("Qwen3" in arch) and "--no-qk-layernorm" not in argv
    assert ("--add-qkv-bias" in argv) == (arch == "Qwen2ForCausalLM")
    assert {"--swiglu", "--disable-bias-linear", "--group-query-attention"} <= set(argv)
    assert argv[argv.index("--normalization") + 1] == "RMSNorm"
    assert argv[argv.index("--position-embedding-type") + 1] == "rope"
