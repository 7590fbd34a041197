"""tools/convert_checkpoint.py end to end: HF -> Megatron -> HF is bit-exact, transformers loads the
export with the original logits, an imported checkpoint trains at TP=2 and exports identically.

Random Llama, Qwen3-MoE, Mixtral (untied) and Qwen3, Qwen2 (tied) models are created by transformers in child processes (forked by tests/cli.py) and saved
with save_pretrained (no downloads). Every tool runs as users run it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.cli import run_python
from megatron_rpt.config.arguments import model_flags_argv
from megatron_rpt.config.presets import QWEN3_FAMILY

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")

MAKE = """
import sys, torch, transformers
arch, out, tied = sys.argv[1], sys.argv[2], sys.argv[3] == "tied"
cls = getattr(transformers, arch)
moe = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True) if "Moe" in arch else {}
if arch == "MixtralForCausalLM":
    moe = dict(num_local_experts=4, num_experts_per_tok=2)
config = getattr(transformers, cls.config_class.__name__)(
    architectures=[arch], hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=200, max_position_embeddings=64, rms_norm_eps=1e-6,
    tie_word_embeddings=tied, **moe)
torch.manual_seed(0)
model = cls(config)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(0.5, 1.5)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.5)
model.save_pretrained(out)
"""

COMPARE = """
import json, sys, torch, transformers
from safetensors.torch import load_file
a, b = sys.argv[1], sys.argv[2]
ta, tb = load_file(a + "/model.safetensors"), load_file(b + "/model.safetensors")
assert set(ta) == set(tb), (sorted(set(ta) ^ set(tb)))
exact = all(torch.equal(ta[k], tb[k]) for k in ta)
ma = transformers.AutoModelForCausalLM.from_pretrained(a).eval()
mb = transformers.AutoModelForCausalLM.from_pretrained(b).eval()
tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    diff = (ma(tokens).logits - mb(tokens).logits).abs().max().item()
print(json.dumps({"exact": exact, "diff": diff, "arch": type(mb).__name__}))
"""


def run(*args, check=True):
    proc = run_python(args, env=ENV, timeout=300)   # forked, not a fresh interpreter (tests/cli.py)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def convert(*args, check=True):
    return run(sys.executable, "tools/convert_checkpoint.py", *args, "--no-progress", check=check)


def compare(a, b) -> dict:
    return json.loads(run(sys.executable, "-c", COMPARE, a, b).stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch,tied", [("LlamaForCausalLM", "untied"), ("Qwen3ForCausalLM", "tied"),
                                       ("Qwen3MoeForCausalLM", "untied"), ("Qwen2ForCausalLM", "tied"),
                                       ("MixtralForCausalLM", "untied")])
def test_round_trip_is_bit_exact_and_transformers_loads_it(tmp_path, arch, tied):
    hf, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    run(sys.executable, "-c", MAKE, arch, hf, tied)
    proc = convert("import", "--hf-dir", hf, "--save", ckpt)
    assert f"imported {arch}" in proc.stdout and "mrpt-pretrain --load" in proc.stdout
    convert("export", "--load", ckpt, "--output", out, "--dtype", "fp32")
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    r = compare(str(hf), str(out))
    assert r == {"exact": True, "diff": 0.0, "arch": arch}
    # An existing output is kept unless --force.
    proc = convert("export", "--load", ckpt, "--output", out, check=False)
    assert proc.returncode == 2 and "exists and is not empty; pass --force" in proc.stderr
    convert("export", "--load", ckpt, "--output", out, "--dtype", "bf16", "--force")
    assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_imported_checkpoint_trains_at_tp2_or_pp2_and_exports_identically(tmp_path, layout):
    """A model-only imported checkpoint is the start of a TP=2 / PP=2 run (resharded on load); after a
    step at lr 0 that checkpoint exports the original weights exactly."""
    hf, ckpt, run_dir, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "run", tmp_path / "out"
    run(sys.executable, "-c", MAKE, "Qwen3ForCausalLM", hf, "untied")
    convert("import", "--hf-dir", hf, "--save", ckpt)
    proc = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "megatron_rpt.pretrain",
               "--load", ckpt, "--save", run_dir, *model_flags_argv(QWEN3_FAMILY), "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96",
               "--num-attention-heads", "4", "--num-query-groups", "2", "--kv-channels", "16",
               "--max-position-embeddings", "64", "--seq-length", "16", "--norm-epsilon", "1e-6",
               "--untie-embeddings-and-output-weights", "--mock-data", "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "199", *layout, "--micro-batch-size", "2",
               "--global-batch-size", "2", "--lr", "0", "--min-lr", "0", "--train-iters", "1", "--eval-interval", "0",
               "--use-cpu")
    assert "iteration        1/       1" in proc.stdout, proc.stdout[-3000:]
    convert("export", "--load", run_dir, "--output", out, "--dtype", "fp32")
    assert compare(str(hf), str(out))["exact"]


def test_import_errors(tmp_path):
    hf = tmp_path / "hf"
    proc = convert("import", "--hf-dir", hf, "--save", tmp_path / "c", check=False)
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    run(sys.executable, "-c", MAKE, "LlamaForCausalLM", hf, "tied")
    config = json.load(open(hf / "config.json"))
    json.dump({**config, "architectures": ["GPT2LMHeadModel"]}, open(hf / "config.json", "w"))
    proc = convert("import", "--hf-dir", hf, "--save", tmp_path / "c", check=False)
    assert proc.returncode == 2 and "GPT2LMHeadModel" in proc.stderr and "supported" in proc.stderr
    json.dump(config, open(hf / "config.json", "w"))
    from safetensors.torch import load_file, save_file
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    proc = convert("import", "--hf-dir", hf, "--save", tmp_path / "c", check=False)
    assert proc.returncode == 2 and "model.layers.1.mlp.up_proj.weight" in proc.stderr
    (hf / "model.safetensors").unlink()
    proc = convert("import", "--hf-dir", hf, "--save", tmp_path / "c", check=False)
    assert proc.returncode == 2 and "pickled .bin files are refused" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_import_checks_shapes_and_layout_before_writing(tmp_path):
    hf = tmp_path / "hf"
    run(sys.executable, "-c", MAKE, "Qwen3ForCausalLM", hf, "tied")
    # TP must divide the heads (4) / query groups (2): refused, nothing written.
    proc = convert("import", "--hf-dir", hf, "--save", tmp_path / "c", "--tensor-model-parallel-size", "3",
                   check=False)
    assert proc.returncode == 2 and "tensor-model-parallel-size" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "c").exists()
    # A layout that fits is recorded with the checkpoint's run configuration.
    convert("import", "--hf-dir", hf, "--save", tmp_path / "c", "--tensor-model-parallel-size", "2",
            "--pipeline-model-parallel-size", "2")
    recorded = json.load(open(tmp_path / "c" / "iter_0000000" / "run_config.json"))["run_config"]["parallel"]
    assert (recorded["tensor_model_parallel_size"], recorded["pipeline_model_parallel_size"]) == (2, 2)
    # A tensor whose shape does not fit the config is named, before anything is written.
    run(sys.executable, "-c", "import sys; from safetensors.torch import load_file, save_file; "
        "t = load_file(sys.argv[1]); k = 'model.layers.1.self_attn.k_proj.weight'; t[k] = t[k][:, :60].clone(); "
        "save_file(t, sys.argv[1], metadata={'format': 'pt'})", hf / "model.safetensors")
    proc = convert("import", "--hf-dir", hf, "--save", tmp_path / "d", check=False)
    assert proc.returncode == 2 and "model.layers.1.self_attn.k_proj.weight" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "d").exists()


def test_export_of_an_incomplete_checkpoint_is_a_clear_error(tmp_path):
    hf, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    run(sys.executable, "-c", MAKE, "LlamaForCausalLM", hf, "untied")
    convert("import", "--hf-dir", hf, "--save", ckpt)
    proc = convert("export", "--load", ckpt, "--output", out, "--iteration", "5", check=False)
    assert proc.returncode == 2 and "iter_0000005" in proc.stderr, proc.stderr[-2000:]
    (data,) = (ckpt / "iter_0000000").glob("*.distcp")
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 10)
    proc = convert("export", "--load", ckpt, "--output", out, check=False)
    assert proc.returncode == 2 and f"data file {data.name} has" in proc.stderr and "truncated" in proc.stderr, \
        proc.stderr[-2000:]
    data.unlink()
    proc = convert("export", "--load", ckpt, "--output", out, check=False)
    assert proc.returncode == 2 and f"data file {data.name} is missing" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not Path(str(out) + ".tmp").exists()
