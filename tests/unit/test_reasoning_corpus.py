"""The demo's digit-chain corpus (megatron_rpt.demo_assets.reasoning): determinism, the worked steps'
arithmetic (checked against Python's own left-to-right evaluation), held-out problems kept out of the
corpus, and RPT tasks whose target token is the answer digit, scored 1 by the prefix-match reward
exactly for a `\\boxed{}` holding that digit."""

from __future__ import annotations

import re

import pytest

from megatron_rpt.data.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer
from megatron_rpt.demo_assets import reasoning as R
from megatron_rpt.fileio import write_jsonl
from megatron_rpt.rpt.prompts import build_prompt
from megatron_rpt.rpt.reward import prefix_match_reward
from megatron_rpt.rpt.tasks import load_tasks


def _reference(question: str) -> list[int]:
    """Partial results of the chain, independently: Python's integers, reduced mod 10 after each op."""
    tokens = re.findall(r"\d|[-+*]", question)
    acc, out = int(tokens[0]), []
    for op, b in zip(tokens[1::2], tokens[2::2]):
        acc = eval(f"{acc}{op}{b}") % 10
        out.append(acc)
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return HuggingFaceTokenizer(str(R.write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")))


def test_corpus_is_deterministic_and_held_out_problems_are_unseen():
    a = R.build_corpus(400, 50, seed=7)
    b = R.build_corpus(400, 50, seed=7)
    assert a.documents == b.documents and a.heldout == b.heldout and a.short == b.short
    assert R.build_corpus(400, 50, seed=8).documents != a.documents
    assert len(a.documents) == 400 and len(a.heldout) == 50
    worked = [d for d in a.documents if d.startswith(R.WORKED_PREFIX)]
    assert len(worked) == 200
    seen = {re.match(r"(?:Q:)?([^=]+)=", d).group(1) for d in a.documents}
    assert len(seen) == 400                                      # distinct problems
    assert not seen & {p.question for p in a.heldout}           # held-out never in the corpus
    assert {p.short_document() for p in a.short} == {d for d in a.documents if not d.startswith(R.WORKED_PREFIX)}


def test_worked_steps_are_arithmetically_right():
    corpus = R.build_corpus(300, 0, seed=3, min_ops=2, max_ops=5)
    n = 0
    for doc in corpus.documents:
        m = re.fullmatch(r"Q:([0-9+*-]+)=<think>(.*)</think>\\boxed\{(\d)\}", doc)
        if m is None:
            assert re.fullmatch(r"[0-9+*-]+=\d", doc), doc
            q, ans = doc.split("=")
            assert int(ans) == _reference(q)[-1]
            continue
        q, steps, ans = m.groups()
        expected = _reference(q)
        written = [re.fullmatch(r"(\d)([-+*])(\d)=(\d)", s).groups() for s in steps.split(",")]
        assert [int(r) for *_, r in written] == expected
        prev = int(q[0])
        for (x, op, y, r), (qop, qy) in zip(written, re.findall(r"([-+*])(\d)", q)):
            assert (int(x), op, y) == (prev, qop, qy)               # each step continues from the last result
            prev = int(r)
        assert int(ans) == expected[-1]
        n += 1
    assert 100 < n < 200
    assert R.Problem((7, 5, 3, 8), "+*-").worked_document() == "Q:7+5*3-8=<think>7+5=2,2*3=6,6-8=8</think>\\boxed{8}"


def test_tasks_target_the_answer_token_and_a_correct_box_scores(tokenizer, tmp_path):
    corpus = R.build_corpus(50, 20, seed=11)
    for doc in corpus.documents:
        ids = tokenizer.tokenize(doc)
        assert tokenizer.detokenize(ids) == doc
        assert b"".join(tokenizer.token_bytes(ids, at_start=True)) == doc.encode()
    assert len(tokenizer.tokenize("<think></think>\\boxed{")) == 3
    assert [tokenizer.detokenize([i]) for i in tokenizer.tokenize("7+5*3-8=8")] == ["7", "+5", "*3", "-8", "=", "8"]
    path = tmp_path / "t_heldout.jsonl"
    write_jsonl(path, R.task_records(corpus.heldout, tokenizer, prefix="h"))
    tasks = load_tasks(path)                                      # the task-file reader validates every record
    assert len(tasks) == 20
    for task, p in zip(tasks, corpus.heldout):
        doc = tokenizer.tokenize(p.short_document())
        assert task.context_tokens + task.target_tokens == [tokenizer.eod] + doc   # as in the pretraining stream
        assert tokenizer.detokenize(task.target_tokens) == str(p.answer)
        assert task.target_token_bytes == [str(p.answer).encode()]
        worked = R.EOD + p.worked_document()
        assert tokenizer.tokenize(worked)[0] == tokenizer.eod
        prompt = build_prompt(task.context, R.PROMPT_TEMPLATE)
        assert worked.startswith(prompt)                          # the reasoning prompt opens the worked form
        response = worked[len(prompt):]
        assert prefix_match_reward(response, task.target_token_bytes) == 1.0
        wrong = response.replace(f"{{{p.answer}}}", f"{{{(p.answer + 1) % 10}}}")
        assert prefix_match_reward(wrong, task.target_token_bytes) == 0.0
        assert prefix_match_reward(response.replace("\\boxed{", "\\boxed{ "), task.target_token_bytes) == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_ops"):
        R.build_corpus(10, 0, min_ops=0)
    with pytest.raises(ValueError, match="space"):
        R.build_corpus(10 ** 6, 0, min_ops=1, max_ops=1)
