"""jsonl -> Megatron indexed datasets: the library behind tools/preprocess_data.py.

Pipeline (why it is fast and bounded):
- The input (several files, globs, .gz) is read in byte chunks of about `chunk_bytes` that end on
  a line boundary. A chunk travels to a worker process as one bytes object and comes back as one
  numpy array of token ids plus lengths, so inter-process traffic is two buffers per chunk, not
  a pickled Python list per document (Megatron-LM's tool ships every line and every id list).
- Workers check each line with the shared reader's `data.jsonl.parse_line` and `texts_of` (orjson,
  falling back to the standard library for what orjson rejects but `json` accepts, so accepted
  input is the same as Megatron-LM's) and tokenize a whole chunk with the tokenizer library's
  batch call.
- At most `2 * workers + 1` chunks per partition are in flight: memory is bounded by that window
  whatever the input size. The index is spooled to disk by `IndexedWriter`, never held in lists
  (Megatron-Core's builder keeps every sequence length in a Python list). Workers import only the
  tokenizer library (Megatron-LM's import torch and transformers before forking).
- Results are written in input order, so the output is byte-identical for any --workers and
  --partitions. With `--partitions N` the inputs are cut into N contiguous ranges (whole .gz files;
  plain files also at line boundaries) that N threads read, decompress and write concurrently
  through the one worker pool; their outputs are concatenated at the end.

Bad lines (malformed JSON, not an object, missing key, non-string value, empty document, invalid
UTF-8: `data.jsonl`'s reasons, the same in every tool; or text the tokenizer rejects) stop the run
with `file:line: reason`, or are skipped and counted with `skip_bad_lines`. Inputs are expanded
and .gz files read as `data.jsonl` says (a corrupt .gz is one error naming it). Outputs are `{prefix}_{key}_{document|sentence}.bin/.idx`, written
under temporary names and published only when complete.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import os
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Iterator, Optional, Sequence

import numpy as np

from megatron_rpt.data.indexed import IndexedWriter, cast_tokens, token_dtype
from megatron_rpt.data.jsonl import BadInputError, expand_inputs, gzip_errors, parse_line, texts_of
from megatron_rpt.data.tokenizers import build_tokenizer


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bytes_read: int = 0
    skipped: int = 0
    skipped_examples: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)
    seconds: float = 0.0


MAX_EXAMPLES = 5


# --------------------------------------------------------------------------- input ranges

@dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of one input file, starting at a line start (end None: to EOF)."""

    path: str
    start: int = 0
    end: Optional[int] = None

    @property
    def size(self) -> int:
        return (os.path.getsize(self.path) if self.end is None else self.end) - self.start

    def first_line(self) -> int:
        """1-based line number of the first line (counts the newlines before it once: only on errors)."""
        return _first_line(self)


@functools.lru_cache(maxsize=None)
def _first_line(segment: Segment) -> int:
    count, left = 0, segment.start
    with open(segment.path, "rb") as f:
        while left:
            block = f.read(min(left, 16 << 20))
            count += block.count(b"\n")
            left -= len(block)
    return count + 1


def _next_line_start(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset - 1)
        f.readline()
        return f.tell()


