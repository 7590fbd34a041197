"""tools/count_params.py: MoE parameters and FLOPs by hand, and the CLI prints the library's numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rpt.config import parse_args
from megatron_rpt.config.arguments import model_flags_argv
from megatron_rpt.config.presets import QWEN3_FAMILY
from megatron_rpt.models.flops import count_parameters, training_flops_per_token

ROOT = Path(__file__).resolve().parents[2]
# The Qwen3 family (SwiGLU, RMSNorm, QK-norm, no biases), whose parameters the formulas below count.
MOE = [*model_flags_argv(QWEN3_FAMILY), "--num-layers", "3", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
       "--num-query-groups", "2", "--kv-channels", "16", "--seq-length", "32", "--num-experts", "10",
       "--moe-ffn-hidden-size", "24", "--moe-router-topk", "3", "--vocab-size", "1000"]


def test_moe_parameters_and_flops_by_hand():
    m = parse_args(MOE).model
    h, d, heads, groups, layers, e, k, fe, v, s = 64, 16, 4, 2, 3, 10, 3, 24, 1024, 32
    attn = h * (heads * d + 2 * groups * d) + heads * d * h
    norms = 2 * h + 2 * d
    experts, router = e * 3 * h * fe, h * e
    p = count_parameters(m, v)
    assert p.non_embedding == layers * (attn + norms + experts + router) + h
    assert p.active_non_embedding == layers * (attn + norms + k * 3 * h * fe + router) + h
    assert p.total == p.non_embedding + v * h and p.active == p.active_non_embedding + v * h  # tied
    forward = 2 * layers * (attn + k * 3 * h * fe + router) + 4 * layers * heads * d * s + 2 * h * v
    assert training_flops_per_token(m, v) == 3 * forward
    # Dense models: active == total.
    dense = count_parameters(parse_args(MOE[:-8] + ["--vocab-size", "1000"]).model, v)
    assert dense.active == dense.total


@pytest.mark.slow   # a fresh interpreter
def test_cli_prints_the_library_numbers_and_the_paper_sizes():
    out = subprocess.run([sys.executable, "tools/count_params.py", "--model-preset", "moe-10b-a0.5b", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    m = parse_args(["--model-preset", "moe-10b-a0.5b"]).model
    p = count_parameters(m, r["padded_vocab"])
    assert (r["total"], r["active"], r["active_non_embedding"]) == (p.total, p.active, p.active_non_embedding)
    assert r["padded_vocab"] == 151_680 and r["experts"] == 384 and r["topk"] == 12
    assert 9.5e9 < r["total"] < 10.2e9 and 0.45e9 < r["active_non_embedding"] < 0.6e9
    assert r["training_flops_per_token"] == training_flops_per_token(m, 151_680)
    bad = subprocess.run([sys.executable, "tools/count_params.py", "--num-layers", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--hidden-size is required" in bad.stderr
