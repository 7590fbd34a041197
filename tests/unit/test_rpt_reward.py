"""RPT reward: answer extraction and the prefix-match rule (eq. 3), against hand-worked cases and a
brute-force reference; adversarial responses never raise."""

import json
import random

import pytest

from megatron_rpt.rpt.reward import extract_prediction, prefix_match_reward

TARGET = [b" para", b"graph", b" of", b" text"]


def reference(prediction, tokens):
    """Eq. 3 literally: y must equal the concatenation of the first k tokens for some k >= 1."""
    if not prediction:
        return 0.0
    y = prediction.encode("utf-8")
    return 1.0 if any(y == b"".join(tokens[:k]) for k in range(1, len(tokens) + 1)) else 0.0


@pytest.mark.parametrize("response,expected", [
    ("<think>hmm</think> The answer is \\boxed{ para}", " para"),
    ("<think>\\boxed{ wrong}</think>\\boxed{ para}", " para"),            # the box before </think> is ignored
    ("<think>only thinking \\boxed{ para}</think> no box after", None),
    ("no think tags \\boxed{ a} then \\boxed{ b}", " b"),                 # without </think>: anywhere, last
    ("</think>\\boxed{x^{2}+{y}}", "x^{2}+{y}"),                          # nested braces, full content
    ("</think>\\boxed{a \\boxed{b}}", "a \\boxed{b}"),                    # the last top-level box
    ("</think>\\boxed{\\{}", "\\{"),                                     # escaped brace is content
    ("</think>\\boxed{ok} \\boxed{open {", None),                         # the last box is unbalanced
    ("</think>\\boxed{}", ""),
    ("</think>", None),
    ("", None),
    ("</think>\\boxed{ para}</think>\\boxed{graph}", "graph"),            # after the first </think>
])
def test_extract_prediction(response, expected):
    assert extract_prediction(response) == expected


@pytest.mark.parametrize("prediction,expected", [
    (" para", 1.0),                 # one token
    (" paragraph", 1.0),            # two tokens: no bonus, still 1
    (" paragraph of text", 1.0),    # the whole target
    (" par", 0.0),                  # ends inside a token
    (" paragraph o", 0.0),
    ("para", 0.0),                  # the leading space matters
    (" para ", 0.0),                # so does a trailing one
    (" paragraph of text and more", 0.0),  # longer than the target
    ("", 0.0),                      # empty prediction
    (" Para", 0.0),
])
def test_prefix_match_reward_boundaries(prediction, expected):
    response = f"<think>...</think> \\boxed{{{prediction}}}"
    assert prefix_match_reward(response, TARGET) == expected == reference(prediction, TARGET)


def test_unicode_split_across_tokens():
    # "é" (c3 a9) split over two byte-level tokens, then " café"
    tokens = [b"\xc3", b"\xa9", b" caf", b"\xc3\xa9"]
    assert prefix_match_reward("</think>\\boxed{é}", tokens) == 1.0          # ends on the boundary after 2 tokens
    assert prefix_match_reward("</think>\\boxed{é caf}", tokens) == 1.0
    assert prefix_match_reward("</think>\\boxed{é café}", tokens) == 1.0
    assert prefix_match_reward("</think>\\boxed{e}", tokens) == 0.0
    assert prefix_match_reward("</think>\\boxed{\ud800}", tokens) == 0.0     # lone surrogate: no exception


def test_missing_or_bad_responses_score_zero():
    assert prefix_match_reward("<think>forgot to answer</think>", TARGET) == 0.0
    assert prefix_match_reward("</think>\\boxed{ para", TARGET) == 0.0      # never closed
    assert prefix_match_reward(None, TARGET) == 0.0                          # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of bytes"):
        prefix_match_reward("</think>\\boxed{ para}", [" para"])             # a caller bug, not model output


def test_random_responses_never_raise_and_agree_with_the_reference():
    rng = random.Random(0)
    alphabet = ["\\boxed{", "}", "{", "\\{", "\\}", "</think>", "<think>", " para", "graph", " of", "é", "\ud800",
                "x", " ", "\\", "\n"]
    for _ in range(3000):
        response = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        reward = prefix_match_reward(response, TARGET)
        assert reward in (0.0, 1.0)
        prediction = extract_prediction(response)
        try:
            expected = reference(prediction, TARGET)
        except UnicodeEncodeError:
            expected = 0.0
        assert reward == expected, response


