"""--tokenizer-type SentencePieceTokenizer / Llama2Tokenizer: a sentencepiece .model file used as is.

SentencePieceTokenizer ends documents with the model's <eod> piece when it has one (models trained by
tools/train_tokenizer.py), else its eos id. Llama2Tokenizer (Megatron-LM's name for Llama-2's and
Mixtral's tokenizer.model) always ends them with eos (</s>). Neither adds a BOS id to a document:
Megatron-LM's current tokenizer library does not either (its legacy Llama2Tokenizer prepended <s>).
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

from megatron_rpt.data.tokenizers.base import Tokenizer, TokenizerError
from megatron_rpt.data.tokenizers.training import SPM_SPECIALS


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str, eod_is_eos: bool = False):
        import sentencepiece as spm
        super().__init__(model=os.path.abspath(model_file))
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"--tokenizer-model: {model_file} is not a sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        eod = -1 if eod_is_eos else self._sp.piece_to_id(SPM_SPECIALS["eod"])
        if eod == self._sp.unk_id() or eod < 0:
            eod = self._sp.eos_id()
        if eod < 0:
            raise TokenizerError(f"--tokenizer-model: {model_file} has " + ("no eos id (Llama2Tokenizer ends documents "
                                 "with it)" if eod_is_eos else f"neither an {SPM_SPECIALS['eod']} piece nor an eos id")
                                 + "; train it with tools/train_tokenizer.py")
        self.eod = eod
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else -1
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: preprocessing parallelises over worker processes.
        return self._sp.encode(list(texts), num_threads=1)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @functools.cached_property
    def _table(self) -> list:
        sp = self._sp
        table: list = []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                table.append(b"")   # decode() drops control pieces; unk has no source bytes
            elif sp.is_byte(i):
                table.append(bytes([int(piece[3:5], 16)]))  # <0xNN> byte fallback
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    def _byte_table(self) -> list:
        return self._table

    @functools.cached_property
    def _adds_dummy_prefix(self) -> bool:
        from sentencepiece import sentencepiece_model_pb2
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        return bool(proto.normalizer_spec.add_dummy_prefix)

    def _dummy_prefix(self) -> bool:
        return self._adds_dummy_prefix
