"""RLP (`--rl-reward information_gain`, rpt.rlp) on the RPT loop, forked gloo ranks, the tiny test model.

Checked: every S_pred and S_ema against float64 log-softmaxes of the scoring model's own logits on the
same micro-batches (the policy's and the EMA teacher's; gathered over TP in the TP=2 run, which also
evaluates); the first update's ratio is 1; the EMA of a run against the float64 recurrence from the
lazily initialised theta_0; resuming mid-way gives the straight run's metrics, policy and EMA bit for
bit; a checkpoint whose common state lists no EMA entry loads none.
"""

import json

import pytest

from tests.dist_harness import run_ranks
from tests.parallel.test_rpt_loop import QWEN3_TINY, word_tokenizer

WORDS = ["</s>", "<think>", "</think>", "A", "B", "C", "D", "qA", "qB", "qC", "qD", "x", "<unk>"]
TAU = 0.9      # a decay that moves the EMA visibly in a few steps (the paper's 0.999 is the default)


@pytest.fixture(scope="module")
def rlp_files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("rlp_synthetic"))


def write_files(root):
    """A word-level tokenizer with the thought markers, and task files with two target tokens each."""
    vocab = word_tokenizer(root / "tokenizer.json", WORDS)
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
            "--rpt-contexts-per-step", "4", "--rpt-group-size", "4", "--rpt-max-response-length", "4",
            "--rpt-temperature", "1.0", "--micro-batch-size", "16", "--lr", "0.01", "--lr-decay-style", "constant",
            "--weight-decay", "0.0", "--eval-interval", "0", "--log-interval", "1", "--seed", "7",
            "--rlp-ema-decay", str(TAU), "--no-log-memory"] + list(extra)


def _params(chunks):
    from megatron_rpt.models.gpt import unwrap
    return {n: p.detach().float().cpu().clone() for c in chunks for n, p in unwrap(c).named_parameters()}


