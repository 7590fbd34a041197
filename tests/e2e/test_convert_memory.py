"""Conversion streams: import and export hold about one tensor (plus one output shard), not the model.

A 175M-parameter Llama (700 MB in fp32, 24 layers) is converted HF -> Megatron -> HF through the CLI
while a sampler reads the converter's anonymous resident memory (RssAnon: the heap; safetensors'
memory-mapped input pages are file-backed and reclaimable, so they are not counted) every 5 ms.
The same commands on a 2-layer model of the same code paths give the fixed cost (Python, torch,
Megatron-Core imports); the difference must stay within a few copies of the largest tensor plus the
output shard size, far below the model's size. Before streaming the difference was > the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_convert_checkpoint import ENV, ROOT, run

MAKE = """
import sys, torch, transformers
out, layers, hidden, ffn, vocab = sys.argv[1], *map(int, sys.argv[2:6])
config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
    num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, vocab_size=vocab,
    max_position_embeddings=256, tie_word_embeddings=False)
torch.manual_seed(0)
transformers.LlamaForCausalLM(config).save_pretrained(out, max_shard_size="100MB")
"""

SHARD = 40_000_000


def peak_anon_mb(args) -> float:
    """Run the converter CLI; the peak of its RssAnon in MB (sampled every 5 ms)."""
    proc = subprocess.Popen([sys.executable, "tools/convert_checkpoint.py", *map(str, args), "--no-progress"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.005)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return peak / 1024


def convert_both_ways(tmp: Path, name: str, shape) -> tuple[float, float]:
    hf, ckpt, out = tmp / f"{name}_hf", tmp / f"{name}_ckpt", tmp / f"{name}_out"
    run(sys.executable, "-c", MAKE, hf, *shape)
    imp = peak_anon_mb(["import", "--hf-dir", hf, "--save", ckpt])
    exp = peak_anon_mb(["export", "--load", ckpt, "--output", out, "--dtype", "fp32", "--max-shard-size", f"{SHARD}B"])
    return imp, exp


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to sample memory")
def test_conversion_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    layers, hidden, ffn, vocab = 24, 768, 2048, 8192
    big_imp, big_exp = convert_both_ways(tmp_path, "big", (layers, hidden, ffn, vocab))
    base_imp, base_exp = convert_both_ways(tmp_path, "tiny", (2, 128, 256, 512))
    params = layers * (3 * hidden * hidden + 3 * hidden * ffn) + 2 * vocab * hidden  # GQA: k, v are h x h/2
    model_mb = params * 4 / 1e6                       # ~700 MB in fp32
    largest_mb = max(vocab * hidden, 2 * ffn * hidden) * 4 / 1e6  # the embedding, ~25 MB
    bound = 5 * largest_mb + SHARD / 1e6 + 48         # copies during conversion + one shard + allocator slack
    report = dict(model_mb=round(model_mb), largest_mb=round(largest_mb), bound_mb=round(bound),
                  import_mb=round(big_imp - base_imp), export_mb=round(big_exp - base_exp))
    print(json.dumps(report))
    assert bound < model_mb / 2
    assert big_imp - base_imp < bound, report
    assert big_exp - base_exp < bound, report
    # The export is sharded as asked and bit-exact (compared in a subprocess: no torch work in the
    # pytest process, whose later tests fork workers).
    index = json.load(open(tmp_path / "big_out" / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 9
    assert all((tmp_path / "big_out" / f).stat().st_size <= SHARD + 100_000 for f in files)  # + header
    src = json.load(open(tmp_path / "big_hf" / "model.safetensors.index.json"))["weight_map"]
    assert set(src) == set(index["weight_map"])
    run(sys.executable, "-c", SAME, tmp_path / "big_hf", tmp_path / "big_out")


SAME = """
import json, sys
from safetensors import safe_open
a, b = sys.argv[1], sys.argv[2]
wa = json.load(open(a + "/model.safetensors.index.json"))["weight_map"]
wb = json.load(open(b + "/model.safetensors.index.json"))["weight_map"]
for name in wa:
    with safe_open(a + "/" + wa[name], "pt") as fa, safe_open(b + "/" + wb[name], "pt") as fb:
        assert fa.get_tensor(name).equal(fb.get_tensor(name)), name
"""
