"""The RPT loop end to end on forked gloo ranks with a synthetic, learnable next-token task.

A word-level tokenizer holds one token per boxed answer ("\\boxed{A}" ...), so a one-token response
either predicts the target or not; the context ("qA" ... "qD") determines the answer. A random tiny
model is right about 1/|V| of the time, so GRPO has signal from the first step, and the mean
reward must rise well above chance in a fixed number of seeded steps. Also checked: the first
update's importance ratio is 1 and the recomputed log-probs equal the engine's (slime's gate);
resuming from a checkpoint reproduces the uninterrupted run's metrics exactly; TP=2 passes the
same gate; dynamic sampling drops all-equal groups.
"""

import json
import math
import os

import pytest

from megatron_rpt.config.arguments import model_flags_argv
from megatron_rpt.config.presets import QWEN3_FAMILY
from tests.dist_harness import run_ranks

ANSWERS = ["A", "B", "C", "D"]
WORDS = ["</s>"] + [f"\\boxed{{{a}}}" for a in ANSWERS] + ANSWERS + [f"q{a}" for a in ANSWERS] + ["<unk>", "x"]


def word_tokenizer(path, words: list) -> dict:
    """A whitespace-split word-level tokenizer of `words` (id = index; "<unk>" among them) saved as the
    tokenizer.json `path`; returns its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return vocab


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rpt_synthetic")
    vocab = word_tokenizer(root / "tokenizer.json", WORDS)
    (root / "template.txt").write_text("{context}")
    for name, n in (("train", 64), ("heldout", 16)):
        with open(root / f"tasks_{name}.jsonl", "w") as f:
            for i in range(n):
                a = ANSWERS[i % 4]
                words = ["x"] * (12 if i == 0 else 1) + [f"q{a}"]   # task 0: longer than --seq-length allows
                f.write(json.dumps({
                    "id": f"{name}{i}:{len(words)}", "doc_id": f"{name}{i}", "position": len(words),
                    "context": " ".join(words), "context_tokens": [vocab[w] for w in words], "target_tokens": [vocab[a]],
                    "target_bytes": [a.encode().hex()], "entropy": 1.2, "splits": ["easy", "medium"]}) + "\n")
    # RLVR: problems "qa" (answer 0.5) and "qb" (answer -3) with one token per boxed answer
    word_tokenizer(root / "rl_tokenizer.json", RL_WORDS)
    for name, n in (("train", 16), ("heldout", 4)):
        with open(root / f"problems_{name}.jsonl", "w") as f:
            for i in range(n):
                question, answer = ("qa", "0.5") if i % 2 == 0 else ("qb", "-3")
                f.write(json.dumps({"id": f"{name}{i}", "family": "math", "source": "test", "question": question,
                                    "answer": answer, "solution": None, "splits": ["half"] if i % 2 else []}) + "\n")
    return root


# RLVR words; RL_CORRECT: by hand, the boxed words that are each problem's answer (1/2, 0.5 and
# \frac{1}{2} are all 0.5: the string, numeric and math-verify comparisons of rpt.answers)
RL_WORDS = ["</s>", "\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{3}", "\\boxed{-3}", "\\boxed{x}",
            "qa", "qb", "<unk>", "x"]
RL_CORRECT = {"0.5": {"\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{\\frac{1}{2}}"}, "-3": {"\\boxed{-3}"}}


QWEN3_TINY = [*model_flags_argv(QWEN3_FAMILY), "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
              "--num-attention-heads", "4", "--num-query-groups", "4", "--max-position-embeddings", "8"]


def _args(root, extra=(), model=QWEN3_TINY):
    return [*model, "--seq-length", "8", "--make-vocab-size-divisible-by", "1",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(root / "tokenizer.json"),
            "--rpt-data", str(root / "tasks_train.jsonl"), "--rpt-prompt-template", str(root / "template.txt"),
            "--rpt-contexts-per-step", "8", "--rpt-group-size", "8", "--rpt-max-response-length", "1",
            "--rpt-temperature", "1.0", "--micro-batch-size", "16", "--lr", "0.003", "--lr-decay-style", "constant",
            "--weight-decay", "0.0", "--eval-interval", "0", "--log-interval", "5", "--seed", "5",
            "--no-log-memory"] + list(extra)


def _run(rank, world, argv):
    from megatron_rpt.config import parse_rpt_args
    from megatron_rpt.rpt.loop import rpt_train
    res = rpt_train(parse_rpt_args(argv))
    return {"metrics": res.metrics, "evaluations": res.evaluations, "iteration": res.iteration,
            "resumed_from": res.resumed_from, "saved": res.saved}


def test_reward_rises_and_first_step_gate(task_files):
    out = run_ranks(_run, 1, _args(task_files, ["--train-iters", "40", "--rpt-eval-data",
                                                str(task_files / "tasks_heldout.jsonl"), "--eval-interval", "40",
                                                "--rpt-eval-samples", "4"]), timeout=300)[0]
    m = out["metrics"]
    assert sorted(m) == list(range(1, 41))
    first = m[1]
    assert first["ratio"] == 1.0                  # the recomputed old policy is the update's own forward
    assert first["max_abs_logp_diff"] < 1e-4
    assert first["clip_fraction"] == 0.0
    early = sum(m[i]["reward"] for i in (1, 2, 3)) / 3
    late = sum(m[i]["reward"] for i in range(36, 41)) / 5
    assert early < 0.35, early            # chance is ~1/16 per rollout
    assert late > 0.8, (early, late)
    assert all(0.0 <= v["kept_group_fraction"] <= 1.0 and v["response_length"] == 1.0 for v in m.values())
    assert m[40]["prompts_truncated"] == 2     # train and held-out task 0 lost their oldest words (8 tokens allowed)
    before, after = out["evaluations"][0], out["evaluations"][40]
    assert before["all/tasks"] == after["all/tasks"] == 16
    assert after["all/avg@4"] > before["all/avg@4"] + 0.4
    assert after["all/pass@4"] >= after["all/avg@4"]
    assert after["medium/avg@4"] == after["all/avg@4"] and after["hard/tasks"] == 0


def _run_recording_rewards(rank, world, argv):
    """`_run`, also returning every step's (answers, response texts and lengths, rewards)."""
    import megatron_rpt.rpt.loop as loop
    seen, rewards = [], loop._RPTJob._rewards

    def recording(self, tasks, rollouts):
        out = rewards(self, tasks, rollouts)
        seen.append(([t.answer for t in tasks], [[o.text for o in g] for g in rollouts],
                     [[len(o.tokens) for o in g] for g in rollouts], out.tolist()))
        return out
    loop._RPTJob._rewards = recording
    return {**_run(rank, world, argv), "seen": seen}


