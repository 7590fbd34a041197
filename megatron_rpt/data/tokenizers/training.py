"""Tokenizer training (tools/train_tokenizer.py): sentencepiece and byte-level BPE, their input
lines (`_training_lines`, `sample_lines`) and the special tokens they define. Their input texts
come from `data.jsonl.iter_texts`."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Iterable, Iterator

from megatron_rpt.data.tokenizers.base import TokenizerError

# Special pieces of tokenizers trained by tools/train_tokenizer.py (ids 0..3, in this order).
SPM_SPECIALS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eod": "<eod>"}


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
