"""GRPO math and RPT evaluation metrics against hand-written float64 / brute-force references."""

import itertools
import math

import pytest
import torch

from megatron_rpt.rpt.evaluate import majority_vote_reward, pass_at_k, pass_ks
from megatron_rpt.rpt.grpo import ADVANTAGE_EPS, group_advantages, informative_groups, policy_loss


def test_group_advantages_hand_reference():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    for g, row in enumerate(rewards.tolist()):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))   # Bessel, as torch.std
        for i, x in enumerate(row):
            assert adv[g, i].item() == pytest.approx((x - mean) / (std + ADVANTAGE_EPS), rel=1e-6, abs=1e-7)
    assert adv[0].tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], rel=1e-5)
    assert adv[2].abs().max().item() == 0.0            # all equal: no signal, no NaN
    assert adv.sum(dim=1).abs().max().item() < 1e-6


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError, match="G>=2"):
        group_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 0.0]))


def test_informative_groups():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert informative_groups(rewards).tolist() == [False, True, False, True]


def _reference_token_loss(logp, old, a, el, eh, ref=None, beta=0.0):
    ratio = math.exp(logp - old)
    loss = -min(ratio * a, min(max(ratio, 1 - el), 1 + eh) * a)
    if ref is not None and beta:
        loss += beta * (math.exp(ref - logp) - (ref - logp) - 1)
    return loss


@pytest.mark.parametrize("el,eh", [(0.2, 0.2), (0.2, 0.28), (0.0, 0.5)])
def test_policy_loss_matches_reference(el, eh):
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.5 - 2).requires_grad_()
    old = logp.detach() + torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.3
    adv = torch.tensor([[1.5], [-0.7], [0.0], [0.3]], dtype=torch.float64)
    ref = logp.detach() + torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.2
    loss, info = policy_loss(logp, old, adv, eps_low=el, eps_high=eh, ref_log_probs=ref, kl_beta=0.05)
    for i, j in itertools.product(range(4), range(6)):
        expect = _reference_token_loss(logp[i, j].item(), old[i, j].item(), adv[i, 0].item(), el, eh,
                                       ref[i, j].item(), 0.05)
        assert loss[i, j].item() == pytest.approx(expect, rel=1e-12, abs=1e-12)
        ratio = math.exp(logp[i, j].item() - old[i, j].item())
        a = adv[i, 0].item()
        clipped = (a > 0 and ratio > 1 + eh) or (a < 0 and ratio < 1 - el)
        assert info["clipped"][i, j].item() == float(clipped)
    # gradient: -ratio * A where the unclipped term is active, 0 where clipped, plus the KL term's
    loss.sum().backward()
    for i, j in itertools.product(range(4), range(6)):
        lp, o, a, r = logp[i, j].item(), old[i, j].item(), adv[i, 0].item(), ref[i, j].item()
        ratio = math.exp(lp - o)
        clipped = (a > 0 and ratio > 1 + eh) or (a < 0 and ratio < 1 - el)
        expect = (0.0 if clipped else -ratio * a) + 0.05 * (1 - math.exp(r - lp))
        assert logp.grad[i, j].item() == pytest.approx(expect, rel=1e-9, abs=1e-12)


def test_first_step_ratio_is_one_and_gradient_is_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    loss, info = policy_loss(logp, logp.detach(), torch.tensor([[2.0]], dtype=torch.float64), eps_low=0.2, eps_high=0.2)
    assert info["ratio"].tolist() == [[1.0, 1.0, 1.0]]
    assert info["clipped"].sum().item() == 0 and info["approx_kl"].abs().max().item() == 0.0
    loss.sum().backward()
    assert logp.grad.tolist() == [[-2.0, -2.0, -2.0]]      # -A * d logp: REINFORCE at ratio 1
    assert info["kl"].abs().max().item() == 0.0            # no reference: no KL


def test_kl_k3_is_zero_at_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -1.0, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.0, -2.0, -1.0], dtype=torch.float64)
    _, info = policy_loss(logp, logp, torch.zeros(3, dtype=torch.float64), eps_low=0.2, eps_high=0.2,
                          ref_log_probs=ref, kl_beta=1.0)
    assert info["kl"][0].item() == 0.0
    for d, v in zip((ref - logp).tolist()[1:], info["kl"].tolist()[1:]):
        assert v == pytest.approx(math.exp(d) - d - 1) and v > 0


def _brute_pass_at_k(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_unbiased_estimator_equals_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(128, 1, 64) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_ks():
    assert pass_ks(1) == [1]
    assert pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6]


def test_majority_vote():
    from megatron_rpt.rpt.rewards import get_reward
    spec = get_reward("prefix_match")

    class Task:
        target_token_bytes = [b" x", b" =", b" 3"]
    task = Task()
    wins = ["</think> \\boxed{ x}", "</think> \\boxed{ y}", "</think> \\boxed{ x =}", "\\boxed{ x}", "no answer"]
    assert majority_vote_reward(wins, spec, task) == 1.0
    loses = ["</think> \\boxed{ y}", "</think> \\boxed{ y}", "</think> \\boxed{ x}"]
    assert majority_vote_reward(loses, spec, task) == 0.0
    tie = ["</think> \\boxed{ x =}", "</think> \\boxed{ z}"]       # tie: the earliest prediction wins
    assert majority_vote_reward(tie, spec, task) == 1.0
    assert majority_vote_reward(["nothing", "\\boxed{}"], spec, task) == 0.0


