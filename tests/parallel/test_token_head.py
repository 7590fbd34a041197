"""The loss inside the model (`models.gpt.token_head`): the output layer's own logits, same numbers.

Training passes labels into GPTModel and runs the loss as its per-token head on the output layer's
vocab-parallel logits [s, b, V/TP] in the model's dtype. Checked on forked gloo ranks, fp32, bf16
(Float16Module) and a float64 model, TP=1 and TP=2 with sequence parallelism:
- the head receives the output layer's output tensor itself (same storage: no transposed copy, no
  fp32 upcast);
- per-token loss, distribution statistics and every parameter gradient equal, bit for bit, the
  path the step used before (logits returned by the model as [b, s, V/TP], upcast to fp32 by
  Float16Module, then the loss reading them), for cross-entropy, beta and the top-k lambda setting;
- RPT's policy log-probs as the head equal -CE of the same logits;
- float64, TP=1: loss and every parameter gradient equal the literal float64 formula
  (tests/reference_loss.py) applied to the model's logits, to 1e-10 relative.
"""

from functools import partial

import pytest

from tests.dist_harness import run_ranks
from megatron_rpt.config.arguments import model_flags_argv
from megatron_rpt.config.presets import QWEN3_FAMILY

ARGV = [*model_flags_argv(QWEN3_FAMILY), "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--kv-channels", "16", "--seq-length", "12", "--max-position-embeddings", "12",
        "--lr", "1e-3", "--train-iters", "1", "--mock-data", "--vocab-size", "250"]
SETTINGS = {"ce": dict(), "beta": dict(beta=-0.25), "topk": dict(beta=-0.25, lambda_high=0.1, lambda_low=-0.1,
                                                                  top_k=7)}


def _compare(rank, world, argv, fp64=False):
    """Every loss setting on one model (per setting: the head, the old path, the reference)."""
    return [_compare_setting(rank, world, argv, settings, fp64) for settings in SETTINGS.values()]


