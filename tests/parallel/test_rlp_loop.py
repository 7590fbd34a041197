"""RLP (`--rl-reward information_gain`, rpt.rlp) on the RPT loop, forked gloo ranks, the tiny test model.

Checked: S_pred and S_ema of the first batch against float64 log-softmaxes of the model's own logits
(the policy's and the EMA teacher's, gathered over TP=2 in the TP run); the first update's ratio is 1;
the EMA teacher of a checkpoint without one (a prefix_match RPT checkpoint) starts at the policy's
weights and after one update equals tau theta_0 + (1 - tau) theta_1 computed by hand; resuming an RLP
run mid-way gives the straight run's metrics, policy and EMA shadow bit for bit.
"""

import json

import pytest

from tests.dist_harness import run_ranks
from tests.parallel.test_rpt_loop import QWEN3_TINY

WORDS = ["</s>", "<think>", "</think>", "A", "B", "C", "D", "qA", "qB", "qC", "qD", "x", "<unk>"]
TAU = 0.9      # a decay that moves the EMA visibly in a few steps (the paper's 0.999 is the default)


@pytest.fixture(scope="module")
def rlp_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlp_synthetic")
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(root / "tokenizer.json"))
    (root / "template.txt").write_text("{context}")      # for the prefix_match run that starts one test
    for name, n in (("train", 32), ("heldout", 4)):
        with open(root / f"tasks_{name}.jsonl", "w") as f:
            for i in range(n):
                a, b = "ABCD"[i % 4], "ABCD"[(i + 1) % 4]
                words = ["x"] * (8 if i == 0 else 1) + [f"q{a}"]   # task 0: longer than the context budget
                f.write(json.dumps({
                    "id": f"{name}{i}:{len(words)}", "doc_id": f"{name}{i}", "position": len(words),
                    "context": " ".join(words), "context_tokens": [vocab[w] for w in words],
                    "target_tokens": [vocab[a], vocab[b]], "target_bytes": [a.encode().hex(), b.encode().hex()],
                    "entropy": 0.7, "splits": ["easy"]}) + "\n")
    return root


def _args(root, extra=()):
    return [*QWEN3_TINY, "--seq-length", "12", "--max-position-embeddings", "12", "--make-vocab-size-divisible-by", "1",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(root / "tokenizer.json"),
            "--rpt-data", str(root / "tasks_train.jsonl"), "--rl-reward", "information_gain",
            "--rpt-prompt-template", str(root / "template.txt"),
            "--rpt-contexts-per-step", "4", "--rpt-group-size", "4", "--rpt-max-response-length", "4",
            "--rpt-temperature", "1.0", "--micro-batch-size", "16", "--lr", "0.01", "--lr-decay-style", "constant",
            "--weight-decay", "0.0", "--eval-interval", "0", "--log-interval", "1", "--seed", "7",
            "--rlp-ema-decay", str(TAU), "--no-log-memory"] + list(extra)


def _params(chunks):
    from megatron_rpt.models.gpt import unwrap
    return {n: p.detach().float().cpu().clone() for c in chunks for n, p in unwrap(c).named_parameters()}


def _full_logits(model, tokens):
    """[b, s, V] float64 logits of `model` (chunk list) gathered over tensor parallelism."""
    import torch
    from megatron.core import parallel_state as ps
    b, s = tokens.shape
    with torch.no_grad():
        logits = model[0](tokens, torch.arange(s).expand(b, s), None)
    parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1).double()


def _reference_scores(model, sequences, n):
    """float64 sum of log softmax(logits)[next token] over each sequence's last n tokens."""
    import torch
    out = []
    for seq in sequences:
        tokens = torch.tensor([seq[:-1]])
        logp = torch.log_softmax(_full_logits(model, tokens)[0], dim=-1)
        out.append(sum(float(logp[len(seq) - 1 - n + i, seq[len(seq) - n + i]]) for i in range(n)))
    return out


def _run(rank, world, argv, check_first_scores=False):
    """rpt_train with the RLP object caught: its first batch's scores checked against float64 references
    (before any update), the final policy and EMA shadow returned."""
    import megatron_rpt.rpt.rlp as rlp
    from megatron_rpt.config import parse_rpt_args
    from megatron_rpt.rpt.loop import rpt_train
    seen, init = {}, rlp.RLP.__init__

    def caught_init(self, cfg, rpt_job):
        init(self, cfg, rpt_job)
        seen.update(rlp=self, job=rpt_job, loaded_ema=self.ema.initialised)

    score = rlp.RLP.score

    def checked_score(self, job, model, sequences):
        values = score(self, job, model, sequences)
        if check_first_scores and len(seen.setdefault("checked", [])) < 2:   # the first batch's
            reference = _reference_scores(model, sequences, self.n)
            err = max((abs(a - b) for a, b in zip(values, reference)), default=0.0)
            assert err < 2e-5, (err, values, reference)
            seen["checked"].append((len(sequences), err))
        return values

    initialise = rlp.EMATeacher.initialise

    def caught_initialise(self, policy):
        if not self.initialised:
            seen["theta0"] = _params(policy)
        initialise(self, policy)

    rlp.RLP.__init__, rlp.RLP.score, rlp.EMATeacher.initialise = caught_init, checked_score, caught_initialise
    res = rpt_train(parse_rpt_args(argv))
    r = seen["rlp"]
    return {"metrics": res.metrics, "evaluations": res.evaluations, "checked": seen.get("checked"),
            "policy": _params(seen["job"].state.model), "shadow": _params(r.ema.shadow),
            "forward": _params(r.ema.chunks), "theta0": seen.get("theta0"), "loaded_ema": seen["loaded_ema"]}


