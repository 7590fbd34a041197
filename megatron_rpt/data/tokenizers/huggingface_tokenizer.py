"""--tokenizer-type HuggingFaceTokenizer and GPT2BPETokenizer, and their byte-level BPE helpers.

`tiktoken_equivalent` proves when a byte-level BPE `tokenizers.Tokenizer` gives the same ids on
tiktoken (which both classes then encode on); `_gpt2_byte_alphabet` is GPT-2's byte <-> character
map of vocab.json/merges.txt (also used for `token_bytes`).
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Optional, Sequence

from megatron_rpt.data.tokenizers.base import Tokenizer, TokenizerError


# Compared on both backends before a tokenizer runs on tiktoken. Exercises the pre-tokenizer's
# branches: contractions, letters, digits, punctuation runs, whitespace runs (incl. trailing),
# non-ASCII, emoji, CR/LF.
BPE_PROBE = ("It's 2026: they'll say  \"hello\"   world!!\n\n\tTabs\r\nÜñïcödé ☃ 🙂 数字123456 <|endoftext|>"
             " 'S 'LL 're   ")


class _HFBase(Tokenizer):
    _fast = None

    def _init_from(self, tok, eod_token: Optional[str]) -> None:
        self._tok = tok
        backend = tok.backend_tokenizer
        fast = tiktoken_equivalent(backend)
        probe = BPE_PROBE + " ".join(list(tok.get_added_vocab())[:64])
        if fast is not None and fast.encode(probe, allowed_special="all") == \
                backend.encode(probe, add_special_tokens=False).ids:
            self._fast = fast
        self.vocab_size = len(tok)
        eod = tok.eos_token_id
        if eod_token is not None:
            eod = tok.convert_tokens_to_ids(eod_token)
        if eod is None:
            raise TokenizerError("the tokenizer defines no end-of-document token (eos_token)")
        self.eod = int(eod)
        self.pad = int(tok.pad_token_id) if tok.pad_token_id is not None else -1
        self.bos = tok.bos_token_id

    def tokenize(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, allowed_special="all")
        return self._tok.encode(text, add_special_tokens=False)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is not None:
            return [self._fast.encode(t, allowed_special="all") for t in texts]
        # The Rust backend directly: transformers' per-call Python overhead dominates short documents.
        return [e.ids for e in self._tok.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @functools.cached_property
    def _table_and_prefix(self) -> tuple[list, bool]:
        """Byte-level BPE (ByteLevel decoder: GPT-2's byte alphabet) or sentencepiece-style pieces
        ('\u2581' = space, <0xNN> byte fallback); added tokens are their content's bytes."""
        spec = json.loads(self._tok.backend_tokenizer.to_str())
        decoder = spec.get("decoder") or {}
        parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
        kinds = {d.get("type") for d in parts}
        byte_level = "ByteLevel" in kinds
        metaspace = "Metaspace" in kinds or any(d.get("type") == "Replace" and d.get("content") == " " for d in parts)
        if not (byte_level or metaspace):
            raise TokenizerError(f"token_bytes: the tokenizer's decoder {decoder.get('type')!r} is not supported "
                                 "(byte-level BPE or sentencepiece-style pieces only)")
        prefix = any((d.get("type") == "Strip" and d.get("content") == " " and d.get("start", 0) > 0) or
                     (d.get("type") == "Metaspace" and (d.get("prepend_scheme") in ("first", "always") or
                                                        d.get("add_prefix_space"))) for d in parts)
        byte_of = {ch: b for b, ch in _gpt2_byte_alphabet().items()}
        fallback = re.compile(r"<0x([0-9A-Fa-f]{2})>")
        vocab = self._tok.backend_tokenizer.get_vocab(with_added_tokens=True)
        table: list = [None] * (max(vocab.values(), default=-1) + 1)
        added = {t["id"] for t in spec.get("added_tokens") or []}
        for token, i in vocab.items():
            m = None if byte_level else fallback.fullmatch(token)
            if m:   # the ByteFallback decoder turns any <0xNN> token into its byte, added or not
                table[i] = bytes([int(m.group(1), 16)])
            elif i in added:
                table[i] = token.encode("utf-8")
            elif byte_level:
                try:
                    table[i] = bytes(byte_of[c] for c in token)
                except KeyError:
                    table[i] = None  # not a byte-alphabet string: cannot occur in encoded text
            else:
                table[i] = token.replace("\u2581", " ").encode("utf-8")
        return table, prefix

    def _byte_table(self) -> list:
        return self._table_and_prefix[0]

    def _dummy_prefix(self) -> bool:
        return self._table_and_prefix[1]


class HuggingFaceTokenizer(_HFBase):
    """A Hugging Face tokenizer folder or tokenizer.json; ids of `encode(text, add_special_tokens=False)`.

    Byte-level BPE tokenizers (GPT-2, Llama-3, Qwen style) encode on tiktoken when
    `tiktoken_equivalent` proves it gives the same ids (and a probe text agrees).
    """

    def __init__(self, path: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
        super().__init__(path=os.path.abspath(path))
        if os.path.isdir(path):
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:
            tok = PreTrainedTokenizerFast(tokenizer_file=path)
            if tok.eos_token is None:
                for candidate in ("<|endoftext|>", "</s>", "<eod>", "<|end_of_text|>"):
                    if tok.convert_tokens_to_ids(candidate) not in (None, tok.unk_token_id):
                        tok.eos_token = candidate
                        break
        self._init_from(tok, None)


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 style byte-level BPE from vocab.json + merges.txt.

    Ids are those of Hugging Face `tokenizers`' ByteLevelBPETokenizer on the same files (text
    "<|endoftext|>" is encoded as text, as Megatron-LM's GPT2BPETokenizer does). Encoding runs
    on tiktoken when the files allow it (every byte is a token and merges create ids in
    increasing order, true of GPT-2's files and of tools/train_tokenizer.py's): about 6x faster on
    prose, same ids (checked on a probe text at construction, and by the tests on real corpora).
    Needs `tokenizers` only (not transformers/torch: preprocessing workers stay small).
    """

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import ByteLevelBPETokenizer
        super().__init__(vocab=os.path.abspath(vocab_file), merges=os.path.abspath(merge_file))
        try:
            vocab = json.load(open(vocab_file, encoding="utf-8"))
            self._ref = ByteLevelBPETokenizer(vocab_file, merge_file)
        except Exception as e:  # noqa: BLE001 - json / tokenizers errors on malformed files
            raise TokenizerError(f"--vocab-file/--merge-file: {vocab_file}, {merge_file} are not GPT-2 BPE files "
                                 f"({e})") from None
        if "<|endoftext|>" not in vocab:
            raise TokenizerError(f"--vocab-file: {vocab_file} has no <|endoftext|> token")
        self.vocab_size = self._ref.get_vocab_size()
        self.eod = int(vocab["<|endoftext|>"])
        self._fast = tiktoken_equivalent(self._ref._tokenizer)
        if self._fast is not None and self._fast.encode_ordinary(BPE_PROBE) != self._ref.encode(BPE_PROBE).ids:
            self._fast = None

    def tokenize(self, text: str) -> list[int]:
        return self._fast.encode_ordinary(text) if self._fast is not None else self._ref.encode(text).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is None:
            return [e.ids for e in self._ref.encode_batch(list(texts))]
        return [self._fast.encode_ordinary(t) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._ref.decode([int(i) for i in ids], skip_special_tokens=False)

    @functools.cached_property
    def _table(self) -> list:
        byte_of = {ch: b for b, ch in _gpt2_byte_alphabet().items()}
        vocab = self._ref.get_vocab()
        table: list = [None] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            try:
                table[i] = bytes(byte_of[c] for c in token)
            except KeyError:
                table[i] = token.encode("utf-8")  # an added token outside the byte alphabet: its text
        return table

    def _byte_table(self) -> list:
        return self._table


def tiktoken_equivalent(backend) -> Optional[object]:
    """A tiktoken Encoding giving the same ids as a byte-level BPE `tokenizers.Tokenizer`, or None.

    Supported: no normalizer; pre-tokenizer ByteLevel(use_regex) (GPT-2's pattern) or
    Split(regex, isolated) + ByteLevel(no regex) (Llama-3/Qwen style); plain BPE (no dropout,
    byte fallback, unk or subword affixes); added tokens without lstrip/rstrip/single_word (they
    become tiktoken specials, matched in text as Hugging Face matches them: encode with
    allowed_special="all").
    Within a pre-tokenized piece tiktoken (1) returns a piece that is itself a rank as that one
    token, else (2) repeatedly merges the adjacent pair whose result has the lowest rank; BPE
    applies merges in merge-list order. They agree on every input when the ranks hold exactly the
    256 bytes plus the merge results, merge results' ids increase in list order ((2) = BPE), and
    BPE encodes each merge result as itself ((1) = BPE): all checked here, token by token (0.1 s
    for GPT-2's 50k merges). Callers also compare both on a probe text.
    """
    try:
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer pattern
    except ImportError:
        return None
    spec = json.loads(backend.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if spec.get("normalizer") is not None or model.get("type") != "BPE":
        return None
    if model.get("dropout") or model.get("byte_fallback") or model.get("unk_token") or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pattern = r50k_pat_str
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, level = pre["pretokenizers"]
        if split.get("type") != "Split" or "Regex" not in split.get("pattern", {}) or split.get("invert") or \
                split.get("behavior") != "Isolated" or level.get("type") != "ByteLevel" or level.get("use_regex") or \
                level.get("add_prefix_space"):
            return None
        pattern = split["pattern"]["Regex"]
    else:
        return None
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None
    vocab = model.get("vocab") or {}
    byte_of = {ch: b for b, ch in _gpt2_byte_alphabet().items()}
    ranks: dict[bytes, int] = {}
    for b, ch in _gpt2_byte_alphabet().items():
        if ch not in vocab:
            return None
        ranks[bytes([b])] = vocab[ch]
    last = max(ranks.values())
    bpe = backend.model
    for merge in model.get("merges") or []:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        merged = "".join(parts)
        if len(parts) != 2 or merged not in vocab or vocab[merged] <= last:
            return None
        try:
            ranks[bytes(byte_of[c] for c in merged)] = last = vocab[merged]
        except KeyError:
            return None
        if [t.id for t in bpe.tokenize(merged)] != [last]:
            return None
    specials = {t["content"]: t["id"] for t in added}
    if any(t.encode("utf-8") in ranks for t in specials):
        return None
    return tiktoken.Encoding("byte_level_bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


@functools.lru_cache(maxsize=1)
def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in vocab.json/merges.txt."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
