"""--tokenizer-type NullTokenizer: text is whitespace-separated ids (tests and synthetic data)."""

from __future__ import annotations

from typing import Sequence

from megatron_rpt.data.tokenizers.base import Tokenizer


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated ids; as in Megatron-LM, ids 0..N-1 plus eod = N (size N + 1)."""

    def __init__(self, vocab_size: int):
        super().__init__(vocab_size=vocab_size)
        self.vocab_size = int(vocab_size) + 1
        self.eod = int(vocab_size)

    def tokenize(self, text: str) -> list[int]:
        ids = [int(x) for x in text.split()]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"NullTokenizer: id {bad[0]} outside [0, {self.vocab_size})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def token_bytes(self, ids: Sequence[int], *, at_start: bool = False) -> list[bytes]:
        """Each id's decimal text preceded by its separating space (none before a document's
        first id with `at_start`): the concatenation is `detokenize(ids)`."""
        out = []
        for i in ids:
            if not 0 <= int(i) < self.vocab_size:
                raise ValueError(f"NullTokenizer.token_bytes: id {int(i)} outside [0, {self.vocab_size})")
            out.append(b" " + str(int(i)).encode())
        if at_start and out:
            out[0] = out[0][1:]
        return out
