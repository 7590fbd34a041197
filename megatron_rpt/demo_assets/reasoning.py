"""A synthetic corpus where thinking helps the next token: chains of single-digit operations mod 10.

A problem is a left-to-right chain such as `7+5*3-8` over digits 0-9 with `+ - *`, every partial
result taken mod 10 (`7+5=2, 2*3=6, 6-8=8`: the answer is 8). Documents come in two kinds:

- short form: the question, `=`, the answer digit: `7+5*3-8=8`;
- worked form: `Q:` + the question + `=` + `<think>` + one step `a op b = c` per operation,
  comma-separated, + `</think>` + the answer in `\\boxed{}`: `Q:7+5*3-8=<think>7+5=2,2*3=6,6-8=8</think>\\boxed{8}`.

The leading `Q:` tells a model which kind it reads, so a short-form context (`7+5*3-8=`) is always
followed by a digit and a worked one by `<think>`. The short-form answer needs the whole chain in
one forward pass (hard for a tiny model); each worked step needs one table look-up of the last
three tokens (easy). RPT tasks are the answer positions of short-form documents; the reasoning
prompt `Q:{context}` (`PROMPT_TEMPLATE`, after the document separator) turns such a context into the
start of a worked document, so a model that learned the worked form can compute the next token and write it in `\\boxed{}`.

The tokenizer (`write_tokenizer`) is a fixed vocabulary in a Hugging Face folder: characters, plus
one token per operation-and-operand pair (`+5`, `*3`: 30 tokens), plus `<think>`, `</think>` and
`\\boxed{` as one token each. The pairs make a worked step's `op b` one copy from the question: with
separate tokens a 2-layer model pretrained for minutes copied the operation right 99% of the time but
the operand digit only ~40% (it has to find the digit after the i-th operation; repeated digits
mislead it), so chains failed on copying, not arithmetic. A digit after `=` stays a token of its
own and no token carries a leading space, so the answer token's bytes are exactly the digit a
correct `\\boxed{d}` holds (`rpt.reward.prefix_match_reward`). Everything here is deterministic
given the seed (`random.Random`); held-out problems never occur in the training corpus.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

OPS = "+-*"
THINK, END_THINK, BOX = "<think>", "</think>", "\\boxed{"
EOD = "<|endoftext|>"
WORKED_PREFIX = "Q:"
# The reasoning prompt: a short-form context as the start of a worked document, after the separator
# that precedes every document in the pretraining stream (`task_records`).
PROMPT_TEMPLATE = EOD + WORKED_PREFIX + "{context}"
# Every character the documents use ("▁" stands for a space, which the documents never contain).
CHARS = "0123456789" + OPS + "=,:Q}" + "\u2581"


def apply(a: int, op: str, b: int) -> int:
    """One step, mod 10."""
    if op == "+":
        return (a + b) % 10
    if op == "-":
        return (a - b) % 10
    if op == "*":
        return (a * b) % 10
    raise ValueError(f"unknown operation {op!r}")


@dataclass(frozen=True)
class Problem:
    digits: tuple[int, ...]     # n + 1 operands
    ops: str                    # n operations

    @property
    def question(self) -> str:
        return str(self.digits[0]) + "".join(op + str(d) for op, d in zip(self.ops, self.digits[1:]))

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(a, op, b, a op b mod 10) for each operation, left to right."""
        out, acc = [], self.digits[0]
        for op, b in zip(self.ops, self.digits[1:]):
            r = apply(acc, op, b)
            out.append((acc, op, b, r))
            acc = r
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    def short_document(self) -> str:
        return f"{self.question}={self.answer}"

    def short_context(self) -> str:
        """The short-form document up to its answer: an RPT task's context."""
        return f"{self.question}="

    def worked_document(self) -> str:
        steps = ",".join(f"{a}{op}{b}={r}" for a, op, b, r in self.steps())
        return f"{WORKED_PREFIX}{self.question}={THINK}{steps}{END_THINK}{BOX}{self.answer}}}"


def sample_problem(rng: random.Random, min_ops: int, max_ops: int) -> Problem:
    n = rng.randint(min_ops, max_ops)
    return Problem(tuple(rng.randrange(10) for _ in range(n + 1)), "".join(rng.choice(OPS) for _ in range(n)))


@dataclass
class ReasoningCorpus:
    documents: list[str]            # the pretraining corpus, both kinds shuffled
    short: list[Problem]            # the problems written in short form (RPT training tasks)
    heldout: list[Problem]          # problems absent from `documents` (evaluation tasks)


