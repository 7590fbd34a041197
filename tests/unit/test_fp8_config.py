"""FP8 and fused-kernel flags: Megatron-LM names and defaults (checked against Megatron-Core's own
TransformerConfig defaults), every validation error, the hardware check against a platform, and the
TransformerConfig fields they produce (built for real, so Megatron-Core's own checks run too).

The FP8 numerics themselves need a Hopper GPU with Transformer Engine: tests/gpu/test_te_fp8.py."""

import dataclasses

import pytest

from megatron_rpt.config import ConfigError, parse_args
from megatron_rpt.validate import validate_config
from tests.unit.config_checks import config_checkers
from megatron_rpt.config.schema import FP8Config
from megatron_rpt.config.validation import sequence_length_multiple, validate_platform
from megatron_rpt.platform import GPUInfo, Platform

BASE = ["--model-preset", "tiny", "--lr", "1e-3", "--train-iters", "10", "--mock-data", "--vocab-size", "512",
        "--bf16"]
FP8 = ["--fp8-format", "hybrid"]

CPU = Platform("cpu", "gloo", False, False, "0.16.1", False)
H100 = Platform("cuda", "nccl", True, False, "0.16.1", True)
HOPPER = GPUInfo("NVIDIA H100 80GB HBM3", (9, 0))
ADA = GPUInfo("NVIDIA L40S", (8, 9))


problems, one_problem = config_checkers(BASE)


def test_defaults_are_megatron_cores():
    from megatron.core.transformer import TransformerConfig

    core = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    ours = FP8Config()
    assert ours.fp8_format is None and core["fp8"] is None
    for name in ("fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_wgrad",
                 "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
        assert getattr(ours, name) == core[name], name
    assert ours.fp8_recipe == core["fp8_recipe"] == "delayed"
    assert ours.fp8_param_gather is core["fp8_param"] is False


def test_megatron_lm_flag_names_parse():
    cfg = parse_args(BASE + ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-margin", "1",
                             "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max", "--no-fp8-wgrad",
                             "--fp8-param-gather", "--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "0",
                             "--num-layers-at-end-in-bf16", "2", "--no-bias-swiglu-fusion", "--no-rope-fusion",
                             "--no-gradient-accumulation-fusion"])
    assert cfg.fp8 == FP8Config(fp8_format="e4m3", fp8_recipe="blockwise", fp8_margin=1, fp8_amax_history_len=1024,
                                fp8_amax_compute_algo="max", fp8_wgrad=False, fp8_param_gather=True,
                                first_last_layers_bf16=True, num_layers_at_start_in_bf16=0,
                                num_layers_at_end_in_bf16=2)
    t = cfg.training
    assert not (t.bias_swiglu_fusion or t.apply_rope_fusion or t.gradient_accumulation_fusion)
    for bad in (["--fp8-format", "e5m2"], ["--fp8-recipe", "nvfp4"], ["--fp8-amax-compute-algo", "mean"]):
        with pytest.raises(SystemExit):
            parse_args(BASE + bad)


def test_valid_fp8_configs_pass():
    fp16 = [a for a in BASE if a != "--bf16"] + ["--fp16", "--fp8-format", "e4m3"]
    for world, argv in [(1, BASE + FP8), (1, BASE + FP8 + ["--fp8-recipe", "tensorwise", "--first-last-layers-bf16"]),
                        (2, BASE + FP8 + ["--fp8-param-gather", "--use-distributed-optimizer"]),
                        (2, BASE + FP8 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                        (1, fp16)]:
        validate_config(parse_args(argv), world)


def test_fp8_needs_a_half_precision_dtype():
    with pytest.raises(ConfigError) as e:
        validate_config(parse_args([a for a in BASE if a != "--bf16"] + FP8), 1)
    assert e.value.problems == ["--fp8-format hybrid needs --bf16 (or --fp16): FP8 covers the transformer "
                                "layers' GEMMs only; the rest runs in that dtype"]


def test_fp8_only_flags_need_fp8_format():
    assert problems(["--fp8-param-gather", "--first-last-layers-bf16"]) == [
        "--fp8-param-gather needs --fp8-format e4m3|hybrid", "--first-last-layers-bf16 needs --fp8-format e4m3|hybrid"]


def test_fp8_param_gather_needs_distributed_optimizer():
    assert "--fp8-param-gather needs --use-distributed-optimizer" in one_problem(FP8 + ["--fp8-param-gather"])


def test_first_last_bf16_layers():
    assert "does not work with --fp8-recipe delayed" in one_problem(FP8 + ["--first-last-layers-bf16"])
    tensorwise = FP8 + ["--fp8-recipe", "tensorwise", "--first-last-layers-bf16"]
    # tiny has 4 layers: at most 4 per stage, 2 per stage with PP=2.
    assert one_problem(tensorwise + ["--num-layers-at-end-in-bf16", "5"]) == (
        "--num-layers-at-end-in-bf16 5 must be between 0 and the layers per pipeline stage (4)")
    assert one_problem(tensorwise + ["--num-layers-at-start-in-bf16", "3", "--pipeline-model-parallel-size", "2"],
                       world_size=2) == "--num-layers-at-start-in-bf16 3 must be between 0 and the layers per pipeline stage (2)"
    assert "--num-layers-at-start-in-bf16 -1" in one_problem(tensorwise + ["--num-layers-at-start-in-bf16", "-1"])


def test_delayed_scaling_ranges():
    assert problems(FP8 + ["--fp8-amax-history-len", "0", "--fp8-margin", "-1"]) == [
        "--fp8-amax-history-len must be >= 1 (got 0)", "--fp8-margin must be >= 0 (got -1)"]


def test_sequence_length_multiple():
    def multiple(argv):
        return sequence_length_multiple(parse_args(BASE + argv))

    assert multiple([]) == 8
    assert multiple(["--tensor-model-parallel-size", "3"]) == 8           # TP without SP keeps whole sequences
    assert multiple(["--tensor-model-parallel-size", "2", "--sequence-parallel"]) == 16
    assert multiple(FP8) == 16
    assert multiple(FP8 + ["--tensor-model-parallel-size", "2"]) == 16
    assert multiple(FP8 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]) == 32
    assert multiple(FP8 + ["--context-parallel-size", "2"]) == 32           # CP splits the sequence too
    assert multiple(FP8 + ["--fp8-recipe", "mxfp8"]) == 32                 # MXFP8's 1x32 scaling blocks


