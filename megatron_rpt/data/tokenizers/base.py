"""The tokenizer interface every --tokenizer-type implements (`Tokenizer`) and `TokenizerError`.

Every tokenizer exposes what Megatron-Core's GPT datasets and our tools need: `vocab_size` (the
tokenizer's own size; the model pads it), `eod`, `pad` (-1 when the tokenizer has none, which is
Megatron's "no pad" id), `bos`, `tokenize`, `tokenize_batch` (the same ids, through the
library's batch call: what preprocessing uses), `detokenize`, `token_bytes` (the exact bytes each
token contributes to the text: RPT's byte-exact targets) and `unique_identifiers` (keys the
dataset index cache). Files are local only: nothing is ever downloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence


class TokenizerError(ValueError):
    """A tokenizer that cannot be built (names the flag and the path)."""


class Tokenizer:
    """Common interface; subclasses set the attributes in __init__.

    Not a subclass of megatron.core's tokenizer base classes: in megatron-core 0.16 the
    `megatron_tokenizer.MegatronLegacyTokenizer` base logs a deprecation warning on every
    construction and the new `megatron.core.tokenizers` API loads through its own config/library
    layer. GPTDataset only reads `vocab_size`, `eod`, `pad` and `unique_identifiers` (duck typed),
    which this class provides.
    """

    vocab_size: int
    eod: int
    pad: int = -1
    bos: Optional[int] = None

    def __init__(self, **identifiers):
        self.unique_identifiers = OrderedDict(cls=type(self).__name__, **identifiers)

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[tokenize(t) for t in texts]`; subclasses use their library's batch call (less per-call overhead)."""
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, ids: Sequence[int], *, at_start: bool = False) -> list[bytes]:
        """The exact bytes each token of `ids` contributes to the text, one `bytes` per id.

        Special/control tokens give their text's bytes, or b"" where decoding drops them.
        `at_start`: `ids` begin a document, so a tokenizer that adds a dummy-prefix space to the
        first piece (sentencepiece's add_dummy_prefix, Metaspace "first") does not count it, as its
        decoder does not. For byte-exact tokenizers b"".join(token_bytes(tokenize(t), at_start=True))
        == t.encode("utf-8"); RPT's task builder checks exactly that per document.
        """
        table = self._byte_table()
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(table) or table[i] is None:
                raise ValueError(f"{type(self).__name__}.token_bytes: id {i} has no bytes "
                                 f"(vocabulary size {len(table)})")
            out.append(table[i])
        if at_start and out and self._dummy_prefix() and out[0].startswith(b" "):
            out[0] = out[0][1:]
        return out

    def _byte_table(self) -> list:
        """id -> bytes for the whole vocabulary (None: no bytes); built once, cached by subclasses."""
        raise TokenizerError(f"{type(self).__name__} does not define token bytes")

    def _dummy_prefix(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"