def build_corpus(num_documents: int, num_heldout: int, *, seed: int = 1234, worked_fraction: float = 0.5,
                 min_ops: int = 2, max_ops: int = 4) -> ReasoningCorpus:
    """`num_documents` distinct problems, a `worked_fraction` of them written in worked form and the
    rest in short form, plus `num_heldout` further distinct problems for evaluation."""
    if not 1 <= min_ops <= max_ops:
        raise ValueError(f"need 1 <= min_ops <= max_ops (got {min_ops}, {max_ops})")
    if not 0.0 <= worked_fraction <= 1.0:
        raise ValueError(f"worked_fraction must be in [0, 1] (got {worked_fraction})")
    space = sum(10 ** (n + 1) * 3 ** n for n in range(min_ops, max_ops + 1))
    if num_documents + num_heldout > space // 2:
        raise ValueError(f"{num_documents + num_heldout} problems asked of a space of {space}")
    rng = random.Random(seed)
    seen: set = set()
    problems: list[Problem] = []
    while len(problems) < num_documents + num_heldout:
        p = sample_problem(rng, min_ops, max_ops)
        if p.question not in seen:
            seen.add(p.question)
            problems.append(p)
    train, heldout = problems[:num_documents], problems[num_documents:]
    n_worked = round(worked_fraction * num_documents)
    worked, short = train[:n_worked], train[n_worked:]
    documents = [p.worked_document() for p in worked] + [p.short_document() for p in short]
    random.Random(seed + 1).shuffle(documents)     # the same corpus whatever num_heldout is
    return ReasoningCorpus(documents, short, heldout)


def write_tokenizer(folder: str | Path) -> Path:
    """The fixed vocabulary as a Hugging Face tokenizer folder (--tokenizer-type HuggingFaceTokenizer):
    a BPE over `CHARS` whose only merges are operation + digit, with `<think>`, `</think>`, `\\boxed{`
    and the end-of-document token as added tokens. Spaces map to "▁" (so `token_bytes` applies)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "tokenizer.json").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    vocab = {EOD: 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    merges = [(op, d) for op in OPS for d in "0123456789"]
    vocab.update({op + d: len(vocab) + i for i, (op, d) in enumerate(merges)})
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse()])
    tok.add_tokens([AddedToken(t, normalized=False) for t in (THINK, END_THINK, BOX)])
    tok.add_special_tokens([AddedToken(EOD, special=True), AddedToken("<unk>", special=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD, unk_token="<unk>")
    tmp = folder.with_name(folder.name + ".tmp")
    fast.save_pretrained(str(tmp))
    tmp.rename(folder)    # complete or absent
    return folder


def task_records(problems: Iterable[Problem], tokenizer, *, prefix: str) -> list[dict]:
    """RPT task records (the `mrpt-rpt-tasks/1` fields that `rpt.tasks.load_tasks` reads; this package
    sits below `rpt` and does not import it) at the answer position of each problem's short-form
    document: context = the question and `=`, target = the answer digit's token. Entropy is 0 (no
    proxy: the positions are chosen by construction, so the tasks belong to no difficulty split).

    The context tokens start with the end-of-document token, as every document does in the
    pretraining stream (documents are concatenated, each after the previous one's EOD): without it a
    model cannot tell a short-form question from the tail of a worked one (`Q:` cut off), and
    standard mode would measure that confusion. The context text is the document's own text;
    `PROMPT_TEMPLATE` puts the separator back in front of `Q:`."""
    out = []
    for i, p in enumerate(problems):
        doc = [tokenizer.eod] + tokenizer.tokenize(p.short_document())
        context = [tokenizer.eod] + tokenizer.tokenize(p.short_context())
        if doc[:len(context)] != context or len(doc) != len(context) + 1:
            raise ValueError(f"problem {p.question}: the answer is not one token after the context")
        target = doc[len(context):]
        target_bytes = tokenizer.token_bytes(target)
        if b"".join(target_bytes) != str(p.answer).encode():
            raise ValueError(f"problem {p.question}: target bytes {target_bytes} are not the answer {p.answer}")
        doc_id = f"{prefix}{i}"
        out.append({"id": f"{doc_id}:{len(context)}", "doc_id": doc_id, "position": len(context),
                    "context": p.short_context(), "context_tokens": context, "target_tokens": target,
                    "target_bytes": [b.hex() for b in target_bytes], "entropy": 0.0, "splits": []})
    return out
