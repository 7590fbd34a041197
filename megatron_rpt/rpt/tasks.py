"""RPT next-token-reasoning tasks: entropy-filtered corpus positions, their files, and the reader.

A task is a corpus position t of a document tokenized by the POLICY's tokenizer: the context is
the text of tokens[:t], the target the next `--target-tokens` tokens (their exact bytes, for the
prefix-match reward of `rpt.reward`). Positions are kept where a small PROXY model is unsure:
entropy (nats) of its renormalised top-16 next-token probabilities at t given tokens[:t] above
`--entropy-threshold` (arXiv 2506.08007; methods.md part B). Difficulty splits are the paper's
nested sets entropy > 0.5 / 1.0 / 1.5 = easy / medium / hard.

Files (`build_tasks`, run by tools/build_rpt_data.py): `PREFIX_train.jsonl` and
`PREFIX_heldout.jsonl` (held-out split by DOCUMENT, chosen by --seed), one record per line
(see `Task`), plus `PREFIX.meta.json`. They are written under temporary names with a progress
file committed after every chunk of documents; an interrupted run resumes from it and the
finished files are byte-identical to an uninterrupted run's. Chunks and batches are a function of
the inputs and flags only (never of where a run stopped), so every window is computed in the same
batch, at the same row, in both runs. Across different --batch-size values the fp32 entropies
agree to ~1e-6 nats (measured 1.7e-6), not bit for bit: CPU GEMM kernels (MKL) block the summation
differently for different row counts, so the same row can round differently in a larger batch
(with --proxy-dtype fp64 the Megatron proxy agrees to 1e-10; see the tests). --batch-size is
therefore part of the recorded settings, and a resumed run must use the same.

Scoring (`score_windows`): long documents are cut into windows of `--proxy-seq-length` tokens
that overlap by `--min-context-tokens`, and each window scores only the positions that have at
least that much context inside it (a position at a window start would otherwise look
artificially uncertain). Windows are right-padded to a per-window length bucket (causal attention:
the padding never influences the positions scored) and batched by bucket; only the hidden states
of scored positions go through the output layer, so full [batch, seq, vocab] logits never exist.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from megatron_rpt.data.jsonl import expand_inputs, iter_lines, iter_records, parse_line
from megatron_rpt.fileio import write_json

SPLITS: tuple[tuple[str, float], ...] = (("easy", 0.5), ("medium", 1.0), ("hard", 1.5))
TOP_K = 16
FORMAT = "mrpt-rpt-tasks/1"
BUCKET = 64            # windows are padded to a multiple of this (per window, not per batch)
PROXY_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}   # --proxy-dtype
KILL_ENV = "MRPT_RPT_DATA_KILL_AT_CHUNK"   # test hook: SIGKILL after writing chunk N's records, before committing
_RECORD_KEYS = ("id", "doc_id", "position", "context", "context_tokens", "target_tokens", "target_bytes", "entropy",
                "splits")


class TaskError(ValueError):
    """Bad input, configuration or task file; the message names the file:line or flag."""


# ----------------------------------------------------------------------------- records and reader

@dataclass(frozen=True)
class Task:
    """One next-token-reasoning task (one line of PREFIX_{train,heldout}.jsonl)."""

    id: str                      # "<doc_id>:<position>"
    doc_id: str
    position: int                # index of the first target token in the document's tokens
    context: str                 # UTF-8 decode of the bytes of tokens[:position]
    context_tokens: list[int]    # tokens[:position]
    target_tokens: list[int]     # tokens[position:position + target_tokens]
    target_bytes: list[str]      # hex of each target token's bytes
    entropy: float               # proxy's top-16 renormalised entropy at position (nats)
    splits: list[str]            # difficulty splits it belongs to ("easy" ⊇ "medium" ⊇ "hard")

    @property
    def target_token_bytes(self) -> list[bytes]:
        """The target tokens' bytes, what `rpt.reward.prefix_match_reward` takes."""
        return [bytes.fromhex(h) for h in self.target_bytes]

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in _RECORD_KEYS}, ensure_ascii=False)


