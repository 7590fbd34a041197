"""Float64 reference of the generalized beta/lambda loss, written straight from the formula.

Shared by the single-process and the tensor-parallel tests: full (unsharded) logits, the top-k set
from a stable descending sort (ties -> lower id), w evaluated literally as pi**(1-(1-pi)**beta).
"""

from __future__ import annotations

import torch


def topk_sets(z: torch.Tensor, k: int, vocab: int) -> torch.Tensor:
    """[N, V] bool: the k largest real logits per row, ties broken by the lower id."""
    n, v = z.shape
    order = torch.sort(z[:, :vocab].double(), dim=-1, descending=True, stable=True).indices
    in_k = torch.zeros(n, v, dtype=torch.bool)
    in_k.scatter_(1, order[:, :min(k, vocab)], True)
    return in_k


def reference_loss(z: torch.Tensor, x: torch.Tensor, *, beta=0.0, lambda_high=0.0, lambda_low=0.0, top_k=100,
                   vocab=None):
    """Per-token loss (with autograd through z; w detached) and the sets used, in float64."""
    z = z.double() if not z.requires_grad else z
    n, v = z.shape
    vocab = v if vocab is None else vocab
    logp = torch.log_softmax(z, dim=-1)
    pi = logp.exp()
    in_k = topk_sets(z.detach(), top_k, vocab)
    real = torch.zeros(n, v, dtype=torch.bool)
    real[:, :vocab] = True
    onehot = torch.zeros(n, v, dtype=torch.bool)
    onehot[torch.arange(n), x] = True
    k_neg = in_k & ~onehot
    t_neg = real & ~in_k & ~onehot
    p = pi[torch.arange(n), x]
    w = (p ** (1 - (1 - p) ** beta)).detach()
    loss = (-w * logp[torch.arange(n), x] - lambda_high * (pi * k_neg).sum(-1)
            - lambda_low * (pi * t_neg).sum(-1))
    return loss, {"w": w, "in_k": in_k, "k_neg": k_neg, "t_neg": t_neg, "real": real}


def reference_stats(z: torch.Tensor, x: torch.Tensor, *, top_k: int, vocab=None) -> dict:
    z = z.double()
    n, v = z.shape
    vocab = v if vocab is None else vocab
    logp = torch.log_softmax(z, dim=-1)
    pi = logp.exp()
    in_k = topk_sets(z, top_k, vocab)
    rows = torch.arange(n)
    return {
        "cross_entropy": -logp[rows, x],
        "entropy": -(pi * logp).sum(-1),
        "target_prob": pi[rows, x],
        "top1": (z[rows, x] >= z[:, :vocab].max(-1).values).double(),
        "topk_mass": (pi * in_k).sum(-1),
        "tail_mass": pi[:, :vocab].sum(-1) - (pi * in_k).sum(-1),
    }
