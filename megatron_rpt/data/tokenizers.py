"""Tokenizers by Megatron-LM `--tokenizer-type` name, and tokenizer training (sentencepiece, byte-level BPE).

Every tokenizer exposes what Megatron-Core's GPT datasets and our tools need: `vocab_size` (the
tokenizer's own size; the model pads it), `eod`, `pad` (-1 when the tokenizer has none, which is
Megatron's "no pad" id), `bos`, `tokenize`, `tokenize_batch` (the same ids, through the
library's batch call: what preprocessing uses), `detokenize`, `token_bytes` (the exact bytes each
token contributes to the text: RPT's byte-exact targets) and `unique_identifiers` (keys the
dataset index cache). Files are local only: nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import random
import re
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "TikTokenizer",
                   "NullTokenizer")
# Special pieces of tokenizers trained by tools/train_tokenizer.py (ids 0..3, in this order).
SPM_SPECIALS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eod": "<eod>"}


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


def _require_file(path: Optional[str], flag: str, kind: str) -> str:
    if path is None:
        raise TokenizerError(f"{kind} needs {flag}")
    if not os.path.exists(path):
        raise TokenizerError(f"{flag}: {path} not found")
    return path


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str):
        import sentencepiece as spm
        super().__init__(model=os.path.abspath(model_file))
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"--tokenizer-model: {model_file} is not a sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        eod = self._sp.piece_to_id(SPM_SPECIALS["eod"])
        if eod == self._sp.unk_id() or eod < 0:
            eod = self._sp.eos_id()
        if eod < 0:
            raise TokenizerError(f"--tokenizer-model: {model_file} has neither an {SPM_SPECIALS['eod']} piece "
                                 "nor an eos id; train it with tools/train_tokenizer.py")
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


def _megatron_tiktoken_conventions() -> tuple[dict[str, str], tuple[str, ...]]:
    """Megatron-Core's TikTokenizer split patterns (v1, v2) and fixed special tokens.

    Imported, not copied, so that our ids follow Megatron-Core's definition.
    """
    from megatron.core.tokenizers.text.libraries import tiktoken_tokenizer as mt
    return {"v1": mt._PATTERN_TIKTOKEN_V1, "v2": mt._PATTERN_TIKTOKEN_V2}, tuple(mt.SPECIAL_TOKENS)


def load_bpe_ranks(path: str) -> dict[bytes, int]:
    """BPE ranks from Megatron-LM's tiktoken JSON (a list of {rank, token_bytes, token_str}) or a
    `.tiktoken` file (one `base64 rank` per line, as cl100k_base or Qwen's ranks ship)."""
    import base64
    ranks: dict[bytes, int] = {}
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
        if not isinstance(vocab, list):
            raise TokenizerError(f"--tokenizer-model: {path} is not a tiktoken JSON vocabulary (a list)")
        for i, item in enumerate(vocab):
            if not isinstance(item, dict) or item.get("rank") != i or "token_bytes" not in item:
                raise TokenizerError(f"--tokenizer-model: {path}: entry {i} is not {{rank: {i}, token_bytes: ...}}")
            ranks[base64.b64decode(item["token_bytes"])] = i
    else:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise TokenizerError(f"--tokenizer-model: {path}:{lineno}: not a 'base64 rank' line") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"--tokenizer-model: {path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


class TikTokenizer(Tokenizer):
    """Megatron-LM's TikTokenizer: specials at ids 0..num_special_tokens-1 ("</s>" = 2 is eod), then
    the BPE ranks shifted by num_special_tokens.

    Ids equal Megatron-Core's `TikTokenTokenizer` for the same file, pattern, special-token count
    and vocabulary size, including Megatron's choice that special-token text in a document ("</s>")
    becomes the special id (as Hugging Face tokenizers do with their added tokens).
    `vocab_size` defaults to all the file's ranks plus the specials.
    """

    def __init__(self, path: str, *, pattern: str = "v2", num_special_tokens: int = 1000,
                 special_tokens: Optional[Sequence[str]] = None, vocab_size: Optional[int] = None):
        import tiktoken
        patterns, required = _megatron_tiktoken_conventions()
        if pattern not in patterns:
            raise TokenizerError(f"--tiktoken-pattern must be one of {', '.join(patterns)}, got {pattern!r}")
        specials = list(special_tokens) if special_tokens else list(required)
        if any(t not in specials for t in required) or len(set(specials)) != len(specials):
            raise TokenizerError("--tiktoken-special-tokens must be unique and include " + " ".join(required))
        if not len(specials) <= num_special_tokens:
            raise TokenizerError(f"--tiktoken-num-special-tokens {num_special_tokens} < {len(specials)} special tokens")
        ranks = load_bpe_ranks(path)
        if vocab_size is None:
            vocab_size = num_special_tokens + len(ranks)
        inner = vocab_size - num_special_tokens
        if not 256 <= inner <= len(ranks):
            raise TokenizerError(f"--vocab-size {vocab_size}: must leave 256..{len(ranks)} BPE ranks of {path} after "
                                 f"{num_special_tokens} special tokens")
        super().__init__(path=os.path.abspath(path), pattern=pattern, num_special_tokens=num_special_tokens,
                         vocab_size=vocab_size)
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special_tokens)]
        self._enc = tiktoken.Encoding(
            name=Path(path).stem, pat_str=patterns[pattern],
            mergeable_ranks={b: r + num_special_tokens for b, r in ranks.items() if r < inner},
            special_tokens={t: i for i, t in enumerate(specials)})
        self._specials = specials
        self.vocab_size = vocab_size
        self.eod = specials.index("</s>")
        self.pad = specials.index("<pad>")
        self.bos = specials.index("<s>")

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    @functools.cached_property
    def _table(self) -> list:
        # Special tokens (ids below num_special_tokens) decode to their text, as detokenize does.
        return [self._enc.decode_single_token_bytes(i) for i in range(self.vocab_size)]

    def _byte_table(self) -> list:
        return self._table


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