def test_rlp_ema_starts_from_a_checkpoint_without_one_bf16(rlp_files, tmp_path):
    """A prefix_match checkpoint (no EMA state) -> RLP resumes its policy and sets phi <- theta at the
    first batch (here the evaluation at the start, on the same weights); after the one update,
    phi = tau theta_0 + (1 - tau) theta_1 (float64 hand reference; bf16 policy, fp32 shadow, the forward
    copy its bf16 rounding). N = 2 target tokens; held-out evaluation."""
    start = str(tmp_path / "start")
    run_ranks(_run, 1, _args(rlp_files, ["--train-iters", "1", "--save", start, "--rl-reward", "prefix_match",
                                         "--rpt-max-response-length", "1", "--bf16"]), timeout=300)
    out = run_ranks(_run, 1, _args(rlp_files, ["--train-iters", "2", "--load", start, "--bf16",
                                               "--rlp-target-tokens", "2", "--rpt-eval-data",
                                               str(rlp_files / "tasks_heldout.jsonl")]), timeout=300)[0]
    assert out["loaded_ema"] is False
    m = out["metrics"][2]
    assert m["ratio"] == 1.0 and m["updates"] == 1 and m["train_tokens"] > 0
    assert m["reward"] == pytest.approx(m["s_pred"] - m["s_ema"], abs=1e-5)
    assert 0.0 <= m["closed_fraction"] <= 1.0 and 0.0 < m["thought_length"] <= 4.0
    theta0, theta1, shadow, forward = out["theta0"], out["policy"], out["shadow"], out["forward"]
    assert theta0.keys() == shadow.keys() == forward.keys()
    moved = 0
    for name in theta0:
        ref = TAU * theta0[name].double() + (1 - TAU) * theta1[name].double()
        assert (shadow[name].double() - ref).abs().max() <= 1e-6 * (1 + ref.abs().max()), name
        assert forward[name].equal(shadow[name].bfloat16().float()), name     # the forward copy is the shadow
        moved += not shadow[name].equal(theta0[name])
    assert moved > 0
    ev = out["evaluations"]
    assert sorted(ev) == [1, 2] and ev[2]["tasks"] == 4
    assert 0.0 <= ev[2]["no_think_acc"] <= 1.0 and 0.0 <= ev[2]["after_thought_acc@1"] <= 1.0


def test_rlp_resume_is_exact_and_scores_match_float64(rlp_files, tmp_path):
    """Straight 4 iterations vs saved at 2 and resumed: metrics, policy and EMA shadow bit for bit; the
    first batch's S_pred (4 x 4 thoughts) and S_ema (4 contexts) match float64 references (fp32 model)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full = run_ranks(_run, 1, _args(rlp_files, ["--train-iters", "4", "--save", a, "--save-interval", "2"]),
                     check_first_scores=True, timeout=300)[0]
    assert [n for n, _ in full["checked"]] == [16, 4]
    resumed = run_ranks(_run, 1, _args(rlp_files, ["--train-iters", "4", "--load", a, "--ckpt-step", "2",
                                                   "--save", b]), timeout=300)[0]
    assert resumed["loaded_ema"] is True and sorted(resumed["metrics"]) == [3, 4]
    for it in (3, 4):
        for key in ("reward", "s_pred", "s_ema", "policy_loss", "grad_norm", "thought_length"):
            assert resumed["metrics"][it][key] == full["metrics"][it][key], (it, key)
    for part in ("policy", "shadow"):
        assert all(resumed[part][n].equal(full[part][n]) for n in full[part]), part


def test_rlp_tensor_parallel_2_scores_match_float64(rlp_files):
    """TP=2 (vocab-parallel log-probs), N = 2 target tokens (the sum of two log-probs)."""
    outs = run_ranks(_run, 2, _args(rlp_files, ["--train-iters", "1", "--tensor-model-parallel-size", "2",
                                                "--rlp-target-tokens", "2"]),
                     check_first_scores=True, timeout=300)
    assert [n for n, _ in outs[0]["checked"]] == [16, 4]
    assert outs[0]["metrics"][1]["reward"] == outs[1]["metrics"][1]["reward"]
    assert outs[0]["metrics"][1]["ratio"] == 1.0
