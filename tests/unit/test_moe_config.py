"""MoE flags: every validation error of the expert layouts and router settings, and the
TransformerConfig / layer-spec wiring they produce."""

import pytest

from megatron_rpt.config import ConfigError, parse_args
from megatron_rpt.validate import validate_config
from tests.unit.config_checks import config_checkers

BASE = ["--model-preset", "tiny-moe", "--lr", "1e-3", "--train-iters", "10", "--mock-data", "--vocab-size", "512"]


problems, one_problem = config_checkers(BASE)


def test_valid_layouts_pass():
    for world, argv in [(1, []), (2, ["--expert-model-parallel-size", "2"]),
                        (4, ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                             "--sequence-parallel"]),
                        (4, ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                             "--sequence-parallel", "--expert-tensor-parallel-size", "1"]),
                        (4, ["--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
                        (8, ["--expert-model-parallel-size", "8"])]:
        validate_config(parse_args(BASE + argv), world)


def test_experts_not_divisible_by_expert_parallel():
    msg = one_problem(["--num-experts", "6", "--expert-model-parallel-size", "4"], world_size=4)
    assert "--num-experts 6 is not divisible by --expert-model-parallel-size 4" in msg


def test_world_not_divisible_by_expert_tp_x_ep_x_pp():
    msg = one_problem(["--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "2",
                       "--pipeline-model-parallel-size", "2"], world_size=4)
    assert msg == ("world size 4 is not divisible by --expert-tensor-parallel-size 2 x "
                   "--expert-model-parallel-size 2 x --pipeline-model-parallel-size 2 = 8")
    msg = one_problem(["--expert-model-parallel-size", "4"], world_size=6)
    assert "world size 6" in msg and "= 4" in msg


def test_topk_larger_than_experts():
    msg = one_problem(["--moe-router-topk", "9"])
    assert msg == "--moe-router-topk 9 must be between 1 and --num-experts 8"
    assert "--moe-router-topk 0" in one_problem(["--moe-router-topk", "0"])


def test_tensor_parallel_needs_sequence_parallel():
    msg = one_problem(["--tensor-model-parallel-size", "2"], world_size=2)
    assert "--tensor-model-parallel-size > 1 needs --sequence-parallel" in msg


def test_expert_bias_needs_sigmoid():
    msg = one_problem(["--moe-router-score-function", "softmax"])  # tiny-moe enables the expert bias
    assert msg == "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid"


def test_aux_loss_coefficient_with_balancing_none():
    msg = one_problem(["--moe-aux-loss-coeff", "0.01"])  # tiny-moe balances with the bias: type none
    assert "--moe-aux-loss-coeff 0.01 with --moe-router-load-balancing-type none" in msg
    validate_config(parse_args(BASE + ["--moe-aux-loss-coeff", "0.01", "--moe-router-load-balancing-type",
                                       "aux_loss"]), 1)


def test_expert_ffn_not_divisible_by_expert_tp_and_negative_rates():
    msg = one_problem(["--moe-ffn-hidden-size", "63", "--expert-tensor-parallel-size", "2",
                       "--expert-model-parallel-size", "2"], world_size=4)
    assert "--moe-ffn-hidden-size 63 is not divisible by --expert-tensor-parallel-size 2" in msg
    assert "must be >= 0" in one_problem(["--moe-router-bias-update-rate=-1e-3"])


def test_expert_flags_without_experts():
    dense = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
             "--seq-length", "32", "--lr", "1e-3", "--train-iters", "10", "--mock-data", "--vocab-size", "512"]
    with pytest.raises(ConfigError, match="need --num-experts"):
        validate_config(parse_args(dense + ["--expert-model-parallel-size", "2"]), 2)


def test_all_problems_reported_together():
    found = problems(["--num-experts", "6", "--expert-model-parallel-size", "4", "--moe-router-topk", "7",
                      "--tensor-model-parallel-size", "2", "--moe-router-score-function", "softmax"], world_size=4)
    assert len(found) == 5, found  # divisibility, world size (TP2 x EP4 = 8), top-k, SP, bias/softmax


# With --expert-model-parallel-size 1, an expert TP different from TP trained silently wrong on
# Megatron-Core 0.16.1 (expert weights are marked allreduce=False only when EP > 1,
# tensor_parallel/layers.py:886/1209, so DDP reduced their gradients over the dense data-parallel
# group; measured: tiny-moe TP2+SP/ETP1 step-4 loss 5.1043 vs 5.0963 single-process). Now refused.
@pytest.mark.parametrize("world,argv", [
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1"]),
    (2, ["--expert-tensor-parallel-size", "2"]),
], ids=["tp2-etp1-ep1", "tp1-etp2-ep1"])
def test_expert_tp_other_than_tp_needs_expert_parallel(world, argv):
    assert any("needs --expert-model-parallel-size > 1" in p for p in problems(argv, world))


def test_transformer_config_and_layer_spec():
    from megatron_rpt.models.gpt import layer_spec, moe_config
    from megatron_rpt.platform import setup_platform

    cfg = validate_config(parse_args(BASE + ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size",
                                             "2", "--sequence-parallel", "--moe-token-dispatcher-type",
                                             "allgather"]), 4)
    mc = moe_config(cfg)
    assert (mc["num_moe_experts"], mc["moe_ffn_hidden_size"], mc["moe_router_topk"]) == (8, 64, 2)
    assert mc["moe_router_score_function"] == "sigmoid" and mc["moe_router_enable_expert_bias"]
    assert mc["moe_router_bias_update_rate"] == 1e-3 and mc["moe_router_load_balancing_type"] == "none"
    assert mc["moe_token_dispatcher_type"] == "allgather" and mc["moe_router_dtype"] == "fp32"
    assert (mc["expert_model_parallel_size"], mc["expert_tensor_parallel_size"]) == (2, 2)  # ETP defaults to TP
    platform = setup_platform(force_cpu=True)
    spec = layer_spec(cfg, platform, pp_rank=0)   # MoE: Megatron-Core's decoder block spec, one layer spec per layer
    mlp = spec.layer_specs[0].submodules.mlp  # a ModuleSpec (megatron-core < 0.17) or a functools.partial builder (0.19)
    assert "MoELayer" in getattr(mlp, "module", getattr(mlp, "func", None)).__name__
    dense = parse_args(["--model-preset", "tiny"])
    assert moe_config(dense) == {}


def test_grouped_gemm_needs_transformer_engine_on_cuda():
    from megatron_rpt.models.gpt import layer_spec
    from megatron_rpt.platform import setup_platform

    cfg = validate_config(parse_args(BASE + ["--moe-grouped-gemm"]), 1)
    with pytest.raises(ValueError, match="--moe-grouped-gemm needs Transformer Engine on CUDA"):
        layer_spec(cfg, setup_platform(force_cpu=True))