def test_fp8_gemm_shapes():
    assert one_problem(FP8 + ["--seq-length", "72"]) == (
        "--fp8-format: --seq-length 72 must be a multiple of 16 (16 tokens per rank)")
    msg = one_problem(FP8 + ["--seq-length", "80", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
                      world_size=2)
    assert msg == "--fp8-format: --seq-length 80 must be a multiple of 32 (16 tokens per rank x TP 2 (--sequence-parallel))"
    assert any(p == "--fp8-format: --seq-length 112 must be a multiple of 64 (32 tokens per rank x CP 2)"
               for p in problems(FP8 + ["--fp8-recipe", "mxfp8", "--seq-length", "112", "--context-parallel-size",
                                        "2"], world_size=2))
    assert "--ffn-hidden-size 400 must be a multiple of 32" in one_problem(
        FP8 + ["--fp8-recipe", "mxfp8", "--ffn-hidden-size", "400"])
    # tiny: hidden 128, ffn 384, 4 heads x 32
    assert one_problem(FP8 + ["--ffn-hidden-size", "200"]) == (
        "--fp8-format: --ffn-hidden-size 200 must be a multiple of 16 (Transformer Engine's FP8 GEMM rule)")
    assert one_problem(FP8 + ["--ffn-hidden-size", "144", "--tensor-model-parallel-size", "2",
                              "--sequence-parallel"], world_size=2) == (
        "--fp8-format: --ffn-hidden-size 144 / TP 2 must be a multiple of 16 (Transformer Engine's FP8 GEMM rule)")
    assert "--num-attention-heads x --kv-channels 40" in one_problem(FP8 + ["--kv-channels", "10"])
    moe = ["--model-preset", "tiny-moe"] + FP8 + ["--moe-ffn-hidden-size", "40"]
    assert any("--moe-ffn-hidden-size 40 must be a multiple of 16" in p for p in problems(moe))


def test_platform_check():
    cfg = validate_config(parse_args(BASE + FP8), 1)
    with pytest.raises(ConfigError, match=r"--fp8-format hybrid needs a CUDA GPU with Transformer Engine; "
                                          r"this run is on cpu$"):
        validate_platform(cfg, CPU)
    with pytest.raises(ConfigError, match="needs Transformer Engine, which does not import here"):
        validate_platform(cfg, dataclasses.replace(H100, transformer_engine=False), HOPPER)
    validate_platform(cfg, H100, HOPPER)
    validate_platform(cfg, H100, ADA)
    validate_platform(cfg, H100)  # device not known: Transformer Engine will say
    with pytest.raises(ConfigError, match=r"--fp8-recipe delayed needs compute capability >= 8\.9; "
                                          r"NVIDIA A100-SXM4-80GB has 8\.0"):
        validate_platform(cfg, H100, GPUInfo("NVIDIA A100-SXM4-80GB", (8, 0)))
    for recipe, ok_on in (("blockwise", [HOPPER]), ("mxfp8", [])):
        c = validate_config(parse_args(BASE + FP8 + ["--fp8-recipe", recipe]), 1)
        for gpu in (ADA, HOPPER):
            if gpu in ok_on:
                validate_platform(c, H100, gpu)
            else:
                with pytest.raises(ConfigError, match=f"--fp8-recipe {recipe} needs compute capability"):
                    validate_platform(c, H100, gpu)
    validate_platform(validate_config(parse_args(BASE), 1), CPU)  # no FP8: nothing asked of the hardware
    assert CPU.gpu() is None


def test_transformer_config_fields():
    """Megatron-Core's TransformerConfig is built with our FP8 fields (its __post_init__ checks run)."""
    from megatron_rpt.models.gpt import transformer_config

    cfg = validate_config(parse_args(BASE + ["--fp8-format", "e4m3", "--fp8-recipe", "tensorwise",
                                             "--fp8-amax-history-len", "16", "--no-fp8-wgrad",
                                             "--first-last-layers-bf16", "--num-layers-at-end-in-bf16", "0",
                                             "--no-rope-fusion"]), 1)
    tc = transformer_config(cfg, H100)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_amax_history_len, tc.fp8_wgrad) == ("e4m3", "tensorwise", 16, False)
    assert tc.first_last_layers_bf16 and (tc.num_layers_at_start_in_bf16, tc.num_layers_at_end_in_bf16) == (1, 0)
    assert tc.fp8_param is False and tc.bf16 and tc.bias_activation_fusion and not tc.apply_rope_fusion
    plain = transformer_config(validate_config(parse_args(BASE), 1), CPU)
    assert plain.fp8 is None and not plain.bias_activation_fusion and not plain.gradient_accumulation_fusion