def splits_for(entropy: float) -> list[str]:
    """The paper's nested difficulty splits an entropy belongs to."""
    return [name for name, threshold in SPLITS if entropy > threshold]


def _is_int_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)


def _check_record(obj) -> Task:
    """A Task from one decoded record; ValueError with what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in _RECORD_KEYS if k not in obj]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    extra = sorted(set(obj) - set(_RECORD_KEYS))
    if extra:
        raise ValueError(f"unknown key(s) {', '.join(extra)}")
    if not isinstance(obj["doc_id"], str) or not obj["doc_id"]:
        raise ValueError("doc_id must be a non-empty string")
    pos = obj["position"]
    if not isinstance(pos, int) or isinstance(pos, bool) or pos < 1:
        raise ValueError("position must be an integer >= 1")
    if obj["id"] != f"{obj['doc_id']}:{pos}":
        raise ValueError(f"id {obj['id']!r} is not '<doc_id>:<position>' ({obj['doc_id']}:{pos})")
    if not isinstance(obj["context"], str):
        raise ValueError("context must be a string")
    if not _is_int_list(obj["context_tokens"]) or len(obj["context_tokens"]) != pos:
        raise ValueError("context_tokens must be a list of `position` non-negative integers")
    if not _is_int_list(obj["target_tokens"]) or not obj["target_tokens"]:
        raise ValueError("target_tokens must be a non-empty list of non-negative integers")
    hexes = obj["target_bytes"]
    if not isinstance(hexes, list) or len(hexes) != len(obj["target_tokens"]):
        raise ValueError("target_bytes must be a list with one hex string per target token")
    for h in hexes:
        if not isinstance(h, str):
            raise ValueError("target_bytes entries must be hex strings")
        try:
            bytes.fromhex(h)
        except ValueError:
            raise ValueError(f"target_bytes entry {h!r} is not hex") from None
    e = obj["entropy"]
    if not isinstance(e, (int, float)) or isinstance(e, bool) or not math.isfinite(e) or e < 0:
        raise ValueError("entropy must be a finite non-negative number")
    if obj["splits"] != splits_for(float(e)):
        raise ValueError(f"splits {obj['splits']!r} disagree with entropy {e} (expected {splits_for(float(e))!r})")
    return Task(obj["id"], obj["doc_id"], pos, obj["context"], list(obj["context_tokens"]), list(obj["target_tokens"]),
                list(hexes), float(e), list(obj["splits"]))


def load_tasks(path: str | os.PathLike) -> list[Task]:
    """Every task of a PREFIX_{train,heldout}.jsonl file, each record validated; a malformed one is
    one TaskError naming file:line (blank lines are skipped; lines as `data.jsonl` reads them)."""
    tasks = []
    for lineno, raw in iter_lines(os.fspath(path)):
        try:
            obj = parse_line(raw)
        except ValueError as e:
            raise TaskError(f"{path}:{lineno}: {e}") from None
        try:
            tasks.append(_check_record(obj))
        except ValueError as e:
            raise TaskError(f"{path}:{lineno}: malformed task record: {e}") from None
    return tasks


# ----------------------------------------------------------------------------- documents

@dataclass
class Document:
    index: int      # 0-based over all inputs, in order
    doc_id: str
    source: str     # "file:line"
    text: str


def _labels(files: Sequence[str]) -> list[str]:
    names = [os.path.basename(f) for f in files]
    return names if len(set(names)) == len(names) else list(files)


def iter_documents(files: Sequence[str], key: str = "text", doc_id_key: Optional[str] = None) -> Iterator[Document]:
    """The documents of jsonl files (read by `data.jsonl.iter_records`: a bad line is one error
    naming file:line). doc_id: `doc_id_key`'s value (unique), else "<file name>:<line>"."""
    seen: set[str] = set()
    labels = dict(zip(files, _labels(files)))
    for index, record in enumerate(iter_records(files, [key])):
        if doc_id_key is not None:
            value = record.obj.get(doc_id_key)
            if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
                raise TaskError(f"{record.where}: missing or empty --doc-id-key {doc_id_key!r}")
            doc_id = str(value)
            if doc_id in seen:
                raise TaskError(f"{record.where}: duplicate document id {doc_id!r} (--doc-id-key {doc_id_key})")
            seen.add(doc_id)
        else:
            doc_id = f"{labels[record.path]}:{record.line}"
        yield Document(index, doc_id, record.where, record.texts[0])