def plan_partitions(files: Sequence[str], partitions: int) -> list[list[Segment]]:
    """Contiguous, size-balanced ranges of the inputs; .gz files are never cut."""
    if partitions < 1:
        raise ValueError(f"--partitions must be >= 1 (got {partitions})")
    sizes = [os.path.getsize(f) for f in files]
    target = max(1, -(-sum(sizes) // partitions))
    plan: list[list[Segment]] = [[]]
    filled = 0
    for path, size in zip(files, sizes):
        start = 0
        while start < size or (size == 0 and start == 0):
            if filled >= target and len(plan) < partitions:
                plan.append([])
                filled = 0
            cut = start + target - filled
            if cut >= size or path.endswith(".gz") or len(plan) == partitions:
                plan[-1].append(Segment(path, start, None))
                filled += size - start
                break
            cut = _next_line_start(path, cut)
            if cut >= size:
                plan[-1].append(Segment(path, start, None))
                filled += size - start
                break
            plan[-1].append(Segment(path, start, cut))
            filled, start = target, cut
    return [p for p in plan if p]


def _read_chunks(segment: Segment, chunk_bytes: int) -> Iterator[tuple[int, bytes, int]]:
    """(0-based line index within the segment, bytes of whole lines, input bytes consumed).

    Consumed bytes are compressed bytes for .gz (what the progress bar's total counts).
    """
    with gzip_errors(segment.path), open(segment.path, "rb") as raw:
        raw.seek(segment.start)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if segment.path.endswith(".gz") else raw
        line, position = 0, raw.tell()
        while True:
            want = chunk_bytes if segment.end is None else min(chunk_bytes, segment.end - raw.tell())
            if want <= 0:
                break
            data = stream.read(want)
            if not data:
                break
            if not data.endswith(b"\n"):
                data += stream.readline()  # a segment end is a line start: never reads past it
            consumed, position = raw.tell() - position, raw.tell()
            yield line, data, consumed
            line += data.count(b"\n")


# --------------------------------------------------------------------------- workers

@dataclass(frozen=True)
class EncodeOptions:
    json_keys: tuple
    append_eod: bool
    split_sentences: bool
    keep_newlines: bool
    lang: str
    tokenizer_kwargs: dict


@dataclass
class ChunkResult:
    documents: int
    bad: list            # [(0-based line index within the chunk, reason)]
    arrays: dict         # key -> (tokens [dtype], sequence lengths int64, sequences per document int64)

    @property
    def tokens(self) -> int:
        return sum(a[0].size for a in self.arrays.values())


_STATE: dict = {}


def _init_worker(options: EncodeOptions) -> None:
    tokenizer = build_tokenizer(**options.tokenizer_kwargs)
    splitter = None
    if options.split_sentences:
        from megatron_rpt.data.sentences import SentenceSplitter
        splitter = SentenceSplitter(options.lang, options.keep_newlines)
    _STATE.update(options=options, tokenizer=tokenizer, splitter=splitter, dtype=token_dtype(tokenizer.vocab_size))


def _tokenize_all(texts: list[str]) -> list:
    """Ids per text; a text the tokenizer rejects gets its error message instead of ids."""
    tokenizer = _STATE["tokenizer"]
    try:
        return tokenizer.tokenize_batch(texts)
    except Exception:  # noqa: BLE001 - locate the culprit(s) one by one
        out = []
        for text in texts:
            try:
                out.append(tokenizer.tokenize(text))
            except Exception as e:  # noqa: BLE001 - e.g. NullTokenizer text that is not ids
                out.append(str(e) or type(e).__name__)
        return out


def encode_chunk(data: bytes) -> ChunkResult:
    """Parse, validate and tokenize the lines of one chunk (in a worker, or in-process)."""
    opts: EncodeOptions = _STATE["options"]
    bad: list = []
    rows: list = []  # (line index, {key: text})
    for i, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            texts = texts_of(parse_line(raw), opts.json_keys)
        except ValueError as e:
            bad.append((i, str(e)))
            continue
        rows.append((i, dict(zip(opts.json_keys, texts))))

    # Tokenize key by key; a row whose text is rejected for any key is dropped for all keys, so
    # every output has the same documents.
    eod = _STATE["tokenizer"].eod
    splitter = _STATE["splitter"]
    per_key: dict = {}
    rejected: dict = {}
    for key in opts.json_keys:
        texts = [r[1][key] for r in rows]
        if splitter is None:
            pieces, counts = texts, [1] * len(texts)
        else:
            split = [splitter.split(t) for t in texts]
            pieces, counts = [s for doc in split for s in doc], [len(doc) for doc in split]
        ids = _tokenize_all(pieces)
        docs, start = [], 0
        for row, n in zip(rows, counts):
            seqs = ids[start:start + n]
            start += n
            error = next((s for s in seqs if isinstance(s, str)), None)
            # As Megatron-LM: sentences with no tokens are dropped; eod ends the last sentence.
            seqs = [] if error is not None else [s for s in seqs if len(s)]
            if error is not None:
                rejected.setdefault(row[0], f"key {key!r} cannot be tokenized ({error})")
            elif not seqs:
                rejected.setdefault(row[0], f"key {key!r} has no tokens")
            elif opts.append_eod:
                seqs[-1] = list(seqs[-1]) + [eod]
            docs.append(seqs)
        per_key[key] = docs

    keep = [j for j, row in enumerate(rows) if row[0] not in rejected]
    bad = sorted(bad + list(rejected.items()))
    arrays = {}
    dtype = _STATE["dtype"]
    for key, docs in per_key.items():
        seqs = [s for j in keep for s in docs[j]]
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        tokens = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
        per_doc = np.fromiter((len(docs[j]) for j in keep), dtype=np.int64, count=len(keep))
        # Cast here: the chunk travels back to the writer at the output's width, not as int64.
        arrays[key] = (cast_tokens(tokens, dtype, f"the {key!r} output"), lengths, per_doc)
    return ChunkResult(len(keep), bad, arrays)


class _Done:
    """In-process stand-in for a worker's Future (workers=1)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


# --------------------------------------------------------------------------- driver

class _Run:
    """Shared state of one preprocess run: stats, progress, first bad-line examples, stop flag."""

    def __init__(self, skip_bad_lines: bool, log_interval: int, bar):
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.skip_bad_lines, self.log_interval, self.bar = skip_bad_lines, log_interval, bar
        self.stats = PreprocessStats()
        self.examples: dict = {}  # partition -> first examples (merged in input order at the end)
        self.t0 = time.perf_counter()
        self._last_postfix = 0.0

    def record(self, partition: int, result: ChunkResult, where: list, consumed: int, nbytes: int) -> None:
        with self.lock:
            s = self.stats
            if result.bad:
                s.skipped += len(result.bad)
                mine = self.examples.setdefault(partition, [])
                mine.extend(where[:MAX_EXAMPLES - len(mine)])
            before = s.documents
            s.documents += result.documents
            s.tokens += result.tokens
            s.bytes_read += nbytes
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            if self.log_interval and s.documents // self.log_interval > before // self.log_interval:
                msg = (f"processed {s.documents} documents, "
                       f"{s.tokens} tokens ({s.documents / elapsed:.0f} docs/s, "
                       f"{s.bytes_read / 2**20 / elapsed:.1f} MB/s)")
                self.bar.write(msg) if self.bar is not None else print(msg, flush=True)
            if self.bar is not None:
                self.bar.update(consumed)
                if time.perf_counter() - self._last_postfix > 0.5:
                    self._last_postfix = time.perf_counter()
                    self.bar.set_postfix_str(f"{s.documents / elapsed:,.0f} docs/s, {s.tokens / elapsed:,.0f} tok/s, "
                                             f"{s.bytes_read / 2**20 / elapsed:.1f} MB/s text")


def _run_partition(run: _Run, index: int, segments: list[Segment], writers: dict, submit, window: int,
                   chunk_bytes: int) -> None:
    inflight: deque = deque()

    def consume() -> None:
        pending, segment, first, consumed, nbytes = inflight.popleft()
        try:
            result = pending.result()
        except BrokenProcessPool:
            raise RuntimeError(f"a --workers process died while tokenizing {segment.path} (killed, e.g. out of "
                               "memory?); nothing was published") from None
        where = []
        # Line numbers only where they are reported (a partition's first line may cost a count).
        if result.bad and (not run.skip_bad_lines or len(run.examples.get(index, ())) < MAX_EXAMPLES):
            base = segment.first_line() + first
            where = [f"{segment.path}:{base + i}: {reason}" for i, reason in result.bad[:MAX_EXAMPLES]]
            if not run.skip_bad_lines:
                raise BadInputError(where[0] + " (use --skip-bad-lines to skip such lines)")
        for key, arrays in result.arrays.items():
            writers[key].add_batch(*arrays)
        run.record(index, result, where, consumed, nbytes)

    for segment in segments:
        for first, data, consumed in _read_chunks(segment, chunk_bytes):
            if run.stop.is_set():
                return
            inflight.append((submit(data), segment, first, consumed, len(data)))
            while len(inflight) >= window:
                consume()
    while inflight:
        consume()


def preprocess(inputs: Sequence[str], output_prefix: str, *, tokenizer_type: str, json_keys: Sequence[str] = ("text",),
               append_eod: bool = False, split_sentences: bool = False, keep_newlines: bool = False,
               lang: str = "english", workers: int = 1, partitions: int = 1, skip_bad_lines: bool = False,
               chunk_bytes: int = 1 << 20, log_interval: int = 0, progress: bool = True,
               **tokenizer_kwargs) -> PreprocessStats:
    """Tokenize jsonl documents into `{output_prefix}_{key}_{document|sentence}.bin/.idx` (module docstring).

    `tokenizer_kwargs` go to `build_tokenizer` (tokenizer_model, vocab_file, merge_file, vocab_size, tiktoken_*).
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {workers})")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1 (got {chunk_bytes})")
    files = expand_inputs(inputs)
    plan = plan_partitions(files, partitions)
    options = EncodeOptions(tuple(json_keys), append_eod, split_sentences, keep_newlines, lang,
                            dict(tokenizer_type=tokenizer_type, **tokenizer_kwargs))
    _init_worker(options)  # fail here, before any worker starts, on a bad tokenizer or --lang
    vocab_size = _STATE["tokenizer"].vocab_size
    level = "sentence" if split_sentences else "document"
    finals = {k: f"{output_prefix}_{k}_{level}" for k in options.json_keys}
    single = len(plan) == 1
    writers = [{k: IndexedWriter(p if single else f"{p}.part{i}", vocab_size) for k, p in finals.items()}
               for i in range(len(plan))]

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(s.size for part in plan for s in part), unit="B", unit_scale=True, unit_divisor=1024,
                   desc="preprocess", dynamic_ncols=True, smoothing=0.1)
    run = _Run(skip_bad_lines, log_interval, bar)
    pool = None
    if workers > 1:
        # Rust tokenizers must not start their own thread pools inside forked workers.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Not multiprocessing.Pool: a worker that dies leaves its AsyncResult waiting forever, and
        # Pool.terminate() with tasks in flight can deadlock its task-feeder thread (seen in the test
        # suite, on the bad-line error path). The executor raises BrokenProcessPool instead.
        pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker,
                                   initargs=(options,))
        submit = lambda data: pool.submit(encode_chunk, data)  # noqa: E731
    else:
        in_process = threading.Lock()  # partition threads share this process's tokenizer

        def submit(data: bytes) -> _Done:
            with in_process:
                return _Done(encode_chunk(data))
    window = 2 * workers + 1
    errors: dict = {}

    def target(i: int) -> None:
        try:
            _run_partition(run, i, plan[i], writers[i], submit, window, chunk_bytes)
        except BaseException as e:  # noqa: BLE001 - re-raised by the main thread
            errors[i] = e
            run.stop.set()

    try:
        if single:
            _run_partition(run, 0, plan[0], writers[0], submit, window, chunk_bytes)
        else:
            threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(len(plan))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[min(errors)]
        stats = run.stats
        stats.skipped_examples = [x for i in sorted(run.examples) for x in run.examples[i]][:MAX_EXAMPLES]
        if stats.documents == 0:
            raise BadInputError(f"--input: no documents in {', '.join(files)}"
                                + (f" ({stats.skipped} bad lines skipped)" if stats.skipped else ""))
        for key, prefix in finals.items():
            if single:
                stats.outputs[key] = writers[0][key].finalize()
                continue
            parts = [w[key].finalize()[0][:-len(".bin")] for w in writers]
            merged = IndexedWriter(prefix, vocab_size)
            try:
                for part in parts:
                    merged.append_dataset(part)
                stats.outputs[key] = merged.finalize()
            except BaseException:
                merged.abort()
                raise
            finally:
                for part in parts:
                    for ext in (".bin", ".idx"):
                        if os.path.exists(part + ext):
                            os.remove(part + ext)
    except BaseException:
        run.stop.set()
        for group in writers:
            for writer in group.values():
                writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)   # at most the in-flight window still runs
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - run.t0
    return stats