def _compare_setting(rank, world, argv, settings, fp64):
    import torch
    from megatron.core.transformer.module import Float16Module

    from megatron_rpt import distributed as dist
    from megatron_rpt.config import parse_args
    from megatron_rpt.validate import validate_config
    from megatron_rpt.loss import STAT_NAMES, generalized_vocab_parallel_loss
    from megatron_rpt.models.gpt import build_model_chunks, padded_vocab_size, token_head, transformer_config
    from megatron_rpt.platform import setup_platform
    from megatron_rpt.rpt.grpo import policy_log_probs

    from megatron.core import parallel_state

    platform = setup_platform(force_cpu=True)
    cfg = validate_config(parse_args(argv), world)
    p = cfg.parallel
    if not parallel_state.model_parallel_is_initialized():
        dist.init_distributed(backend="gloo", device_type="cpu",
                              tensor_model_parallel_size=p.tensor_model_parallel_size)
    dist.set_random_seed(5)
    vocab = padded_vocab_size(250, cfg.model.make_vocab_size_divisible_by, p.tensor_model_parallel_size)
    config = transformer_config(cfg, platform)
    if fp64:
        config.params_dtype = config.pipeline_dtype = torch.float64
    model = build_model_chunks(cfg, platform, vocab, torch.device("cpu"), config)[0]
    if fp64:
        model.to(torch.float64)          # the local spec's norms are created in the default dtype
    if cfg.training.bf16:
        model = Float16Module(config, model)
    gpt = model.module if cfg.training.bf16 else model
    b, s = 3, 12
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 250, (b, s), generator=gen)
    labels = torch.randint(0, 250, (b, s), generator=gen)
    labels[1, 4] = -1                                         # an ignored position
    pos = torch.arange(s).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    upstream = torch.linspace(0.5, 1.5, b * s).view(b, s)

    seen = {}
    gpt.output_layer.register_forward_hook(lambda mod, inp, out: seen.__setitem__("out", out[0]))

    def loss_fn(logits, target, stats=None, overwrite=True):
        return generalized_vocab_parallel_loss(logits, target, vocab_size=250, stats=stats, overwrite_logits=overwrite,
                                               **settings)

    def head(logits, target, stats):
        seen["head"] = logits
        seen["head_ptr"], seen["head_shape"], seen["head_dtype"] = logits.data_ptr(), tuple(logits.shape), logits.dtype
        return loss_fn(logits, target, stats)

    def grads():
        out = [prm.grad.clone() if prm.grad is not None else prm.main_grad.clone() for prm in gpt.parameters()]
        model.zero_grad(set_to_none=True)
        return out

    stats_new = {}
    with token_head(model, partial(head, stats=stats_new)):
        loss_new = model(tokens, pos, mask, labels=labels)
    (loss_new * upstream).sum().backward()
    grads_new = grads()
    # the head got the output layer's tensor itself: [s, b, V/TP] in the model's dtype
    assert seen["head_ptr"] == seen["out"].data_ptr()
    assert seen["head_shape"] == (s, b, vocab // p.tensor_model_parallel_size)
    dtype = torch.float64 if fp64 else torch.bfloat16 if cfg.training.bf16 else torch.float32
    assert seen["head_dtype"] == dtype
    assert tuple(loss_new.shape) == (b, s) and loss_new.dtype == (torch.float64 if fp64 else torch.float32)

    # the old path: logits out of the model ([b, s, V/TP], fp32 under Float16Module), loss reads them
    stats_old = {}
    logits = model(tokens, pos, mask)
    loss_old = loss_fn(logits, labels, stats_old, overwrite=False)
    (loss_old * upstream).sum().backward()
    grads_old = grads()

    assert torch.equal(loss_new, loss_old)
    assert loss_new[1, 4] == 0
    for name in STAT_NAMES:
        assert torch.equal(stats_new[name].t().isnan(), stats_old[name].isnan()), name
        torch.testing.assert_close(stats_new[name].t(), stats_old[name], rtol=0, atol=0, equal_nan=True)
    for i, (gn, go) in enumerate(zip(grads_new, grads_old)):
        assert torch.equal(gn, go), (i, float((gn - go).abs().max()))

    # RPT's policy log-probs as the head: -CE of the same logits, read from the old path
    with torch.no_grad(), token_head(model, partial(policy_log_probs, vocab_size=250, overwrite_logits=True)):
        logp = model(tokens, pos, mask, labels=labels)
        ce = generalized_vocab_parallel_loss(model(tokens, pos, mask), labels, vocab_size=250)
    # policy_log_probs reports fp32, or float64 from float64 logits
    assert logp.dtype == (torch.float64 if fp64 else torch.float32)
    assert torch.equal(logp, -ce.to(logp.dtype))

    if fp64 and world == 1:
        from tests.reference_loss import reference_loss
        logits = model(tokens, pos, mask)
        keep = labels.reshape(-1) >= 0
        ref, _ = reference_loss(logits.reshape(-1, vocab)[keep], labels.reshape(-1)[keep], vocab=250,
                                **{k: v for k, v in settings.items()})
        (ref * upstream.reshape(-1)[keep]).sum().backward()
        grads_ref = grads()
        torch.testing.assert_close(loss_new.reshape(-1)[keep], ref.detach(), rtol=1e-10, atol=1e-12)
        for i, (gn, gr) in enumerate(zip(grads_new, grads_ref)):
            torch.testing.assert_close(gn, gr, rtol=1e-10, atol=1e-13, msg=f"parameter {i}")
    return float(loss_new.sum())


@pytest.mark.parametrize("layout", ["tp1-fp64", "tp1-fp32", "tp1-bf16", "tp2-sp-fp64", "tp2-sp-fp32", "tp2-sp-bf16"])
def test_head_is_the_old_path_without_copies(layout):
    world = 2 if layout.startswith("tp2") else 1
    argv = list(ARGV)
    if world == 2:
        argv += ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    if layout.endswith("bf16"):
        argv += ["--bf16"]
    totals = run_ranks(_compare, world, argv, fp64=layout.endswith("fp64"))
    assert all(t == totals[0] for t in totals)      # every TP rank computed the same per-token losses


def test_token_head_names_a_model_it_cannot_serve():
    import torch

    from megatron_rpt.models.gpt import token_head
    with pytest.raises(TypeError, match="Linear is not a TokenHeadGPTModel"):
        with token_head(torch.nn.Linear(2, 2), lambda logits, labels: logits):
            pass