def document_tokens(tokenizer, doc: Document) -> tuple[list[int], list[bytes], bytes]:
    """(ids, per-token bytes, UTF-8 text) of a document; TaskError naming it when the tokens'
    bytes are not exactly the text's (byte-exact targets need it)."""
    try:
        text = doc.text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TaskError(f"{doc.source}: the text is not encodable as UTF-8 ({e.reason} at character "
                        f"{e.start})") from None
    ids = tokenizer.tokenize(doc.text)
    pieces = tokenizer.token_bytes(ids, at_start=True)
    joined = b"".join(pieces)
    if joined != text:
        k = next((i for i, (a, b) in enumerate(zip(joined, text)) if a != b), min(len(joined), len(text)))
        raise TaskError(f"{doc.source}: the {type(tokenizer).__name__}'s tokens do not reproduce the document's "
                        f"bytes (first difference at byte {k}: tokens give {joined[k:k + 12]!r}, text has "
                        f"{text[k:k + 12]!r}); RPT targets must be byte-exact: use a byte-level tokenizer without "
                        "normalisation")
    return ids, pieces, text


# ----------------------------------------------------------------------------- windows and scoring

@dataclass
class Window:
    doc: int                 # position of its document in the chunk
    start: int               # tokens[start:end] are its input
    tokens: list[int]
    targets: list[int]       # document positions t it scores (logit index t - start - 1)


def plan_windows(n_tokens: int, seq_length: int, min_context: int) -> list[tuple[int, int]]:
    """(start, end) input ranges covering target positions min_context..n_tokens-1, each position
    scored in exactly one window with at least `min_context` tokens of context inside it: window k
    scores (end_{k-1}, end_k] and starts min_context tokens before its first target."""
    c = max(1, min_context)
    if seq_length <= c:
        raise TaskError(f"--proxy-seq-length {seq_length} must exceed --min-context-tokens {min_context}")
    last = n_tokens - 1
    if last < c:
        return []
    out, start, end = [], 0, min(seq_length, last)
    out.append((start, end))
    while end < last:
        start = end + 1 - c
        end = min(start + seq_length, last)
        out.append((start, end))
    return out


