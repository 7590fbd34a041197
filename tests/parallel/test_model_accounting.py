"""Parameter counts and FLOPs: the analytic accounting equals the built Megatron model, summed over ranks."""

import pytest

from megatron_rpt.config import parse_args, validate_config
from megatron_rpt.models.flops import count_parameters, peak_tflops_for_device, training_flops_per_token
from megatron_rpt.models.gpt import padded_vocab_size
from tests.dist_harness import run_ranks

SHAPE = ["--num-layers", "2", "--hidden-size", "96", "--ffn-hidden-size", "160", "--num-attention-heads", "6",
         "--num-query-groups", "2", "--kv-channels", "24", "--seq-length", "16", "--lr", "1e-3",
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
                          pipeline_model_parallel_size=p.pipeline_model_parallel_size)
    vocab = pad(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, p.tensor_model_parallel_size)
    chunks = build_model_chunks(cfg, platform, vocab, torch.device("cpu"))
    sharded = replicated = 0
    for chunk in chunks:
        for param in chunk.parameters():
            if getattr(param, "tensor_model_parallel", False):
                sharded += param.numel()
            else:
                replicated += param.numel()
    # Sharded params add up over TP ranks; replicated ones are counted once per pipeline stage;
    # a tied output layer on the last stage of a PP>1 run is a copy of the embedding (not counted).
    stats = torch.tensor([sharded, replicated if ps.get_tensor_model_parallel_rank() == 0 else 0],
                         dtype=torch.float64)
    torch.distributed.all_reduce(stats)
    if p.pipeline_model_parallel_size > 1 and not cfg.model.untie_embeddings_and_output_weights \
            and ps.is_pipeline_last_stage():
        out = chunks[-1].output_layer.weight
        copy = torch.tensor([float(out.numel())], dtype=torch.float64)
    else:
        copy = torch.zeros(1, dtype=torch.float64)
    torch.distributed.all_reduce(copy)
    return int(stats.sum().item() - copy.item()), vocab


@pytest.mark.parametrize("world,extra", [
    (1, []), (2, ["--tensor-model-parallel-size", "2"]), (2, ["--pipeline-model-parallel-size", "2"]),
    (2, ["--tensor-model-parallel-size", "2", "--untie-embeddings-and-output-weights", "--no-qk-layernorm"]),
])
def test_parameter_count_matches_built_model(world, extra):
    built, vocab = run_ranks(_built_params, world, SHAPE + extra)[0]
    cfg = parse_args(SHAPE + extra)
    assert vocab == padded_vocab_size(1000, 128, world if "--tensor-model-parallel-size" in extra else 1)
    assert count_parameters(cfg.model, vocab).total == built


def test_padded_vocab_size():
    assert padded_vocab_size(1000, 128, 1) == 1024
    assert padded_vocab_size(1000, 128, 2) == 1024
    assert padded_vocab_size(1025, 128, 2) == 1280
    assert padded_vocab_size(151936, 128, 8) == 152576


def test_flops_per_token_by_hand():
    cfg = parse_args(SHAPE)
    m = cfg.model
    h, d, heads, groups, f, layers, s, v = 96, 24, 6, 2, 160, 2, 16, 1024
    matmul = layers * (h * (heads * d + 2 * groups * d) + heads * d * h + 3 * h * f)
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