def build_tokenizer(tokenizer_type: str, *, tokenizer_model: Optional[str] = None, vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None, vocab_size: Optional[int] = None, tiktoken_pattern: str = "v2",
                    tiktoken_num_special_tokens: int = 1000,
                    tiktoken_special_tokens: Optional[Sequence[str]] = None) -> Tokenizer:
    """The tokenizer for Megatron-LM's --tokenizer-type and file flags."""
    if tokenizer_type == "TikTokenizer":
        return TikTokenizer(_require_file(tokenizer_model, "--tokenizer-model", tokenizer_type),
                            pattern=tiktoken_pattern, num_special_tokens=tiktoken_num_special_tokens,
                            special_tokens=tiktoken_special_tokens, vocab_size=vocab_size)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(_require_file(tokenizer_model, "--tokenizer-model", tokenizer_type))
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(_require_file(tokenizer_model, "--tokenizer-model", tokenizer_type))
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(_require_file(vocab_file, "--vocab-file", tokenizer_type),
                                _require_file(merge_file, "--merge-file", tokenizer_type))
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or int(vocab_size) < 1:
            raise TokenizerError("NullTokenizer needs --vocab-size >= 1")
        return NullTokenizer(int(vocab_size))
    raise TokenizerError(f"--tokenizer-type: unknown {tokenizer_type!r}; known: {', '.join(TOKENIZER_TYPES)}")


def add_tokenizer_arguments(group) -> None:
    """The tokenizer flags of the data tools (Megatron-LM's names), on an argparse group."""
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", help="sentencepiece .model, HF tokenizer folder/json, or tiktoken ranks")
    group.add_argument("--vocab-file")
    group.add_argument("--merge-file")
    group.add_argument("--vocab-size", type=int, help="NullTokenizer size; TikTokenizer size (default: all ranks)")
    group.add_argument("--tiktoken-pattern", default="v2", choices=["v1", "v2"])
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
    group.add_argument("--tiktoken-special-tokens", nargs="+")


def tokenizer_kwargs_from_args(args) -> dict:
    """`build_tokenizer` keyword arguments (all but the type) from `add_tokenizer_arguments`' flags."""
    kwargs = dict(tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file, merge_file=args.merge_file,
                  vocab_size=args.vocab_size)
    if args.tokenizer_type == "TikTokenizer":
        kwargs.update(tiktoken_pattern=args.tiktoken_pattern, tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
                      tiktoken_special_tokens=args.tiktoken_special_tokens)
    return kwargs


def tokenizer_from_config(cfg) -> Tokenizer:
    """The tokenizer of a run configuration's --tokenizer-* flags (NullTokenizer when none is given).

    `cfg` is a `config.schema.RunConfig` (not imported here: the config package imports this module).
    """
    d = cfg.data
    kind = d.tokenizer_type or "NullTokenizer"
    tiktoken = dict(tiktoken_pattern=d.tiktoken_pattern, tiktoken_num_special_tokens=d.tiktoken_num_special_tokens,
                    tiktoken_special_tokens=d.tiktoken_special_tokens or None) if kind == "TikTokenizer" else {}
    return build_tokenizer(kind, tokenizer_model=d.tokenizer_model, vocab_file=d.vocab_file,
                           merge_file=d.merge_file, vocab_size=cfg.model.vocab_size, **tiktoken)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-empty lines; lines over max_chars are cut at sentence ends (else hard) into pieces.

    sentencepiece silently drops "sentences" longer than max_sentence_length, so long paragraphs
    would otherwise be lost from training.
    """
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            if len(line) <= max_chars:
                yield line
                continue
            piece = ""
            for sent in _SENTENCE_END.split(line):
                while len(sent) > max_chars:
                    if piece:
                        yield piece
                        piece = ""
                    yield sent[:max_chars]
                    sent = sent[max_chars:]
                if piece and len(piece) + 1 + len(sent) > max_chars:
                    yield piece
                    piece = ""
                piece = f"{piece} {sent}" if piece else sent
            if piece.strip():
                yield piece


def sample_lines(lines: Iterable[str], max_lines: int, seed: int = 0) -> list[str]:
    """A uniform sample of at most max_lines (reservoir sampling), in input order; deterministic.

    Memory is bounded by max_lines whatever the input size, and the sample covers the whole input
    (taking the first N would train only on the first source of a concatenated corpus).
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        if i < max_lines:
            reservoir.append((i, line))
        else:
            j = rng.randrange(i + 1)
            if j < max_lines:
                reservoir[j] = (i, line)
    return [line for _, line in sorted(reservoir)]