def test_fusions_follow_the_platform():
    from megatron_rpt.models.gpt import fusion_config

    cfg = parse_args(BASE)
    assert fusion_config(cfg, CPU) == dict(bias_activation_fusion=False, apply_rope_fusion=False,
                                           gradient_accumulation_fusion=False, bias_dropout_fusion=False,
                                           masked_softmax_fusion=False, persist_layer_norm=False)
    on_h100 = fusion_config(cfg, H100)
    assert on_h100["bias_activation_fusion"] and on_h100["apply_rope_fusion"] and on_h100["bias_dropout_fusion"]
    assert not on_h100["gradient_accumulation_fusion"]  # needs Apex's fused_weight_gradient_mlp_cuda
    apex = dataclasses.replace(H100, wgrad_accumulation_fusion=True)
    assert fusion_config(cfg, apex)["gradient_accumulation_fusion"]
    assert not fusion_config(parse_args(BASE + ["--no-gradient-accumulation-fusion"]), apex)[
        "gradient_accumulation_fusion"]
    no_te = dataclasses.replace(H100, transformer_engine=False)
    assert not fusion_config(cfg, no_te)["apply_rope_fusion"]
    assert not fusion_config(parse_args(BASE + ["--no-bias-swiglu-fusion"]), H100)["bias_activation_fusion"]


def test_rpt_rollout_batches_fit_fp8():
    from megatron_rpt.config import parse_rpt_args
    from megatron_rpt.validate import validate_rpt_config

    argv = BASE[:-1] + ["--rpt-data", "tasks.jsonl", "--seq-length", "128", "--rpt-max-response-length", "64",
                        "--rpt-contexts-per-step", "4", "--rpt-group-size", "4", "--micro-batch-size", "4"]
    with pytest.raises(ConfigError) as e:
        validate_rpt_config(parse_rpt_args(argv + ["--bf16"] + FP8 + ["--rollout-max-batch-size", "24"]), 1,
                            check_files=False)
    assert e.value.problems == ["--rollout-max-batch-size 24 must be a multiple of 16 with --fp8-format (the "
                                "embedded engine pads every batch to it: a decode step's FP8 GEMMs have one row per "
                                "sequence)"]
    validate_rpt_config(parse_rpt_args(argv + ["--bf16"] + FP8 + ["--rollout-max-batch-size", "32"]), 1,
                        check_files=False)
    validate_rpt_config(parse_rpt_args(argv + ["--rollout-max-batch-size", "24"]), 1, check_files=False)


def test_fp8_inference_padding_is_undone(monkeypatch):
    """megatron-core 0.19's inference wrapper gives every TE linear layer an instance `forward` for good;
    the embedded engine (whose model is the trainer's) removes it from its model's layers only."""
    import weakref

    import torch
    from megatron.core import fp8_utils

    from megatron_rpt.inference.megatron_engine import _undo_fp8_inference_padding

    model, other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2)
    wrapped = weakref.WeakSet()
    for layer in (model[0], other):
        layer.forward = lambda x: x * 0   # what the 0.19 wrapper installs (an instance attribute)
        wrapped.add(layer)
    monkeypatch.setattr(fp8_utils, "_fp8_inference_wrapped_modules", wrapped, raising=False)
    x = torch.ones(1, 2)
    assert _undo_fp8_inference_padding(model) == 1
    assert torch.equal(model[0](x), torch.nn.functional.linear(x, model[0].weight, model[0].bias))
    assert "forward" not in model[0].__dict__ and model[0] not in wrapped
    assert other in wrapped and torch.equal(other(x), x * 0)          # another model's layers are left alone
    monkeypatch.delattr(fp8_utils, "_fp8_inference_wrapped_modules")
    assert _undo_fp8_inference_padding(model) == 0                    # 0.16: nothing to undo
