"""RLP's pieces without a model (rpt.rlp): advantages, thought cutting, the per-thought loss weighting and
its gradient on thought tokens only, the fp32-shadow EMA against a float64 hand reference, bad flags."""

import types

import pytest

from megatron_rpt.config import ConfigError
from megatron_rpt.rpt.rlp import Thought, check_target_tokens, cut_thought, scoring_sequence, thought_weight
from tests.dist_harness import forked

OPEN, CLOSE, EOD = 1, 2, 0


def test_cut_thought_closes_at_the_first_marker_and_closes_the_unclosed():
    # sampled "</think>" (a two-token marker here): kept with the gradient, what follows it is dropped
    t = cut_thought([5, 6, 7, 8, 9, 7, 8], [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0], [7, 8], EOD)
    assert (t.tokens, t.log_probs, t.closed, t.suffix) == ([5, 6, 7, 8], [-1.0, -2.0, -3.0, -4.0], True, [])
    # ended by EOD before closing: EOD dropped, the marker appended (not sampled)
    t = cut_thought([5, 6, EOD], [-1.0, -2.0, -3.0], [CLOSE], EOD)
    assert (t.tokens, t.log_probs, t.closed, t.suffix) == ([5, 6], [-1.0, -2.0], False, [CLOSE])
    # cut at the length budget: everything kept, the marker appended
    t = cut_thought([5, 6], [-1.0, -2.0], [CLOSE], EOD)
    assert (t.tokens, t.closed, t.suffix) == ([5, 6], False, [CLOSE])
    # an immediate EOD: an empty thought (no gradient, weight 0)
    t = cut_thought([EOD], [-1.0], [CLOSE], EOD)
    assert (t.tokens, t.suffix, thought_weight(t)) == ([], [CLOSE], 0.0)
    assert thought_weight(Thought([5, 6, CLOSE], [0.0] * 3, True, [])) == pytest.approx(1 / 3)
    assert scoring_sequence([9, OPEN], t, [4, 3]) == [9, OPEN, CLOSE, 4, 3]


