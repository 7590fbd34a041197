"""RPT reward: answer extraction and the prefix-match rule (eq. 3), against hand-worked cases and a
brute-force reference; adversarial responses never raise."""

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
