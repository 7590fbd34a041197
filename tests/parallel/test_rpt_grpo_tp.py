"""Vocab-parallel policy log-probs and the GRPO loss at TP=2 equal the single-process float64
reference (log_softmax of the full logits), values and gradients, without gathering the vocabulary."""

import pytest

from tests.dist_harness import run_ranks

B, S, V = 3, 5, 64


def _case(rank, world):
    import torch
    from megatron.core import parallel_state as ps

    from megatron_rpt.rpt.grpo import policy_log_probs, policy_loss
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(B, S, V, generator=g) * 3
    labels = torch.randint(0, V, (B, S), generator=g)
    old = torch.randn(B, S, generator=g) * 0.1 - 4
    adv = torch.tensor([[1.0], [-0.5], [2.0]])
    shard = full.chunk(world, dim=-1)[rank].clone().requires_grad_()
    logits = shard * 1.0                      # non-leaf, as the model's output
    stats = {}
    logp = policy_log_probs(logits, labels, vocab_size=V, stats=stats)
    loss, _ = policy_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    out = {"logp": logp.detach().double(), "entropy": stats["entropy"].double(), "loss": loss.detach().double(),
           "grad": shard.grad.double(), "rank": rank}
    ps.destroy_model_parallel()
    return out


def _reference():
    import torch
    from megatron_rpt.rpt.grpo import policy_loss
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(B, S, V, generator=g) * 3).double().requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=g)
    old = (torch.randn(B, S, generator=g) * 0.1 - 4).double()
    adv = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64)
    lsm = torch.log_softmax(full, dim=-1)
    logp = lsm.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(lsm.exp() * lsm).sum(-1)
    loss, _ = policy_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    return logp.detach(), entropy.detach(), loss.detach(), full.grad


@pytest.mark.parametrize("world", [1, 2])
def test_log_probs_and_loss_tp_equal_reference(world):
    import torch
    outs = run_ranks(_case, world, timeout=120)
    logp, entropy, loss, grad = run_ranks(lambda r, w: _reference(), 1, timeout=60)[0]
    for out in outs:
        assert torch.allclose(out["logp"], logp, atol=1e-5)
        assert torch.allclose(out["entropy"], entropy, atol=1e-5)
        assert torch.allclose(out["loss"], loss, atol=1e-5)
    full_grad = torch.cat([o["grad"] for o in sorted(outs, key=lambda o: o["rank"])], dim=-1)
    assert torch.allclose(full_grad, grad, atol=1e-5)
