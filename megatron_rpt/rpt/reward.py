"""RPT's answer extraction and prefix-match reward (arXiv 2506.08007, eq. 3; docs/methods.md part B).

A response looks like `<think> ... </think> ... \\boxed{PREDICTION}`. The prediction is the full
content of the last top-level `\\boxed{...}` after the first `</think>` (anywhere when there is no
`</think>`), braces balanced. Backslash-escaped braces (`\\{`, `\\}`) are literal characters: they do
not open or close a group and stay in the content as written. The content is taken verbatim (no
stripping: a leading space is part of a token, e.g. `\\boxed{ para}`).

The reward is 1.0 exactly when the prediction's UTF-8 bytes are a prefix of the concatenated target
token bytes that ends on a target token boundary (so several correct tokens also score 1, and a
prediction ending inside a token scores 0); otherwise 0.0. Responses are model output, so nothing
in them raises: a missing, empty or unbalanced box, or text that is not encodable (lone surrogates),
scores 0.0.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Optional, Sequence

THINK_END = "</think>"
BOX = "\\boxed{"


def _boxed_contents(text: str) -> list[Optional[str]]:
    """Contents of the top-level `\\boxed{...}` groups of `text` in order; None for one that is
    never closed (it runs to the end of the text, so it is the last)."""
    found: list[Optional[str]] = []
    i = text.find(BOX)
    while i != -1:
        start = i + len(BOX)
        depth, j = 1, start
        while j < len(text):
            c = text[j]
            if c == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
                j += 2  # an escaped brace is a character of the content
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if depth:
            found.append(None)
            break
        found.append(text[start:j])
        i = text.find(BOX, j + 1)
    return found


def extract_prediction(response: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` after `</think>` (anywhere without one); None when there
    is none or the last one is not closed."""
    if not isinstance(response, str):
        return None
    cut = response.find(THINK_END)
    region = response if cut == -1 else response[cut + len(THINK_END):]
    boxes = _boxed_contents(region)
    return boxes[-1] if boxes else None


def prefix_match_reward(response: str, target_token_bytes: Sequence[bytes]) -> float:
    """1.0 if the extracted prediction's bytes are the target's first k tokens (k >= 1), else 0.0."""
    return prediction_reward(extract_prediction(response), target_token_bytes)


def prediction_reward(prediction: Optional[str], target_token_bytes: Sequence[bytes]) -> float:
    """Eq. 3 for an already extracted prediction (None or empty: 0.0)."""
    targets = list(target_token_bytes)
    if not all(isinstance(t, (bytes, bytearray)) for t in targets):
        raise TypeError("target_token_bytes must be a sequence of bytes (the ground-truth tokens' bytes)")
    if not prediction:
        return 0.0
    try:
        y = prediction.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates in a decoded response
        return 0.0
    boundaries = set(accumulate(len(t) for t in targets))
    return 1.0 if len(y) in boundaries and b"".join(targets).startswith(y) else 0.0