def top_k_entropy(logits: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Entropy (nats, float64) of the renormalised top-k probabilities of each row of logits
    (softmax over the k largest logits = the top-k probabilities renormalised)."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).values.double()
    logp = torch.log_softmax(top, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def score_windows(proxy, windows: Sequence[Window], batch_size: int, pad_id: int = 0) -> list[list[float]]:
    """Entropy at each window's targets (same order). Windows are grouped by padded length so that a
    window's numbers do not depend on which other windows share its batch."""
    buckets: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        length = min(-(-len(w.tokens) // BUCKET) * BUCKET, proxy.max_length)
        buckets.setdefault(max(length, len(w.tokens)), []).append(i)
    out: list[list[float]] = [[] for _ in windows]
    # output-layer chunk: ~128 MB of logits
    rows_per_head = max(1, 2**27 // (max(proxy.vocab_size, 1) * PROXY_DTYPES[proxy.dtype].itemsize))
    for length in sorted(buckets):
        members = buckets[length]
        for b in range(0, len(members), batch_size):
            batch = [windows[i] for i in members[b:b + batch_size]]
            x = torch.full((len(batch), length), pad_id, dtype=torch.long)
            rows, cols = [], []
            for r, w in enumerate(batch):
                x[r, :len(w.tokens)] = torch.tensor(w.tokens, dtype=torch.long)
                rows += [r] * len(w.targets)
                cols += [t - w.start - 1 for t in w.targets]
            hidden = proxy.hidden(x.to(proxy.device))
            picked = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
            ent = torch.cat([top_k_entropy(proxy.logits(picked[i:i + rows_per_head]))
                             for i in range(0, picked.shape[0], rows_per_head)]).cpu().tolist() if rows else []
            k = 0
            for w, i in zip(batch, members[b:b + batch_size]):
                out[i] = ent[k:k + len(w.targets)]
                k += len(w.targets)
    return out


# ----------------------------------------------------------------------------- proxies

class HFProxy:
    """A Hugging Face causal LM folder (safetensors), eval mode, in `dtype` (fp32 by default).

    fp64 does not make transformers' Llama/Qwen3 fully float64: they compute RMSNorm and the RoPE
    table in fp32 whatever the model's dtype, so their fp64 logits carry fp32 rounding from those
    steps (~1e-6 relative, measured)."""

    kind = "hf"

    def __init__(self, folder: str, device: str = "cpu", dtype: str = "fp32"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModelForCausalLM
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise TaskError(f"--proxy-hf-dir {folder}: no config.json (not a Hugging Face model folder)")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=PROXY_DTYPES[dtype], local_files_only=True,
                                                         use_safetensors=True)
        except (OSError, ValueError) as e:
            raise TaskError(f"--proxy-hf-dir {folder}: cannot load the model ({e})") from None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.path, self.dtype = os.path.abspath(folder), dtype
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vocab_size = int(text.vocab_size)
        self.max_length = int(getattr(text, "max_position_embeddings", 0) or 2**31)
        self.architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        self._base = model.base_model
        self._head = model.get_output_embeddings()
        self._check_head()

    def _check_head(self) -> None:
        # Scoring applies the output layer to picked hidden states only; that must be what the
        # model's own forward computes (no logit soft-capping / scaling in between).
        x = torch.arange(min(8, self.vocab_size), device=self.device)[None]
        with torch.no_grad():
            ref = self.model(input_ids=x, use_cache=False).logits[..., :self.vocab_size]
            ours = self.logits(self.hidden(x))
        if not torch.allclose(ref, ours, rtol=1e-4, atol=1e-4):
            raise TaskError(f"--proxy-hf-dir {self.path}: {self.architecture}'s logits are not its output layer "
                            "applied to the last hidden state (e.g. logit soft-capping); not supported as a proxy")

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self._base(input_ids=x, use_cache=False).last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._head(h)[..., :self.vocab_size]

    def tokenizer(self):
        """The tokenizer shipped with the folder (None if it has none)."""
        from megatron_rpt.data.tokenizers import HuggingFaceTokenizer
        if not any(os.path.isfile(os.path.join(self.path, f)) for f in ("tokenizer.json", "tokenizer.model")):
            return None
        return HuggingFaceTokenizer(self.path)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "architecture": self.architecture, "vocab_size": self.vocab_size,
                "dtype": self.dtype}

    def close(self) -> None:
        pass


class _CaptureHidden(torch.nn.Module):
    """Stands in for GPTModel.output_layer: returns the final hidden states unchanged."""

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return hidden_states, None


class MegatronProxy:
    """A checkpoint written by this repo (recorded run config + torch_dist weights), single process,
    TP=PP=1 (the checkpoint reshards on load), in `dtype` (fp32 by default; fp64 is float64
    throughout except Megatron-Core's RoPE table, which it computes in fp32)."""

    kind = "megatron"

    def __init__(self, load: str, iteration: Optional[int] = None, dtype: str = "fp32"):
        from megatron_rpt.platform import quiet_optional_backend_warnings
        quiet_optional_backend_warnings()   # before megatron.core is imported: its warnings fire at import
        with warnings.catch_warnings():
            # torch DCP / ShardedTensor deprecation notices raised inside Megatron-Core's loader
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message="full scope is deprecated")  # Megatron-Core's own default
            self._build(load, iteration, dtype)

    def _build(self, load: str, iteration: Optional[int], dtype: str) -> None:
        from megatron_rpt.config.schema import RunConfig
        from megatron_rpt.convert.checkpoint import _ModelOnly, _single_process_model
        from megatron_rpt.data.tokenizers import tokenizer_from_config
        from megatron_rpt.models.gpt import model_vocab_size, padded_vocab_size
        from megatron_rpt.platform import quiet_optional_backend_warnings
        from megatron_rpt.training.checkpointing import CheckpointError, checkpoint_path, load_checkpoint, read_tracker
        quiet_optional_backend_warnings()
        it = iteration if iteration is not None else read_tracker(load)
        if it is None:
            raise TaskError(f"--proxy-load {load}: no checkpoint (no latest_checkpointed_iteration.txt); "
                            "pass --proxy-ckpt-step")
        meta = os.path.join(checkpoint_path(load, it), "run_config.json")
        if not os.path.isfile(meta):
            raise TaskError(f"--proxy-load {load}: {meta} missing (not a megatron-rpt checkpoint, or incomplete)")
        with open(meta) as f:
            cfg = RunConfig.from_dict(json.load(f)["run_config"])
        self.cfg = cfg
        self._tokenizer = tokenizer_from_config(cfg) if cfg.data.tokenizer_type else None
        self.vocab_size = model_vocab_size(self._tokenizer.vocab_size if self._tokenizer else 0, cfg)
        padded = padded_vocab_size(self.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
        model = _single_process_model(cfg, padded)[0].eval()
        try:
            load_checkpoint(load, _ModelOnly([model]), cfg, iteration=it)
        except CheckpointError as e:
            raise TaskError(f"--proxy-load {load}: {e}") from None
        model.to(PROXY_DTYPES[dtype])
        self.dtype = dtype
        self._weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                        else model.output_layer.weight)
        model.output_layer = _CaptureHidden()
        self.model, self.device, self.path, self.iteration = model, torch.device("cpu"), os.path.abspath(load), it
        self.max_length = int(cfg.model.max_position_embeddings or cfg.model.seq_length or 2**31)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
        return self.model(x, torch.arange(s)[None].expand(b, s), mask)   # [b, s, h] via _CaptureHidden

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(h, self._weight[:self.vocab_size])

    def tokenizer(self):
        return self._tokenizer

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "iteration": self.iteration, "vocab_size": self.vocab_size,
                "dtype": self.dtype}

    def close(self) -> None:
        from megatron_rpt.convert.checkpoint import _teardown
        _teardown()


def check_vocabulary(policy, proxy) -> None:
    """The proxy must predict over the policy tokenizer's ids: at least its vocabulary size, and when
    the proxy carries a tokenizer, the same bytes for every id."""
    if proxy.vocab_size < policy.vocab_size:
        raise TaskError(f"the proxy ({proxy.path}) predicts over {proxy.vocab_size} ids but the policy tokenizer "
                        f"({type(policy).__name__}) has {policy.vocab_size}: the proxy must share the policy's "
                        "vocabulary")
    theirs = proxy.tokenizer()
    if theirs is None:
        return
    if theirs.vocab_size != policy.vocab_size:
        raise TaskError(f"the proxy's tokenizer ({proxy.path}) has {theirs.vocab_size} tokens, the policy's "
                        f"{policy.vocab_size}: different vocabularies")
    try:
        a, b = policy._byte_table(), theirs._byte_table()
    except Exception:  # noqa: BLE001 - a tokenizer without token bytes (NullTokenizer): sizes were compared
        return
    for i in range(policy.vocab_size):
        if a[i] != b[i]:
            raise TaskError(f"the proxy's tokenizer ({proxy.path}) differs from the policy tokenizer at id {i} "
                            f"({b[i]!r} vs {a[i]!r}): the proxy must share the policy's vocabulary")


# ----------------------------------------------------------------------------- building

@dataclass
class BuildConfig:
    inputs: list[str]
    output_prefix: str
    json_key: str = "text"
    doc_id_key: Optional[str] = None
    entropy_threshold: float = 0.5
    min_context_tokens: int = 32
    target_tokens: int = 16
    proxy_seq_length: int = 2048
    batch_size: int = 8
    heldout_docs: float = 0          # a count (>= 1) or a fraction of the documents (< 1)
    max_tasks_per_doc: Optional[int] = None
    seed: int = 1234
    progress: bool = True
    chunk_windows: int = 64          # windows per committed chunk (at least 4 batches)

    def validate(self) -> None:
        if self.min_context_tokens < 1:
            raise TaskError("--min-context-tokens must be >= 1")
        if self.target_tokens < 1:
            raise TaskError("--target-tokens must be >= 1")
        if self.batch_size < 1:
            raise TaskError("--batch-size must be >= 1")
        if self.proxy_seq_length <= self.min_context_tokens:
            raise TaskError(f"--proxy-seq-length {self.proxy_seq_length} must exceed --min-context-tokens "
                            f"{self.min_context_tokens}")
        if self.max_tasks_per_doc is not None and self.max_tasks_per_doc < 1:
            raise TaskError("--max-tasks-per-doc must be >= 1")
        if self.heldout_docs < 0 or (self.heldout_docs >= 1 and self.heldout_docs != int(self.heldout_docs)):
            raise TaskError(f"--heldout-docs {self.heldout_docs}: a document count (integer) or a fraction in [0, 1)")
        if not math.isfinite(self.entropy_threshold):
            raise TaskError("--entropy-threshold must be finite")


def heldout_indices(n_docs: int, heldout: float, seed: int) -> set[int]:
    """Document indices of the held-out split: a count (>= 1) or fraction (< 1) of n_docs, seeded."""
    k = int(heldout) if heldout >= 1 else round(heldout * n_docs)
    if k > n_docs:
        raise TaskError(f"--heldout-docs {int(heldout)} exceeds the {n_docs} documents of --input")
    return set(random.Random(seed).sample(range(n_docs), k))


def _doc_tasks(doc: Document, ids: list[int], pieces: list[bytes], text: bytes, targets: list[int],
               entropies: list[float], cfg: BuildConfig) -> list[Task]:
    kept = [(t, e) for t, e in zip(targets, entropies) if e > cfg.entropy_threshold]
    if cfg.max_tasks_per_doc is not None and len(kept) > cfg.max_tasks_per_doc:
        # Seeded by (seed, doc_id): the same choice whatever the chunking, batch size or resume point.
        kept = sorted(random.Random(f"{cfg.seed}:{doc.doc_id}").sample(kept, cfg.max_tasks_per_doc))
    offsets = [0]
    for p in pieces:
        offsets.append(offsets[-1] + len(p))
    tasks = []
    for t, e in kept:
        target = ids[t:t + cfg.target_tokens]
        tasks.append(Task(f"{doc.doc_id}:{t}", doc.doc_id, t, text[:offsets[t]].decode("utf-8"), ids[:t], target,
                          [p.hex() for p in pieces[t:t + cfg.target_tokens]], e, splits_for(e)))
    return tasks


def _candidates(pieces: list[bytes], text: bytes, min_context: int) -> list[int]:
    """Target positions t >= min_context whose context bytes (tokens[:t]) end on a UTF-8 character
    boundary (so the context is valid text) and that have a target token."""
    out, offset = [], 0
    for t, p in enumerate(pieces):
        if t >= min_context and (offset == len(text) or text[offset] & 0xC0 != 0x80):
            out.append(t)
        offset += len(p)
    return out


def _file_info(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size}


def _settings(cfg: BuildConfig, tokenizer, proxy, files: list[str]) -> dict:
    """Everything the output depends on (what a resumed run must share with the interrupted one)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "inputs", "output_prefix")}
    inputs = [{**_file_info(f), "mtime_ns": os.stat(f).st_mtime_ns} for f in files]
    return json.loads(json.dumps({"settings": settings, "tokenizer": dict(tokenizer.unique_identifiers),
                                  "proxy": proxy.describe(), "inputs": inputs}, default=str))


def _empty_counts() -> dict:
    return {split: {"documents": 0, "tasks": 0, **{name: 0 for name, _ in SPLITS}} for split in ("train", "heldout")}


def scan_documents(cfg: BuildConfig, tokenizer) -> int:
    """Read and tokenize every document once before anything is scored or written: a malformed line
    or a document the tokenizer cannot reproduce byte for byte fails here (file:line), never after
    hours of scoring. Returns the number of documents. (Tokenizing costs little next to the proxy.)"""
    n = 0
    for doc in iter_documents(expand_inputs(cfg.inputs), cfg.json_key, cfg.doc_id_key):
        document_tokens(tokenizer, doc)
        n += 1
    return n


def build_tasks(cfg: BuildConfig, tokenizer, proxy, n_docs: Optional[int] = None) -> dict:
    """Score the corpus with `proxy` and write PREFIX_{train,heldout}.jsonl + PREFIX.meta.json
    (see the module docstring); returns the meta dict plus run statistics under "run".
    `n_docs`: the result of `scan_documents` when the caller already ran it."""
    from tqdm import tqdm
    cfg.validate()
    check_vocabulary(tokenizer, proxy)
    files = expand_inputs(cfg.inputs)
    seq_length = min(cfg.proxy_seq_length, proxy.max_length)
    if seq_length <= cfg.min_context_tokens:
        raise TaskError(f"the proxy takes at most {proxy.max_length} positions, not more than --min-context-tokens "
                        f"{cfg.min_context_tokens}")
    if n_docs is None:
        n_docs = scan_documents(cfg, tokenizer)
    heldout = heldout_indices(n_docs, cfg.heldout_docs, cfg.seed)
    prefix = cfg.output_prefix
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    finals = {"train": f"{prefix}_train.jsonl", "heldout": f"{prefix}_heldout.jsonl"}
    tmps = {k: v + ".tmp" for k, v in finals.items()}
    progress_path = f"{prefix}.progress.json"
    settings = _settings(cfg, tokenizer, proxy, files)
    state = {"settings": settings, "docs_done": 0, "bytes": {"train": 0, "heldout": 0},
             "counts": _empty_counts(), "positions_scored": 0}
    if os.path.isfile(progress_path):
        try:
            with open(progress_path) as f:
                saved = json.load(f)
            saved_settings = saved["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise TaskError(f"{progress_path} is unreadable; delete it to start over") from None
        if saved_settings != settings:
            old = saved_settings.get("settings", {})
            diff = [k for k in settings["settings"] if old.get(k) != settings["settings"][k]]
            diff += [k for k in ("tokenizer", "proxy", "inputs") if saved_settings.get(k) != settings[k]]
            raise TaskError(f"{progress_path}: an unfinished run with other settings ({', '.join(diff)} differ) is in "
                            "progress here; rerun it with its flags to resume, or delete that file to start over")
        if all(os.path.isfile(tmps[k]) and os.path.getsize(tmps[k]) >= saved["bytes"][k] for k in tmps):
            state = saved
            print(f"resuming {prefix}: {state['docs_done']} of {n_docs} documents already done", flush=True)
        else:
            print(f"note: the partial outputs of {progress_path} are gone; starting over", flush=True)
    handles = {}
    for k in tmps:
        mode = "r+b" if state["docs_done"] and os.path.isfile(tmps[k]) else "wb"
        handles[k] = open(tmps[k], mode)
        handles[k].truncate(state["bytes"][k])   # drop records written after the last commit
        handles[k].seek(state["bytes"][k])
    counts = state["counts"]
    kill_at = int(os.environ.get(KILL_ENV, "-1"))
    t0 = time.perf_counter()
    new_tasks = new_positions = 0
    bar = tqdm(total=n_docs, initial=state["docs_done"], desc="rpt tasks", unit="doc", disable=not cfg.progress,
               dynamic_ncols=True)
    pad_id = tokenizer.eod if 0 <= getattr(tokenizer, "eod", -1) < proxy.vocab_size else 0
    chunk_no = 0

    def flush_chunk(chunk: list) -> None:
        nonlocal chunk_no, new_tasks, new_positions
        windows = [w for _, _, _, _, _, ws in chunk for w in ws]
        scores = score_windows(proxy, windows, cfg.batch_size, pad_id)
        k = 0
        for doc, ids, pieces, text, targets, ws in chunk:
            entropies = [e for s in scores[k:k + len(ws)] for e in s]
            k += len(ws)
            split = "heldout" if doc.index in heldout else "train"
            tasks = _doc_tasks(doc, ids, pieces, text, targets, entropies, cfg)
            counts[split]["documents"] += 1
            counts[split]["tasks"] += len(tasks)
            for task in tasks:
                handles[split].write((task.to_json() + "\n").encode("utf-8"))
                for name in task.splits:
                    counts[split][name] += 1
            new_tasks += len(tasks)
            new_positions += len(targets)
            state["positions_scored"] += len(targets)
        for h in handles.values():
            h.flush()
        if chunk_no == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        for h in handles.values():
            os.fsync(h.fileno())
        state["docs_done"] += len(chunk)
        state["bytes"] = {k: handles[k].tell() for k in handles}
        write_json(progress_path, state)
        chunk_no += 1
        bar.update(len(chunk))
        bar.set_postfix(tasks=new_tasks, refresh=False)

    try:
        chunk: list = []
        n_windows = 0
        limit = max(cfg.chunk_windows, 4 * cfg.batch_size)
        for doc in iter_documents(files, cfg.json_key, cfg.doc_id_key):
            if doc.index < state["docs_done"]:
                continue
            ids, pieces, text = document_tokens(tokenizer, doc)
            targets = _candidates(pieces, text, cfg.min_context_tokens)
            wanted = set(targets)
            windows = []
            for start, end in plan_windows(len(ids), seq_length, cfg.min_context_tokens):
                scored = [t for t in range(start + cfg.min_context_tokens, end + 1) if t in wanted]
                if scored:
                    windows.append(Window(len(chunk), start, ids[start:end], scored))
            chunk.append((doc, ids, pieces, text, targets, windows))
            n_windows += len(windows)
            if n_windows >= limit:
                flush_chunk(chunk)
                chunk, n_windows = [], 0
        if chunk:
            flush_chunk(chunk)
    finally:
        bar.close()
        for h in handles.values():
            h.close()
    seconds = time.perf_counter() - t0
    meta = {
        "format": FORMAT,
        "tokenizer": {"type": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
                      "identifiers": dict(tokenizer.unique_identifiers)},
        "proxy": {**proxy.describe(), "seq_length": seq_length},
        "entropy": {"units": "nats", "top_k": TOP_K, "renormalised": True, "threshold": cfg.entropy_threshold},
        "splits": {name: threshold for name, threshold in SPLITS},
        "min_context_tokens": cfg.min_context_tokens, "target_tokens": cfg.target_tokens,
        "max_tasks_per_doc": cfg.max_tasks_per_doc, "heldout_docs": cfg.heldout_docs, "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "json_key": cfg.json_key, "doc_id_key": cfg.doc_id_key,
        "inputs": [_file_info(f) for f in files],
        "files": {k: os.path.basename(v) for k, v in finals.items()},
        "counts": {**counts, "documents": n_docs, "positions_scored": state["positions_scored"]},
    }
    for k in tmps:
        os.replace(tmps[k], finals[k])
    write_json(f"{prefix}.meta.json", meta)
    os.remove(progress_path)
    return {**meta, "run": {"seconds": seconds, "new_tasks": new_tasks, "new_positions_scored": new_positions}}
