"""Parameter counts and FLOPs: the analytic accounting equals the built Megatron model, summed over ranks."""

import pytest

from megatron_rpt.config import parse_args
from megatron_rpt.validate import validate_config
from megatron_rpt.models.flops import count_parameters, peak_tflops_for_device, training_flops_per_token
from megatron_rpt.models.gpt import padded_vocab_size
from tests.dist_harness import run_ranks

SHAPE = ["--num-layers", "2", "--hidden-size", "96", "--ffn-hidden-size", "160", "--num-attention-heads", "6",
         "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "24", "--seq-length", "16", "--lr", "1e-3",
         "--train-iters", "1", "--mock-data", "--vocab-size", "1000"]


def _built_params(rank, world, argv):
    import torch
    from megatron.core import parallel_state as ps

    from megatron_rpt import distributed as dist
    from megatron_rpt.models.gpt import build_model_chunks, padded_vocab_size as pad
    from megatron_rpt.platform import setup_platform

    platform = setup_platform(force_cpu=True)
    cfg = validate_config(parse_args(argv), world)
    p = cfg.parallel
    dist.init_distributed(backend="gloo", device_type="cpu", tensor_model_parallel_size=p.tensor_model_parallel_size,
                          pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                          expert_model_parallel_size=p.expert_model_parallel_size,
                          expert_tensor_parallel_size=p.expert_tensor_parallel_size)
    vocab = pad(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, p.tensor_model_parallel_size)
    chunks = build_model_chunks(cfg, platform, vocab, torch.device("cpu"))
    # Each rank counts the parameters it holds a unique copy of:
    # - dense parameters are replicated over data parallel (count on DP rank 0) and, unless split over
    #   TP (`tensor_model_parallel`), over TP (count on TP rank 0 only);
    # - expert parameters (Megatron marks them `allreduce = False` when EP > 1) are split over EP and
    #   expert TP and replicated over expert data parallel (count on expert-DP rank 0). At EP = 1 they
    #   are ordinary TP-split parameters of the dense layout (ETP = TP there).
    # Pipeline stages hold different layers, so the sum over all ranks counts each parameter once.
    dense_copy = ps.get_data_parallel_rank() == 0
    expert_copy = ps.get_expert_data_parallel_rank() == 0
    counted = experts = 0
    for chunk in chunks:
        for param in chunk.parameters():
            if not getattr(param, "allreduce", True):
                assert getattr(param, "tensor_model_parallel", False)  # expert weights: split over ETP
                if expert_copy:
                    counted += param.numel()
                    experts += param.numel()
            elif dense_copy and (getattr(param, "tensor_model_parallel", False)
                                 or ps.get_tensor_model_parallel_rank() == 0):
                counted += param.numel()
    stats = torch.tensor([counted, experts], dtype=torch.float64)
    torch.distributed.all_reduce(stats)
    # a tied output layer on the last stage of a PP>1 run is a copy of the embedding (not counted).
    if p.pipeline_model_parallel_size > 1 and not cfg.model.untie_embeddings_and_output_weights \
            and ps.is_pipeline_last_stage() and dense_copy:
        out = chunks[-1].output_layer.weight
        copy = torch.tensor([float(out.numel())], dtype=torch.float64)
    else:
        copy = torch.zeros(1, dtype=torch.float64)
    torch.distributed.all_reduce(copy)
    return int(stats[0].item() - copy.item()), vocab, int(stats[1].item())


@pytest.mark.parametrize("world,extra", [
    (1, []), (2, ["--tensor-model-parallel-size", "2"]), (2, ["--pipeline-model-parallel-size", "2"]),
    (2, ["--tensor-model-parallel-size", "2", "--untie-embeddings-and-output-weights", "--no-qk-layernorm"]),
])
def test_parameter_count_matches_built_model(world, extra):
    built, vocab, _ = run_ranks(_built_params, world, SHAPE + extra)[0]
    cfg = parse_args(SHAPE + extra)
    assert vocab == padded_vocab_size(1000, 128, world if "--tensor-model-parallel-size" in extra else 1)
    assert count_parameters(cfg.model, vocab).total == built


MOE = ["--model-preset", "tiny-moe", "--lr", "1e-3", "--train-iters", "1", "--mock-data", "--vocab-size", "1000"]
SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]


