"""The resumable RPT task builder (tools/build_rpt_data.py): `BuildConfig`, `scan_documents` and
`build_tasks`, with its progress file and the test kill hook (`KILL_ENV`).

Files: `PREFIX_train.jsonl` and `PREFIX_heldout.jsonl` (held-out split by DOCUMENT, chosen by
--seed), one record per line (see `format.Task`), plus `PREFIX.meta.json`. They are written under
temporary names with a progress file committed after every chunk of documents; an interrupted run
resumes from it and the finished files are byte-identical to an uninterrupted run's. Chunks and
batches are a function of the inputs and flags only (never of where a run stopped), so every
window is computed in the same batch, at the same row, in both runs. Across different
--batch-size values the fp32 entropies agree to ~1e-6 nats (measured 1.7e-6), not bit for bit:
CPU GEMM kernels (MKL) block the summation differently for different row counts, so the same row
can round differently in a larger batch (with --proxy-dtype fp64 the Megatron proxy agrees to
1e-10; see the tests). --batch-size is therefore part of the recorded settings, and a resumed run
must use the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_rpt.data.jsonl import expand_inputs
from megatron_rpt.fileio import write_json
from megatron_rpt.rpt.tasks.format import FORMAT, SPLITS, TaskError
from megatron_rpt.rpt.tasks.proxy import TOP_K, check_vocabulary, score_windows
from megatron_rpt.rpt.tasks.windows import (Window, _candidates, _doc_tasks, document_tokens, heldout_indices,
                                            iter_documents, plan_windows)

KILL_ENV = "MRPT_RPT_DATA_KILL_AT_CHUNK"   # test hook: SIGKILL after writing chunk N's records, before committing


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
