"""RL prompt templates: RPT's "v0", RLVR's "math", RLP's bare "rlp", user template files, and prompt building.

A template is plain text with exactly one `{context}` placeholder (the paper writes it
`{prompt_content}`). Filling it is plain string splicing, never `str.format`: contexts are corpus
text and contain braces (LaTeX, code), which must come through verbatim.

The v0 text is the paper's (docs/methods.md part B; arXiv 2506.08007, whitespace reconstructed from the PDF). It
ends right after the context, with no trailing newline: the model predicts the token that follows
the context, and a newline the corpus does not have would change what that is.
"""

from __future__ import annotations

import os
from typing import Any, Optional

PLACEHOLDER = "{context}"

V0_TEMPLATE = (
    "Complete the given text under '### Context' by predicting the next token, and wrap it in '\\boxed{}'. "
    "Please reason step by step to find the most probable next token as the final answer, and enclose it in "
    "\\boxed{} (note: the token may begin with a space, e.g., \\boxed{ para} or \\boxed{ =}; do not use \\text{})."
    "\n\n### Context\n" + PLACEHOLDER
)

# RLVR's math problems (--rl-reward math_answer): reasoning in <think> </think>, the final answer boxed
# (what rpt.answers extracts). The problem is the {context}.
MATH_TEMPLATE = (
    "Solve the following problem. Reason step by step inside <think> </think>, then give the final answer "
    "after </think>, enclosed in \\boxed{} (only the answer: a number or an expression, no units or words)."
    "\n\n### Problem\n" + PLACEHOLDER
)

# RLP (--rl-reward information_gain): the raw corpus text, no instruction (the model thinks, then
# the next tokens of the text are scored).
RLP_TEMPLATE = PLACEHOLDER

TEMPLATES = {"v0": V0_TEMPLATE, "math": MATH_TEMPLATE, "rlp": RLP_TEMPLATE}


class PromptError(ValueError):
    """A template that cannot be used (names the file) or a tokenizer without a chat template."""


def check_template(template: str, source: str = "template") -> str:
    """`template` if it holds exactly one `{context}`; PromptError naming `source` otherwise."""
    n = template.count(PLACEHOLDER)
    if n != 1:
        raise PromptError(f"{source}: a prompt template must contain exactly one {PLACEHOLDER} placeholder, "
                          f"found {n}")
    return template


def load_template(spec: str) -> str:
    """A built-in template by name (`TEMPLATES`) or a UTF-8 text file's template.

    A file's single final newline is the end of its last line (editors add it), not template text,
    and is dropped; any other whitespace is kept as written.
    """
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if not os.path.isfile(spec):
        raise PromptError(f"prompt template {spec!r} is neither a built-in ({', '.join(TEMPLATES)}) nor a file")
    try:
        with open(spec, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise PromptError(f"{spec}: not UTF-8 text ({e})") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    return check_template(text, spec)


def fill_template(template: str, context: str) -> str:
    """The template with its `{context}` replaced by `context`, verbatim (braces included)."""
    head, tail = check_template(template).split(PLACEHOLDER)
    return head + context + tail


def build_prompt(context: str, template: str = V0_TEMPLATE, chat_tokenizer: Optional[Any] = None) -> str:
    """The prompt text for one context; with `chat_tokenizer` (a transformers tokenizer, or our
    HuggingFaceTokenizer) wrapped as one user turn by its chat template, generation prompt added."""
    prompt = fill_template(template, context)
    if chat_tokenizer is None:
        return prompt
    tok = getattr(chat_tokenizer, "_tok", chat_tokenizer)  # our HuggingFaceTokenizer wraps a transformers one
    if not hasattr(tok, "apply_chat_template") or not getattr(tok, "chat_template", None):
        raise PromptError(f"the tokenizer {type(tok).__name__} has no chat template; drop the chat wrapping or "
                          "use a tokenizer folder with one (chat_template.jinja / tokenizer_config.json)")
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
