"""RPT prompts: the paper's v0 template text, template files, brace-safe filling, chat wrapping."""

from __future__ import annotations

import pytest

from megatron_rpt.rpt.prompts import V0_TEMPLATE, PromptError, build_prompt, load_template

# The paper's v0 template (docs/methods.md part B), copied by hand (placeholder {prompt_content} there, {context} here).
V0_EXPECTED = (
    r"Complete the given text under '### Context' by predicting the next token, and wrap it in '\boxed{}'. Please "
    r"reason step by step to find the most probable next token as the final answer, and enclose it in \boxed{} "
    r"(note: the token may begin with a space, e.g., \boxed{ para} or \boxed{ =}; do not use \text{})." "\n"
    "\n"
    "### Context\n"
    "{context}"
)


def test_v0_is_the_papers_text():
    assert V0_TEMPLATE == V0_EXPECTED
    assert load_template("v0") == V0_EXPECTED
    prompt = build_prompt("The sum is", load_template("v0"))
    assert prompt.endswith("### Context\nThe sum is")       # no newline after the context
    assert prompt.startswith("Complete the given text under '### Context'")
    assert build_prompt("x") == V0_EXPECTED.replace("{context}", "x")   # v0 is the default


@pytest.mark.parametrize("context", [
    "{}", "{0}", "{context}", "{{context}}", "\\frac{a}{b} = {x:>10}", "%s %d {!r}", "} unbalanced {", "",
    "def f():\n    return {'a': 1}\n", "x {prompt_content} y"])
def test_braces_in_the_context_come_through_verbatim(context):
    template = "A {{literal}} head\n{context}\ntail {0} }"
    assert build_prompt(context, template) == "A {{literal}} head\n" + context + "\ntail {0} }"
    assert build_prompt(context, V0_TEMPLATE) == V0_EXPECTED[:-len("{context}")] + context


def test_template_files(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("Predict what follows:\n{context}\n", encoding="utf-8")
    assert load_template(str(good)) == "Predict what follows:\n{context}"   # the file's final newline is not text
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes("Q {context} A\r\n".encode())
    assert load_template(str(crlf)) == "Q {context} A"
    kept = tmp_path / "kept.txt"
    kept.write_text("{context}\n\n", encoding="utf-8")
    assert load_template(str(kept)) == "{context}\n"                       # only one final newline dropped
    none = tmp_path / "none.txt"
    none.write_text("no placeholder {prompt_content}\n", encoding="utf-8")
    with pytest.raises(PromptError, match=f"{none}: .*exactly one {{context}} placeholder, found 0"):
        load_template(str(none))
    two = tmp_path / "two.txt"
    two.write_text("{context} and {context}", encoding="utf-8")
    with pytest.raises(PromptError, match=f"{two}: .*found 2"):
        load_template(str(two))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 {context}".encode("latin-1"))
    with pytest.raises(PromptError, match=f"{latin}: not UTF-8"):
        load_template(str(latin))
    with pytest.raises(PromptError, match="neither a built-in .*v0.* nor a file"):
        load_template(str(tmp_path / "missing.txt"))
    with pytest.raises(PromptError, match="exactly one"):
        build_prompt("x", "no placeholder")


CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _hf_tokenizer(tmp_path, chat_template):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world {} \\boxed"] * 20, vocab_size=280, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


def test_chat_wrapping(tmp_path):
    tok = _hf_tokenizer(tmp_path, CHAT)
    context = "x = {y} \\boxed{"
    prompt = build_prompt(context, V0_TEMPLATE, chat_tokenizer=tok)
    inner = V0_EXPECTED.replace("{context}", context)
    assert prompt == f"<|im_start|>user\n{inner}<|im_end|>\n<|im_start|>assistant\n"
    # Our HuggingFaceTokenizer wrapper is accepted too.
    from megatron_rpt.data.tokenizers import build_tokenizer
    tok.save_pretrained(tmp_path / "tok")
    ours = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tok"))
    assert build_prompt(context, V0_TEMPLATE, chat_tokenizer=ours) == prompt
    with pytest.raises(PromptError, match="no chat template"):
        build_prompt(context, V0_TEMPLATE, chat_tokenizer=_hf_tokenizer(tmp_path, None))