# ----------------------------------------------------------------------------- RLVR: math answers, registry

# (prediction, reference, hand-computed verdict), one group per comparison of rpt.answers
EXACT = [("  x + 1 ", "x  +  1", True), ("$x+1$", "x+1", True), ("$$y$$.", "y", True), ("Yes.", "Yes", True),
         ("\u22123", "-3", True), ("x+1", "x+2", False), ("Paris", "London", False), ("...", "..", False)]
NUMERIC = [("1,234", "1234", True), ("1,234.50", "1234.5", True), ("0.5", "1/2", True), ("-2/4", "-0.5", True),
           ("50%", "50", True), ("50%", "0.5", False), ("$24", "24", True), ("\\$24.00", "24", True),
           ("$-3", "-3", True), (".5", "0.50", True), ("+7", "7", True), ("3.0", "3", True),
           ("1,23", "123", False), ("-3", "3", False), ("2/3", "0.6667", False), ("1/0", "0", False),
           ("12345678901234567890123", "12345678901234567890123.0", True), ("7", "7.000001", False),
           ("1.5e-3", "0.0015", True), ("2E+2", "200", True), ("1e400", "1", False), ("1e-3", "0.01", False)]
SYMBOLIC = [("\\frac{1}{2}", "0.5", True), ("-\\frac12", "-1/2", True), ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),
            ("2\\sqrt{3}", "\\sqrt{12}", True), ("(x+1)^2", "x^2+2x+1", True), ("x=2", "2", True),
            ("\\frac{1}{2}", "\\frac{1}{3}", False), ("\\sqrt{2}", "1.41", False), ("(x+1)^2", "x^2+1", False),
            ("\\pi", "3.14", False)]
# model output that must neither raise nor hang, and is not correct
ADVERSARIAL = ["10^{10^{10}}", "10**10**10", "9" * 5000, "{" * 3000 + "1" + "}" * 3000, "{" * 150 + "1" + "}" * 150,
               "\\frac{", "\\sqrt[}{", "$", "$$", "", "   ", "\ud800", "1\ud800", "\x00", "1" * 200 + "/0"]


@pytest.mark.parametrize("prediction,reference,expected", EXACT + NUMERIC + SYMBOLIC)
def test_math_answers_hand_computed(prediction, reference, expected):
    from megatron_rpt.rpt.answers import answers_match, math_answer_reward
    assert answers_match(prediction, reference) is expected
    assert math_answer_reward(f"<think>\\boxed{{0}}</think> so \\boxed{{{prediction}}}.", reference) == float(expected)


def test_math_answers_adversarial_never_raise_nor_hang(monkeypatch):
    import time

    import megatron_rpt.rpt.answers as answers
    answers.symbolic_equal.cache_clear()
    for bad in ADVERSARIAL:
        start = time.perf_counter()
        assert answers.answers_match(bad, "1") is False, repr(bad)
        assert answers.math_answer_reward(f"</think>\\boxed{{{bad}}}", "1") == 0.0
        assert answers.math_answer_reward(bad, "1") == 0.0
        # math-verify's own 1 s timeouts end slow parses in the helper (a loaded machine: a margin)
        assert time.perf_counter() - start < 3 * answers.VERIFY_TIMEOUT_S, repr(bad)
    for bad in (None, 3, b"1"):
        assert answers.answers_match(bad, "1") is False
        assert answers.math_answer_reward(bad, "1") == 0.0
    # past the hard deadline the helper is killed (as one stuck in C code would be) and the next
    # comparison starts a new one
    answers.symbolic_equal.cache_clear()
    monkeypatch.setattr(answers, "VERIFY_TIMEOUT_S", 0.2)
    helper = answers._VERIFIER.proc
    start = time.perf_counter()
    assert answers.answers_match("{" * 150 + "1" + "}" * 150, "1") is False    # ~1 s of parsing in the helper
    assert time.perf_counter() - start < 1.0 and answers._VERIFIER.proc is None and helper.poll() is not None
    monkeypatch.setattr(answers, "VERIFY_TIMEOUT_S", 5.0)
    assert answers.answers_match("\\frac{2}{4}", "1/2") is True