def _reference_scores(model, batches, count):
    """float64 sum over each row's target positions of log softmax(logits)[label], the logits of `model`
    (chunk list) on the very micro-batches the loop scored, gathered over tensor parallelism."""
    import torch
    from megatron.core import parallel_state as ps
    out = []
    for batch in batches:
        with torch.no_grad():
            logits = model[0](batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logp = torch.log_softmax(torch.cat(parts, dim=-1).double(), dim=-1)
        picked = logp.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
        out += (picked * batch["loss_mask"].double()).sum(dim=1).tolist()
    return out[:count]


def _run(rank, world, argv, check_scores=False, no_extra=None):
    """rpt_train with RLP's pieces caught: every score checked against a float64 reference, theta at the
    EMA's initialisation and at each update recorded, the final policy and EMA returned. `no_extra`: a
    folder where the trained state is then saved without its extras (as pretraining saves it, through
    the same save_checkpoint), whose EMA entry load_extra_state must report missing, loading nothing."""
    import megatron_rpt.rpt.rlp as rlp
    from megatron_rpt.config import parse_rpt_args
    from megatron_rpt.rpt.loop import rpt_train
    from megatron_rpt.training.checkpointing import load_extra_state, save_checkpoint
    seen = {"checked": [], "thetas": []}
    init, score, initialise, update = rlp.RLP.__init__, rlp.RLP.score, rlp.EMATeacher.initialise, rlp.EMATeacher.update

    def caught_init(self, cfg, rpt_job):
        init(self, cfg, rpt_job)
        seen.update(rlp=self, job=rpt_job, loaded_ema=self.ema.initialised)

    def checked_score(self, job, model, sequences):
        batches, schedule = [], job._schedule
        job._schedule = lambda m, step, b, length, forward_only: (batches.extend(b), schedule(m, step, b, length,
                                                                                             forward_only))[1]
        try:
            values = score(self, job, model, sequences)
        finally:
            job._schedule = schedule
        if check_scores:
            reference = _reference_scores(model, batches, len(sequences))
            err = max((abs(a - b) for a, b in zip(values, reference)), default=0.0)
            assert err < 1e-5, (err, values, reference)
            seen["checked"].append(len(sequences))
        return values

    def caught_initialise(self, policy):
        if not self.initialised:
            seen["theta0"] = _params(policy)
        initialise(self, policy)

    def caught_update(self, policy):
        seen["thetas"].append(_params(policy))
        update(self, policy)

    rlp.RLP.__init__, rlp.RLP.score = caught_init, checked_score
    rlp.EMATeacher.initialise, rlp.EMATeacher.update = caught_initialise, caught_update
    res = rpt_train(parse_rpt_args(argv))
    r = seen["rlp"]
    if no_extra is not None:
        state = seen["job"].state
        extras, state.checkpoint_extras = state.checkpoint_extras, []
        try:
            path = save_checkpoint(str(no_extra), 1, state, seen["job"].cfg, consumed_train_samples=0,
                                   consumed_valid_samples=0)
        finally:
            state.checkpoint_extras = extras
        before = _params(r.ema.shadow)
        seen["no_extra_loaded"] = load_extra_state(path, r.ema)    # reports the entry missing, changes nothing
        assert all(before[n].equal(t) for n, t in _params(r.ema.shadow).items())
    return {"metrics": res.metrics, "evaluations": res.evaluations, "checked": seen["checked"],
            "policy": _params(seen["job"].state.model), "shadow": _params(r.ema.shadow), "forward": _params(r.ema.chunks),
            "theta0": seen.get("theta0"), "thetas": seen["thetas"], "loaded_ema": seen["loaded_ema"],
            "no_extra_loaded": seen.get("no_extra_loaded")}


def test_rlp_ema_scores_and_exact_resume(rlp_files, tmp_path):
    """N = 2 target tokens, fp32 (bf16 matmuls are slow on CPU; the fp32 shadow of a bf16 policy is
    checked in tests/unit/test_rlp.py):
    - every S_pred / S_ema matches a float64 log-softmax of the scoring model's logits (policy or EMA) on
      the same micro-batches;
    - phi starts at theta_0 (lazy init at the first batch) and after the two updates equals the float64
      recurrence phi <- tau phi + (1 - tau) theta_k;
    - saved at iteration 1 and resumed: iteration 2's metrics, policy, EMA shadow and forward copy equal
      the straight run's bit for bit; a checkpoint whose common state lists no EMA (a checkpoint saved
      without RLP, a pretraining one) loads none (the EMA then starts from theta at the first batch)."""
    a = tmp_path / "a"
    common = ["--rlp-target-tokens", "2", "--train-iters", "2"]
    full = run_ranks(_run, 1, _args(rlp_files, common + ["--save", str(a), "--save-interval", "1"]),
                     check_scores=True, timeout=300)[0]
    assert full["checked"] == [16, 4] * 2         # each update: S_pred of 4 x 4 thoughts, S_ema of 4 contexts
    assert full["loaded_ema"] is False and len(full["thetas"]) == 2
    m = full["metrics"]
    assert m[1]["ratio"] == 1.0 and all(m[i]["updates"] == 1 for i in (1, 2))
    assert m[1]["reward"] == pytest.approx(m[1]["s_pred"] - m[1]["s_ema"], abs=1e-5)
    assert 0.0 < m[1]["thought_length"] <= 4.0 and 0.0 <= m[1]["closed_fraction"] <= 1.0
    phi = {n: t.double() for n, t in full["theta0"].items()}
    for theta in full["thetas"]:
        phi = {n: TAU * phi[n] + (1 - TAU) * theta[n].double() for n in phi}
    assert phi.keys() == full["shadow"].keys() == full["forward"].keys()
    for name, ref in phi.items():
        assert (full["shadow"][name].double() - ref).abs().max() <= 1e-6 * (1 + ref.abs().max()), name
        assert full["forward"][name].equal(full["shadow"][name]), name
    assert any(not full["shadow"][n].equal(full["theta0"][n]) for n in phi)

    resumed = run_ranks(_run, 1, _args(rlp_files, common + ["--load", str(a), "--ckpt-step", "1"]),
                        no_extra=tmp_path / "no_ema", timeout=300)[0]
    assert resumed["loaded_ema"] is True and resumed["no_extra_loaded"] is False
    assert sorted(resumed["metrics"]) == [2]
    for key in ("reward", "s_pred", "s_ema", "policy_loss", "grad_norm", "thought_length"):
        assert resumed["metrics"][2][key] == m[2][key], key
    for part in ("policy", "shadow", "forward"):
        assert all(resumed[part][n].equal(full[part][n]) for n in full[part]), part


def test_rlp_tensor_parallel_2_scores_match_float64_and_evaluation(rlp_files):
    """TP=2: vocab-parallel S_pred / S_ema against float64 log-softmaxes of the logits gathered over TP; fp32
    (the EMA's chunks are its own state), N = 1; both TP ranks see the same rewards; held-out evaluation
    at the start and the end (greedy and sampled thoughts)."""
    outs = run_ranks(_run, 2, _args(rlp_files, ["--train-iters", "1", "--tensor-model-parallel-size", "2",
                                                "--eval-interval", "1", "--rpt-eval-data",
                                                str(rlp_files / "tasks_heldout.jsonl")]),
                     check_scores=True, timeout=300)
    # evaluation: greedy and sampled thoughts' S_pred + S_ema of 4 tasks; the update: 4 x 4 thoughts + 4 contexts
    assert outs[0]["checked"] == outs[1]["checked"] == [4, 4, 4, 4, 16, 4, 4, 4, 4, 4]
    ev = outs[0]["evaluations"]
    assert ev == outs[1]["evaluations"] and sorted(ev) == [0, 1] and ev[1]["tasks"] == 4
    assert all(0.0 <= ev[1][k] <= 1.0 for k in ("no_think_acc", "after_thought_acc_greedy", "after_thought_acc@1",
                                                "closed_fraction_greedy"))
    assert ev[1]["info_gain_greedy"] != 0.0
    for key in ("reward", "s_pred", "s_ema", "policy_loss", "ratio"):
        assert outs[0]["metrics"][1][key] == outs[1]["metrics"][1][key], key
    assert outs[0]["metrics"][1]["ratio"] == 1.0