def test_rlvr_math_answer_rewards(task_files):
    """--rl-reward math_answer on problem files: every reward is the hand-made answer check of its
    response (the last boxed word; math-verify runs in this forked rank's helper), and the logged
    reward, answer_rate and response_length_std are those of the responses; evaluation reports the
    problems' splits without the next-token (standard) mode."""
    args = _args(task_files, ["--rl-reward", "math_answer", "--train-iters", "2", "--rpt-max-response-length", "2",
                              "--rpt-data", str(task_files / "problems_train.jsonl"),
                              "--tokenizer-model", str(task_files / "rl_tokenizer.json"),
                              "--rpt-eval-data", str(task_files / "problems_heldout.jsonl"), "--rpt-eval-samples", "2",
                              "--log-interval", "1"])
    out = run_ranks(_run_recording_rewards, 1, args, timeout=300)[0]
    assert len(out["seen"]) == 2
    for it, (answers, texts, lengths, rewards) in enumerate(out["seen"], 1):
        flat = [(a, t) for a, group in zip(answers, texts) for t in group]
        boxed = [[w for w in t.split() if w.startswith("\\boxed")] for _, t in flat]
        expected = [float(bool(b) and b[-1] in RL_CORRECT[a]) for (a, _), b in zip(flat, boxed)]
        assert [r for row in rewards for r in row] == expected
        m = out["metrics"][it]
        assert m["reward"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
        assert m["answer_rate"] == pytest.approx(sum(map(bool, boxed)) / len(boxed), abs=1e-12)
        n = [x for row in lengths for x in row]
        mean = sum(n) / len(n)
        assert m["response_length"] == pytest.approx(mean, abs=1e-12)
        assert m["response_length_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in n) / len(n)), abs=1e-9)
    assert any(0 < sum(row) < len(row) for _, _, _, rows in out["seen"] for row in rows)   # GRPO had signal
    assert any(r == 1.0 and t.split()[-1] == "\\boxed{\\frac{1}{2}}"       # a math-verify verdict was needed
               for _, texts, _, rows in out["seen"] for g, rs in zip(texts, rows) for t, r in zip(g, rs) if t.split())
    for e in out["evaluations"].values():
        assert e["all/tasks"] == 4 and e["half/tasks"] == 2 and "all/standard_acc" not in e
        assert 0.0 <= e["all/avg@2"] <= e["all/pass@2"] <= 1.0


def test_resume_is_exact(task_files, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    evals = ["--rpt-eval-data", str(task_files / "tasks_heldout.jsonl"), "--eval-interval", "3",
             "--rpt-eval-max-tasks", "4", "--rpt-eval-samples", "2"]
    first = run_ranks(_run, 1, _args(task_files, ["--train-iters", "6", "--save", a, "--save-interval", "3"] + evals),
                      timeout=300)[0]
    full = first["metrics"]
    resumed = run_ranks(_run, 1, _args(task_files, ["--train-iters", "6", "--load", a, "--ckpt-step", "3",
                                                    "--save", b] + evals), timeout=300)[0]
    assert resumed["resumed_from"].endswith("iter_0000003")
    assert sorted(resumed["metrics"]) == [4, 5, 6]
    for it in (4, 5, 6):
        for key in ("reward", "policy_loss", "grad_norm", "entropy", "response_length"):
            assert resumed["metrics"][it][key] == full[it][key], (it, key)
    # Evaluations: at the start, every --eval-interval and at the end, also in SAVE/rpt_eval.jsonl;
    # the resumed run's final evaluation equals the uninterrupted one's.
    assert sorted(first["evaluations"]) == [0, 3, 6] and sorted(resumed["evaluations"]) == [6]
    assert resumed["evaluations"][6] == first["evaluations"][6]
    written = [json.loads(line) for line in open(os.path.join(a, "rpt_eval.jsonl"))]
    assert [e.pop("iteration") for e in written] == [0, 3, 6]
    assert written == [first["evaluations"][i] for i in (0, 3, 6)]
    assert not [n for n in os.listdir(a) if n.endswith(".tmp")]  # no temporary file left behind


def test_tensor_parallel_2_first_step_gate_and_dynamic_sampling(task_files):
    outs = run_ranks(_run, 2, _args(task_files, ["--train-iters", "3", "--tensor-model-parallel-size", "2",
                                                 "--num-attention-heads", "4", "--rpt-dynamic-sampling-start", "0"]),
                     timeout=300)
    m = outs[0]["metrics"]
    assert m == outs[1]["metrics"] or all(m[i]["reward"] == outs[1]["metrics"][i]["reward"] for i in m)
    assert m[1]["ratio"] == 1.0 and m[1]["max_abs_logp_diff"] < 1e-4
    for v in m.values():
        assert v["kept_group_fraction"] == pytest.approx(v["informative_group_fraction"])


def test_data_parallel_2_splits_contexts(task_files):
    outs = run_ranks(_run, 2, _args(task_files, ["--train-iters", "2"]), timeout=300)
    assert outs[0]["metrics"][1]["reward"] == outs[1]["metrics"][1]["reward"]
    assert outs[0]["metrics"][1]["train_tokens"] == 8 * 8      # one response token per rollout, both ranks


def test_kl_to_reference_policy(task_files, tmp_path):
    """--grpo-kl-beta with the reference = the policy's own starting checkpoint: the k3 KL is 0 at
    the first update (same weights, same forward), then grows, and changes the update."""
    a = str(tmp_path / "a")
    run_ranks(_run, 1, _args(task_files, ["--train-iters", "3", "--save", a, "--save-interval", "3"]), timeout=300)
    # a new --lr and length for the resumed run: the command line's schedule (Megatron-LM's flag)
    common = ["--train-iters", "6", "--load", a, "--lr", "0.03", "--override-opt-param-scheduler"]
    with_kl = run_ranks(_run, 1, _args(task_files, common + ["--grpo-kl-beta", "1.0", "--rpt-ref-load", a]),
                        timeout=300)[0]["metrics"]
    without = run_ranks(_run, 1, _args(task_files, common), timeout=300)[0]["metrics"]
    assert with_kl[4]["kl"] == 0.0
    assert with_kl[4]["grad_norm"] == without[4]["grad_norm"]      # KL and its gradient vanish at the reference
    assert with_kl[6]["kl"] > 1e-4
    assert with_kl[6]["grad_norm"] != without[6]["grad_norm"]


def _run_lockstep(rank, world, argv):
    import megatron_rpt.rpt.loop as loop
    loop._lockstep = lambda cfg: True
    return _run(rank, world, argv)


# tiny-moe (8 experts, top-2) shrunk to 2 layers, hidden 64; responses of up to 3 tokens, so lengths differ.
MOE = ["--model-preset", "tiny-moe", "--num-layers", "2", "--hidden-size", "64", "--kv-channels", "16",
       "--num-attention-heads", "4", "--seq-length", "8", "--max-position-embeddings", "8",
       "--rpt-max-response-length", "3", "--rpt-group-size", "4", "--micro-batch-size", "4",
       "--rpt-dynamic-sampling-start", "0", "--log-interval", "1"]


def test_expert_parallel_rpt_with_uneven_ranks_equals_ep1(task_files, tmp_path):
    """EP=2 over two data-parallel ranks: dynamic sampling from step 0 keeps different numbers of groups
    per rank (different micro-batch counts) and responses end at different lengths (different decode
    steps), yet every expert all-to-all is matched (lockstep decoding, padded micro-batches): the run
    completes within the timeout and equals the EP=1 run from the same weights."""
    start = str(tmp_path / "start")
    run_ranks(_run, 1, _args(task_files, MOE + ["--train-iters", "1", "--save", start]), timeout=300)
    common = MOE + ["--train-iters", "3", "--load", start, "--finetune", "--rpt-temperature", "1.3"]
    # The EP=1 reference decodes in lockstep too: its padding rows draw from the sampler's random stream,
    # so only with them do both layouts sample the same rollouts (lockstep decoding itself is checked
    # against the no-cache reference in test_rpt_engine.py).
    ep1 = run_ranks(_run_lockstep, 2, _args(task_files, common), timeout=300)[0]["metrics"]
    ep2 = run_ranks(_run, 2, _args(task_files, common + ["--expert-model-parallel-size", "2"]), timeout=300)[0]["metrics"]
    assert sorted(ep2) == [1, 2, 3]
    # the case the lockstep exists for: ranks kept different numbers of groups and sampled different lengths
    assert any(0.0 < m["kept_group_fraction"] < 1.0 for m in ep2.values())
    assert len({m["response_length"] for m in ep2.values()}) > 1 or any(
        0.0 < m["finished_fraction"] < 1.0 for m in ep2.values())
    for it in (1, 2, 3):
        for key in ("reward", "kept_group_fraction", "response_length", "train_tokens"):
            assert ep2[it][key] == ep1[it][key], (it, key)
        for key in ("policy_loss", "entropy", "ratio", "grad_norm"):
            if ep1[it][key] is None:
                assert ep2[it][key] is None, (it, key)
            else:
                assert ep2[it][key] == pytest.approx(ep1[it][key], rel=1e-5, abs=1e-7), (it, key)


def test_pipeline_parallel_embedded_engine_is_refused_on_cpu(task_files):
    """Megatron-Core's inference moves activations between pipeline stages as CUDA tensors only: on
    CPU the run stops at start-up with one message naming the way out, not with an assertion inside
    the first rollout."""
    from tests.dist_harness import RankError
    with pytest.raises(RankError, match=r"RolloutError: the embedded engine with pipeline parallelism needs CUDA"
                                        r".* use --pipeline-model-parallel-size 1 or --rollout-engine openai"):
        run_ranks(_run, 2, _args(task_files, ["--train-iters", "1", "--pipeline-model-parallel-size", "2"]),
                  timeout=300)


def _save_qwen2(rank, world, folder, vocab):
    """A small random Qwen2 (Q/K/V biases randomised: transformers initialises them to zero) as an HF folder."""
    import torch
    import transformers
    config = transformers.Qwen2Config(architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=vocab, max_position_embeddings=64, rms_norm_eps=1e-6,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return model.config.to_dict()


def test_rpt_starts_from_an_imported_qwen2_checkpoint(task_files, tmp_path):
    """The RPT paper's base family: a Qwen2 model imported with tools/convert_checkpoint.py is the start of an
    RPT run with the flags the import printed (Q/K/V biases, no QK-norm); the first update's ratio is 1."""
    import os
    import sys

    from megatron_rpt.convert.hf_config import model_flags_from_hf
    from tests.cli import ROOT, run_python
    hf, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    config = run_ranks(_save_qwen2, 1, str(hf), len(WORDS))[0]
    proc = run_python([sys.executable, "tools/convert_checkpoint.py", "import", "--hf-dir", str(hf), "--save", str(ckpt),
                       "--no-progress"], env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 0 and "imported Qwen2ForCausalLM" in proc.stdout, proc.stdout + proc.stderr
    model = model_flags_argv(model_flags_from_hf(config))
    assert "--add-qkv-bias" in model and "--qk-layernorm" not in model
    out = run_ranks(_run, 1, _args(task_files, ["--train-iters", "2", "--load", str(ckpt)], model=model),
                    timeout=300)[0]
    assert out["resumed_from"] == str(ckpt / "iter_0000000")     # the imported weights, from iteration 0
    assert sorted(out["metrics"]) == [1, 2]
    first = out["metrics"][1]
    assert first["ratio"] == 1.0 and first["max_abs_logp_diff"] < 1e-4