def test_math_verify_is_safe_off_the_main_thread():
    """math-verify's own SIGALRM timeouts raise ValueError in a thread; ours run in the helper process
    (in forked processes too: the RLVR run of tests/parallel/test_rpt_loop.py is a forked rank)."""
    import threading

    from megatron_rpt.rpt.answers import answers_match, symbolic_equal
    symbolic_equal.cache_clear()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(answers_match("\\frac{3}{6}", "0.5")))
    thread.start()
    thread.join()
    assert seen == [True]


def test_canonical_answer_votes():
    from megatron_rpt.rpt.answers import canonical_answer
    assert canonical_answer(" $0.50$ ") == canonical_answer("1/2") == "1/2"
    assert canonical_answer("1,000.") == canonical_answer("1000") == "1000"
    assert canonical_answer("50%") == "50"
    assert canonical_answer("x + 1") == "x + 1"
    assert canonical_answer("") is None and canonical_answer(None) is None


def test_reward_registry():
    from megatron_rpt.config import ConfigError
    from megatron_rpt.config.schema import RL_REWARDS
    from megatron_rpt.rpt.prompts import TEMPLATES
    from megatron_rpt.rpt.rewards import RewardSpec, get_reward, register_reward, reward_names
    assert reward_names() == sorted(RL_REWARDS) == ["information_gain", "math_answer", "prefix_match"]
    for name in RL_REWARDS:
        assert get_reward(name).default_template in TEMPLATES
    assert TEMPLATES["rlp"] == "{context}"
    rlp = get_reward("information_gain")
    assert rlp.model_scored and rlp.score is None and rlp.task_kind == "corpus"
    math = get_reward("math_answer")
    assert math.task_kind == "problem" and math.default_template == "math"
    with pytest.raises(ConfigError, match="--rl-reward 'nope' is not a reward; choose one of information_gain, "
                                          "math_answer, prefix_match"):
        get_reward("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward(math)
    with pytest.raises(ValueError, match="task_kind"):
        register_reward(RewardSpec("x", "images", "v0", False, lambda t, task: 0.0, None))

    class Task:
        target_token_bytes = [b" para", b"graph"]
    assert get_reward("prefix_match").score("</think>\\boxed{ paragraph}", Task()) == 1.0
    assert get_reward("prefix_match").prediction("</think>\\boxed{ para}") == " para"

    class Problem:
        answer = "0.5"
    assert math.score("<think>1/2?</think>\\boxed{\\frac{1}{2}}", Problem()) == 1.0
    assert math.score("<think></think>\\boxed{0.4}", Problem()) == 0.0
    assert math.prediction("</think>\\boxed{$0.50$}") == "1/2" and math.prediction("no box") is None


def test_task_file_of_the_wrong_kind_is_refused(tmp_path):
    from megatron_rpt.rpt.rewards import check_task_file, get_reward, load_reward_tasks
    from megatron_rpt.rpt.tasks import TaskError
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "a", "family": "math", "source": "s", "question": "1+1?", "answer": "2",
                                    "solution": None, "splits": []}) + "\n")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "d:1", "doc_id": "d", "position": 1, "context": "a", "context_tokens": [1],
                                  "target_tokens": [2], "target_bytes": ["62"], "entropy": 0.1, "splits": []}) + "\n")
    with pytest.raises(TaskError, match=f"--rpt-data {problems}: holds RLVR problem files "
                                        "\\(tools/build_rl_data.py\\), but --rl-reward prefix_match reads RPT task"):
        check_task_file(get_reward("prefix_match"), problems, "--rpt-data")
    with pytest.raises(TaskError, match="--rpt-eval-data .*holds RPT task files .* --rl-reward math_answer reads RLVR"):
        load_reward_tasks(get_reward("math_answer"), corpus, "--rpt-eval-data")
    assert [p.answer for p in load_reward_tasks(get_reward("math_answer"), problems, "--rpt-data")] == ["2"]
    assert [t.id for t in load_reward_tasks(get_reward("information_gain"), corpus, "--rpt-data")] == ["d:1"]