def iter_texts(files: Sequence[str], json_keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Texts of jsonl files (.jsonl/.json[.gz]: the json_keys of each line) or plain text files.

    Raises ValueError naming `file:line` for a malformed jsonl line.
    """
    for path in files:
        is_json = path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if not is_json:
                yield from f
                continue
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                for key in json_keys:
                    if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                        raise ValueError(f"{path}:{lineno}: missing or non-string key {key!r}")
                    yield obj[key]


def train_sentencepiece(texts: Iterable[str], output_prefix: str, *, vocab_size: int, model_type: str = "bpe",
                        max_sentences: int = 10_000, max_sentence_chars: int = 2_000, seed: int = 0,
                        num_threads: int = 2) -> Path:
    """Train a sentencepiece model with <pad>=0 <unk>=1 <s>=2 <eod>=3, byte fallback, no normalisation.

    Byte fallback + identity normalisation make detokenize(tokenize(text)) == text for any text.
    Training uses a deterministic uniform sample of at most `max_sentences` lines (each at most
    `max_sentence_chars`): on the 5 MB demo corpus (~13k paragraphs) with vocab 8000 that is about
    1 s for BPE and 7 s for unigram. Writes `{output_prefix}.model` / `.vocab` (via temporary
    names); returns the .model path.
    """
    import sentencepiece as spm
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"--model-type must be bpe or unigram, got {model_type!r}")
    lines = sample_lines(_training_lines(texts, max_sentence_chars), max_sentences, seed)
    if not lines:
        raise TokenizerError("--input: no non-empty text to train the tokenizer on")
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = str(prefix) + ".tmp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=tmp_prefix, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=SPM_SPECIALS["pad"], unk_piece=SPM_SPECIALS["unk"],
        bos_piece=SPM_SPECIALS["bos"], eos_piece=SPM_SPECIALS["eod"],
        # The sample above already bounds the input; sentencepiece must not drop or reorder any of it.
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=4 * max_sentence_chars + 16,
        num_threads=num_threads, minloglevel=2)
    # The model records its prefix; store the final one so that the file depends only on the
    # inputs and flags (byte-identical reruns), not on the temporary name.
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tmp_prefix + ".model").read_bytes())
    proto.trainer_spec.model_prefix = str(prefix)
    Path(tmp_prefix + ".model").write_bytes(proto.SerializeToString())
    for ext in (".model", ".vocab"):
        os.replace(tmp_prefix + ext, str(prefix) + ext)
    return Path(str(prefix) + ".model")


# Special tokens of byte-level BPE tokenizers trained here: GPT-2's end-of-text doubles as eod
# (what GPT2BPETokenizer looks up), plus a dedicated pad so padding never collides with eod.
BPE_SPECIALS = {"eod": "<|endoftext|>", "pad": "<|pad|>"}


def train_byte_level_bpe(texts: Iterable[str], output_dir: str, *, vocab_size: int, max_sentences: int = 10_000,
                         max_sentence_chars: int = 2_000, seed: int = 0) -> Path:
    """Train a GPT-2 style byte-level BPE with Hugging Face `tokenizers`; returns the folder.

    The folder holds vocab.json + merges.txt (usable with --tokenizer-type GPT2BPETokenizer) and
    tokenizer.json + tokenizer_config.json (--tokenizer-type HuggingFaceTokenizer, the folder).
    Same deterministic line sample as `train_sentencepiece`; written to a temporary folder that
    replaces `output_dir` only when complete.
    """
    import shutil
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    lines = sample_lines(_training_lines(texts, max_sentence_chars), max_sentences, seed)
    if not lines:
        raise TokenizerError("--input: no non-empty text to train the tokenizer on")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"--output-prefix: {out} exists and is not a folder")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                special_tokens=[BPE_SPECIALS["eod"], BPE_SPECIALS["pad"]])
        bpe.save_model(str(tmp))
        PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=BPE_SPECIALS["eod"],
                                bos_token=BPE_SPECIALS["eod"], pad_token=BPE_SPECIALS["pad"]
                                ).save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