@forked
def test_rlp_advantages_and_information_gain():
    import torch

    from megatron_rpt.rpt.rlp import information_gain, rlp_advantages
    s_pred = torch.tensor([[-1.0, -2.0, -3.0, 2.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    s_ema = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    r = information_gain(s_pred, s_ema)
    assert r.tolist() == [[0.0, -1.0, -2.0, 3.0], [0.5, 0.5, 0.5, 0.5]]
    a = rlp_advantages(r)
    # G / (G - 1) (r - mean): mean 0 -> 4/3 r; a constant group -> 0
    assert a[0].tolist() == pytest.approx([0.0, -4 / 3, -8 / 3, 4.0], abs=1e-6)
    assert a[1].tolist() == [0.0] * 4
    with pytest.raises(ValueError):
        rlp_advantages(torch.zeros(2, 1))


@forked
def test_loss_weights_thoughts_and_has_gradient_on_thought_tokens_only():
    """The update's micro-batch of three thoughts (lengths 2, 3 and 0) through PolicyForwardStep's loss
    at ratio 1: d loss / d logp is -A_i / |c_i| on thought tokens and 0 on every other position (context,
    "<think>", padding), the loss sum is sum_i A-weighted token means, and the count handed to
    Megatron-Core is the number of thoughts (3), not of tokens."""
    import torch

    from megatron_rpt.rpt.loop import PolicyForwardStep, TrainSequence, _micro_batches

    prompt = [9, 9, OPEN]
    thoughts = [[5, 6], [5, 6, CLOSE], []]
    adv = [1.5, -0.5, 2.0]
    seqs = [TrainSequence(prompt + c, len(prompt), [-1.0] * len(c), a,
                          sequence_weight=thought_weight(Thought(c, [], True, []))) for c, a in zip(thoughts, adv)]
    (batch,), length = _micro_batches(seqs, 4, 1, 16, attention_mask=False)
    logp = (batch["old_log_probs"] + 0.0).requires_grad_(True)     # ratio 1
    batch["old_log_probs"] = logp.detach().clone()
    step = PolicyForwardStep(torch.device("cpu"), 16, 1.0, 0.2, 0.2)
    total, count, out = step._loss(batch, {"entropy": torch.zeros(length, 4)}, logp)
    total.backward()
    assert int(count) == 3
    expected = torch.zeros(4, length)
    for i, (c, a) in enumerate(zip(thoughts, adv)):
        expected[i, len(prompt) - 1:len(prompt) - 1 + len(c)] = -a / len(c) if c else 0.0
    assert torch.equal(logp.grad, expected)
    assert float(total) == pytest.approx(-sum(a for c, a in zip(thoughts, adv) if c), abs=1e-6)
    assert float(out["rpt"][1]) == 5.0        # the report still counts tokens (means of the diagnostics)


@forked
def test_ema_fp32_shadow_against_float64_hand_reference():
    """bf16 policy: the fp32 shadow follows phi <- tau phi + (1 - tau) theta (float64 reference, 1e-6
    relative) and the forward copy is its bf16 rounding; a bf16 EMA at tau = 0.999 would not move."""
    import torch

    from megatron_rpt.rpt.rlp import EMATeacher
    torch.manual_seed(0)
    policy = torch.nn.Linear(8, 8).bfloat16()
    ema = EMATeacher.__new__(EMATeacher)
    ema.decay, ema.initialised = 0.999, False
    ema.shadow, ema.chunks = [torch.nn.Linear(8, 8)], [torch.nn.Linear(8, 8).bfloat16()]
    ema.initialise([policy])
    ref = {n: p.detach().double() for n, p in policy.named_parameters()}
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    bf16_ema = dict(start)
    for _ in range(20):
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ema.update([policy])
        for n, p in policy.named_parameters():
            ref[n] = 0.999 * ref[n] + 0.001 * p.detach().double()
            bf16_ema[n] = 0.999 * bf16_ema[n] + 0.001 * p.detach()
    shadow, forward = dict(ema.shadow[0].named_parameters()), dict(ema.chunks[0].named_parameters())
    for n, r in ref.items():
        assert (shadow[n].double() - r).abs().max() <= 1e-6 * (1 + r.abs().max()), n
        assert torch.equal(forward[n], shadow[n].bfloat16()), n
        # in bf16, (1 - tau)(theta - phi) is mostly below half an ulp of phi: most entries never move
        assert (bf16_ema[n] == start[n]).float().mean() > 0.5, n
        assert (shadow[n] != start[n].float()).float().mean() > 0.9, n


def test_bad_flags():
    from megatron_rpt.config import parse_rpt_args
    from megatron_rpt.config.validation import check_rpt_config
    for flags, message in ((["--rlp-ema-decay", "1.0"], "--rlp-ema-decay must be in (0, 1)"),
                           (["--rlp-ema-decay", "0"], "--rlp-ema-decay must be in (0, 1)"),
                           (["--rlp-target-tokens", "0"], "--rlp-target-tokens must be >= 1"),
                           (["--rpt-chat-template"], "--rpt-chat-template does not apply to --rl-reward"),
                           (["--use-distributed-optimizer", "--overlap-param-gather"],
                            "--overlap-param-gather is not supported with --rl-reward information_gain")):
        cfg = parse_rpt_args(["--rpt-data", "x.jsonl", "--rl-reward", "information_gain", *flags])
        assert any(message in p for p in check_rpt_config(cfg, 1, check_files=False)), flags
    tasks = [types.SimpleNamespace(id="d:3", target_tokens=[4, 5]), types.SimpleNamespace(id="e:2", target_tokens=[4])]
    check_target_tokens(tasks[:1], "t.jsonl", 2)
    with pytest.raises(ConfigError, match=r"--rlp-target-tokens 2: t.jsonl: task e:2 has 1 target token"):
        check_target_tokens(tasks, "t.jsonl", 2)