@pytest.mark.parametrize("world,extra", [
    (1, []),
    (2, ["--expert-model-parallel-size", "2"]),                                  # experts split, dense DP 2
    (2, SP),                                                                      # experts split over ETP = TP
    (2, SP + ["--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
], ids=["ep1", "ep2", "tp2-etp2", "tp2-ep2-etp1", "pp2"])
def test_moe_parameter_count_matches_built_model(world, extra):
    built, vocab, experts = run_ranks(_built_params, world, MOE + extra)[0]
    m = parse_args(MOE + extra).model
    assert vocab == padded_vocab_size(1000, 128, 2 if "--tensor-model-parallel-size" in extra else 1)
    counts = count_parameters(m, vocab)
    assert counts.total == built
    if "--expert-model-parallel-size" in extra:  # the allreduce=False parameters are exactly the experts
        assert experts == m.num_layers * m.num_experts * 3 * m.hidden_size * m.moe_ffn_hidden_size
    # tiny-moe: 4 layers, hidden 128, 8 experts of width 64, top-2, untied output layer
    h, layers, e, f, k = 128, 4, 8, 64, 2
    attention = h * (4 * 32 + 2 * 2 * 32) + 4 * 32 * h + 2 * h + 2 * 32
    assert counts.total == layers * (attention + e * 3 * h * f + h * e) + h + 2 * vocab * h
    assert counts.active == counts.total - layers * (e - k) * 3 * h * f


def test_moe_presets_are_the_paper_sizes():
    vocab = padded_vocab_size(151643, 128, 1)  # Qwen BPE ranks
    ten = count_parameters(parse_args(["--model-preset", "moe-10b-a0.5b"]).model, vocab)
    five = count_parameters(parse_args(["--model-preset", "moe-5b-a0.3b"]).model, vocab)
    assert 9.5e9 <= ten.total <= 10.2e9
    assert 0.45e9 <= ten.active_non_embedding <= 0.6e9
    assert 4.5e9 <= five.total <= 5.2e9
    assert five.active < ten.active < ten.total and five.active_non_embedding < ten.active_non_embedding
    # MoE FLOPs by hand: the router and the top-k experts per token, not all 384
    m = parse_args(["--model-preset", "moe-10b-a0.5b"]).model
    h, layers, heads, d, groups, e, f, k, s = 1536, 16, 32, 128, 4, 384, 320, 12, 4096
    matmul = layers * (h * (heads * d + 2 * groups * d) + heads * d * h + h * e + k * 3 * h * f)
    assert training_flops_per_token(m, vocab) == 3 * (2 * matmul + 4 * layers * heads * d * s + 2 * h * vocab)


def test_padded_vocab_size():
    assert padded_vocab_size(1000, 128, 1) == 1024
    assert padded_vocab_size(1000, 128, 2) == 1024
    assert padded_vocab_size(1025, 128, 2) == 1280
    assert padded_vocab_size(151936, 128, 8) == 152576


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_flops_per_token_by_hand(mlp):
    cfg = parse_args(SHAPE + (["--swiglu"] if mlp == "swiglu" else []))
    m = cfg.model
    h, d, heads, groups, f, layers, s, v = 96, 24, 6, 2, 160, 2, 16, 1024
    mlp_weights = (3 if mlp == "swiglu" else 2) * h * f   # gated: two input projections
    matmul = layers * (h * (heads * d + 2 * groups * d) + heads * d * h + mlp_weights)
    expected = 3 * (2 * matmul + 4 * layers * heads * d * s + 2 * h * v)
    assert training_flops_per_token(m, v) == expected
    # attention grows with sequence length, the rest does not
    assert training_flops_per_token(m, v, seq_length=32) - expected == 3 * 4 * layers * heads * d * 16


def test_dense_presets_are_the_paper_sizes():
    one = parse_args(["--model-preset", "dense-1b"]).model
    four = parse_args(["--model-preset", "dense-4b"]).model
    vocab = padded_vocab_size(151643, 128, 1)  # Qwen BPE ranks
    p1, p4 = count_parameters(one, vocab), count_parameters(four, vocab)
    assert 0.9e9 < p1.total < 1.2e9 and 0.75e9 < p1.non_embedding < 0.9e9
    assert 3.6e9 < p4.total < 4.4e9
    assert peak_tflops_for_device("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops_for_device("cpu") is None