class _CannedEngine:
    """Rollout engine of fixed responses: prompt [i] gets RESPONSES[i] (k of them)."""
    name = "canned"

    def __init__(self, responses):
        self.responses, self.calls = responses, []

    def generate(self, prompts, n, sampling):
        from megatron_rpt.inference.base import Rollout
        self.calls.append((prompts, n))
        return [[Rollout([1], [0.0], text, True) for text in self.responses[p[0]][:n]] for p in prompts]


def test_evaluate_math_answers_against_hand_computed_metrics():
    """k = 4 canned responses per problem, scored by math_answer; every metric worked out by hand."""
    from megatron_rpt.inference.base import SamplingConfig
    from megatron_rpt.rpt.evaluate import eval_splits, evaluate_tasks
    from megatron_rpt.rpt.rewards import get_reward
    from megatron_rpt.rpt.tasks.problems import Problem

    def problem(i, answer, splits):
        return Problem(f"p{i}", "math", "test", f"question {i}", answer, None, splits)
    problems = [problem(0, "0.5", ["easy"]), problem(1, "12", ["hard"]), problem(2, "x+1", [])]
    b = "</think>\\boxed{%s}"
    engine = _CannedEngine([
        # rewards 1 1 0 0 (c=2); votes: "1/2" 1, "\\frac{1}{2}" 1 (symbolic forms vote apart), "2/5" 2 -> cons 0
        [b % "1/2", b % "\\frac{1}{2}", b % "0.4", b % "0.40"],
        # rewards 0 1 1 0 (c=2); votes: "12" 2 (12 and 12.0), "13" 1, no answer -> cons 1
        ["no answer", b % "12", b % "12.0", b % "13"],
        # rewards 1 1 1 1 (c=4) -> cons 1
        [b % "x+1", b % "$x+1$", b % "1+x", b % "x + 1"],
    ])
    splits = eval_splits(problems, corpus=False)
    assert splits == ("all", "easy", "hard")
    m = evaluate_tasks(engine, problems, lambda t: [int(t.id[1:])], spec=get_reward("math_answer"), k=4,
                       sampling=SamplingConfig(max_new_tokens=8), standard=False, splits=splits,
                       reduce=lambda v: [2 * x for x in v])      # as if a second rank had the same problems
    assert engine.calls == [([[0], [1], [2]], 4)]                # no standard (next-token) mode for problems
    pass1, pass2 = 1 - 2 / 4, 1 - 1 / 6                          # c=2 of 4: 1 - C(2,j)/C(4,j)
    expected = {
        "all/tasks": 6, "all/avg@4": 2 / 3, "all/cons@4": 2 / 3, "all/pass@1": (pass1 + pass1 + 1) / 3,
        "all/pass@2": (pass2 + pass2 + 1) / 3, "all/pass@4": 1.0,
        "easy/tasks": 2, "easy/avg@4": 0.5, "easy/cons@4": 0.0, "easy/pass@1": pass1, "easy/pass@2": pass2,
        "easy/pass@4": 1.0,
        "hard/tasks": 2, "hard/avg@4": 0.5, "hard/cons@4": 1.0, "hard/pass@1": pass1, "hard/pass@2": pass2,
        "hard/pass@4": 1.0,
    }
    assert m.keys() == expected.keys()
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_policy_log_probs_temperature_must_be_positive():
    from megatron_rpt.rpt.grpo import policy_log_probs
    for bad in (0.0, -0.8, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            policy_log_probs(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), vocab_size=4, temperature=bad)


def test_micro_batches_layout_padding_and_overlong_sequences():
    """Two sequences in micro-batches of 1, length rounded up to the multiple: tokens/labels are the
    sequence shifted by one, loss only from the position predicting the first response token, the
    engine's log-probs placed there, padding zero; `count` adds loss-free micro-batches; a sequence
    longer than --seq-length + 1 is refused by name instead of failing on a tensor shape."""
    from megatron_rpt.rpt.loop import TrainSequence, _micro_batches

    seqs = [TrainSequence([1, 2, 3, 4, 5], 3, [-0.5, -0.25], 2.0), TrainSequence([6, 7, 8], 2, [-1.0], -1.0)]
    batches, length = _micro_batches(seqs, 1, 8, 16, attention_mask=False, count=3)
    assert length == 8 and len(batches) == 3
    first, second, extra = batches
    assert first["tokens"][0].tolist() == [1, 2, 3, 4, 0, 0, 0, 0]
    assert first["labels"][0].tolist() == [2, 3, 4, 5, 0, 0, 0, 0]
    assert first["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert first["rollout_log_probs"][0].tolist() == [0, 0, -0.5, -0.25, 0, 0, 0, 0]
    assert float(first["advantages"][0, 0]) == 2.0 and "token_weight" not in first
    assert second["loss_mask"][0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert float(extra["loss_mask"].sum()) == 0.0
    with pytest.raises(ValueError, match="micro-batch length 4 < 8"):
        _micro_batches(seqs, 1, 8, 16, attention_mask=False, length=4)
    with pytest.raises(ValueError, match="exceeds --seq-length 3"):
        _micro_batches(seqs, 1, 1, 3, attention_mask=False)
