"""Vocab-parallel policy log-probs and the GRPO loss at TP=1 and TP=2 equal the single-process float64
reference (log_softmax of the full logits divided by the sampling temperature), values and gradients,
without gathering the vocabulary: for T in {0.6, 0.8, 1.0, 1.3}, with logits the caller keeps and logits
handed over (the model's head: divided and overwritten in place), in fp32, float64 and bf16."""

import pytest

from tests.dist_harness import run_ranks

B, S, V = 3, 5, 64
TEMPERATURES = (0.6, 0.8, 1.0, 1.3)
# (dtype name, handed over to the loss, atol of log-probs/loss/entropy, rtol of gradients)
MODES = (("float32", False, 1e-5, 1e-5), ("float32", True, 1e-5, 1e-5), ("float64", True, 1e-10, 1e-10),
         ("bfloat16", True, 1e-5, 2 ** -7))


def _inputs(torch):
    g = torch.Generator().manual_seed(0)
    full = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[1, 2] = -1                         # an ignored position: log-prob 0, no gradient
    old = torch.randn(B, S, generator=g, dtype=torch.float64) * 0.1 - 4
    adv = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64)
    return full, labels, old, adv


def _case(rank, world):
    import torch
    from megatron.core import parallel_state as ps

    from megatron_rpt.rpt.grpo import policy_log_probs, policy_loss
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    full, labels, old, adv = _inputs(torch)
    out = {"rank": rank}
    for dtype_name, owned, _, _ in MODES:
        dtype = getattr(torch, dtype_name)
        for temperature in TEMPERATURES:
            shard = full.to(dtype).chunk(world, dim=-1)[rank].clone().requires_grad_()
            logits = shard * 1.0                      # non-leaf, as the model's output
            stats = {}
            logp = policy_log_probs(logits, labels, vocab_size=V, temperature=temperature, stats=stats,
                                    overwrite_logits=owned)
            loss, _ = policy_loss(logp.double(), old, adv, eps_low=0.2, eps_high=0.28)
            loss.sum().backward()
            out[dtype_name, owned, temperature] = {
                "logp": logp.detach().double(), "entropy": stats["entropy"].double(), "loss": loss.detach(),
                "grad": shard.grad.double()}
    ps.destroy_model_parallel()
    return out


def _reference(dtype_name: str, temperature: float):
    """float64 log_softmax(z / T) of the logits as the dtype holds them."""
    import torch
    from megatron_rpt.rpt.grpo import policy_loss
    full, labels, old, adv = _inputs(torch)
    full = full.to(getattr(torch, dtype_name)).double().requires_grad_()
    lsm = torch.log_softmax(full / temperature, dim=-1)
    logp = lsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(labels >= 0, logp, 0.0)
    entropy = -(lsm.exp() * lsm).sum(-1)
    loss, _ = policy_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    return logp.detach(), entropy.detach(), loss.detach(), full.grad


def _references(rank, world):
    return {(d, t): _reference(d, t) for d, _, _, _ in MODES for t in TEMPERATURES}


@pytest.mark.parametrize("world", [1, 2])
def test_tempered_log_probs_and_loss_equal_float64_reference(world):
    import torch
    outs = sorted(run_ranks(_case, world, timeout=180), key=lambda o: o["rank"])
    # the reference in its own process too (no torch math in the pytest process before a fork)
    references = run_ranks(_references, 1, timeout=120)[0]
    _, labels, _, _ = _inputs(torch)
    valid = labels >= 0
    for dtype_name, owned, atol, grad_rtol in MODES:
        for temperature in TEMPERATURES:
            logp, entropy, loss, grad = references[dtype_name, temperature]
            case = f"{dtype_name} owned={owned} T={temperature} TP={world}"
            for out in outs:
                got = out[dtype_name, owned, temperature]
                assert torch.allclose(got["logp"], logp, atol=atol, rtol=0), case
                # statistics are fp32 by design (loss.generalized), whatever the logits' dtype
                assert torch.allclose(got["entropy"][valid], entropy[valid], atol=max(atol, 2e-6), rtol=0), case
                assert torch.allclose(got["loss"], loss, atol=atol, rtol=0), case
            full_grad = torch.cat([o[dtype_name, owned, temperature]["grad"] for o in outs], dim=-1)
            assert torch.allclose(full_grad, grad, rtol=grad_rtol, atol=grad_rtol * grad.abs().max().item()), case
