"""`--dry-run` on Megatron-LM's own example launch lines, whole (tests/megatron_lm_scripts.py: the flags of
examples/llama/train_llama3_8b_h100_fp8.sh, examples/mixtral/train_mixtral_8x7b_distributed.sh and
examples/gpt3/train_gpt3_175b_distributed.sh, their path arguments pointing at small real files), with the
world sizes those scripts launch: they validate without a process group, the flags that change nothing here
are named, and the parameter totals are the published ones.
"""

import pytest

from megatron_rpt.config import ConfigError, parse_args, parse_rpt_args
from megatron_rpt.training.dry_run import dry_run
from tests.assets import gpt2_files
from tests.megatron_lm_scripts import GPT3_175B, LLAMA3_8B, MIXTRAL_8X7B, WORLD, fill, write_script_files


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    vocab, merges = gpt2_files()
    return {**write_script_files(tmp_path_factory.mktemp("scripts")), "VOCAB": vocab, "MERGES": merges}


def _run(argv, world, capsys, parse=parse_args, **kw):
    dry_run(parse(argv + ["--dry-run"]), environ={"WORLD_SIZE": str(world)}, **kw)
    return capsys.readouterr().out


def _billions(out, key="total"):
    line = next(x for x in out.splitlines() if x.startswith("> parameters:"))
    total = float(line.split(":")[1].split("B total")[0])
    if key == "active":
        return float(line.split("B non-embedding), ")[1].split("B active")[0])
    return total


def test_llama3_8b_script(capsys, paths):
    out = _run(fill(LLAMA3_8B, paths), WORLD["LLAMA3_8B"], capsys)
    # HF Llama-3-8B: 8.030B; NullTokenizer's eod row padded to 128384 rows adds 1.05M (untied)
    assert abs(_billions(out) - 8.0313) < 0.0005, out
    assert "world size 8 from torchrun (WORLD_SIZE=8)" in out and "TP=1 PP=1 CP=1 EP=1 ETP=1 DP=8" in out
    assert "SwiGLU MLP 14336, RMSNorm-1p eps 1e-05, no biases, rope 100% base 1e+06, 32 heads / 8 kv x 128" in out
    # a login node has no GPU: FP8 is what the launch will check (the zero-centred norm runs anywhere)
    checked = next(x for x in out.splitlines() if x.startswith("> checked at launch:"))
    assert "compute capability >= 8.9 (--fp8-format hybrid" in checked and "--apply-layernorm-1p" not in checked
    assert "sequence parallel off" in out   # TP = 1: turned off with a warning, as Megatron-LM
    # the sample-based schedule: 1953125000 // 128 iterations, warmup/decay in samples as given
    assert "15258789 iterations (from --train-samples 1953125000; LR warmup 3906252, decay 1949218748 samples)" in out
    # the flags that change nothing here, one line each (the rest of the script is ours)
    ignored = [x.split(" ignored:")[0] for x in out.splitlines() if " ignored: " in x]
    assert ignored == ["> --use-mcore-models", "> --attention-backend fused", "> --cross-entropy-loss-fusion",
                       "> --no-create-attention-mask-in-dataloader", "> --ckpt-format torch_dist"]


def test_mixtral_8x7b_script(capsys, paths):
    # the real tokenizer.model has 32000 pieces; the stand-in has 48, --vocab-size sizes the model as Mixtral's
    out = _run(fill(MIXTRAL_8X7B, paths) + ["--vocab-size", "32000"], WORLD["MIXTRAL_8X7B"], capsys)
    assert _billions(out) == pytest.approx(46.703, abs=0.001)            # HF Mixtral-8x7B: 46,702,792,704
    assert _billions(out, "active") == pytest.approx(12.880, abs=0.001)  # 12.9B active
    assert "TP=1 PP=4 CP=1 EP=8 ETP=1 DP=16" in out   # 8 nodes x 8 GPUs: PP4 x EP8 -> expert DP 2
    assert "MoE 8 experts x 14336 top-2" in out
    assert "Transformer Engine (--moe-grouped-gemm)" in out
    ignored = [x.split(" ignored:")[0] for x in out.splitlines() if " ignored: " in x]
    assert ignored == ["> --use-mcore-models", "> --no-masked-softmax-fusion", "> --no-position-embedding"]


def test_gpt3_175b_script(capsys, paths):
    argv = fill(GPT3_175B, {**paths, "DATA": paths["GPT2_DATA"]})
    with pytest.raises(ConfigError) as e:   # the script gives the GPT-2 files without a type (Megatron-LM fails too)
        dry_run(parse_args(argv + ["--dry-run"]), environ={"WORLD_SIZE": str(WORLD["GPT3_175B"])})
    assert e.value.problems == ["--tokenizer-type is required (--vocab-file and --merge-file: --tokenizer-type "
                                "GPT2BPETokenizer)"]
    out = _run(argv + ["--tokenizer-type", "GPT2BPETokenizer"], WORLD["GPT3_175B"], capsys)
    assert 174.5 < _billions(out) < 175.5, out
    assert "GeLU MLP 49152, LayerNorm eps 1e-05, biases, learned_absolute, 96 heads / 96 kv x 128" in out
    assert "TP=8 PP=16 CP=1 EP=1 ETP=8 DP=8" in out
    # --step-batch-size-schedule: thresholds in tokens over --seq-length 2048; the last batch is the global one
    assert ("500000 iterations (batch steps 16 from sample 0, 320 from sample 1171875, 624 from sample 2343750, "
            "928 from sample 3515625, 1232 from sample 4687500, 1536 from sample 5859375)") in out
    mem = next(x for x in out.splitlines() if x.startswith("> memory per GPU"))
    assert "GiB = weights" in mem


def test_dry_run_reports_every_problem_and_uses_slurm_ntasks(capsys, tmp_path):
    with pytest.raises(ConfigError) as e:   # 3 GPUs cannot hold TP=2; data files are checked
        dry_run(parse_args(["--model-preset", "tiny", "--tensor-model-parallel-size", "2", "--lr", "1e-3",
                            "--train-iters", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
                            "--data-path", str(tmp_path / "missing"), "--dry-run"]), environ={"SLURM_NTASKS": "3"})
    text = str(e.value)
    assert "world size 3 is not divisible" in text and "missing" in text
    dry_run(parse_args(["--model-preset", "tiny", "--lr", "1e-3", "--train-iters", "1", "--mock-data",
                        "--vocab-size", "100", "--use-cpu", "--dry-run"]), environ={"SLURM_NTASKS": "2"})
    out = capsys.readouterr().out
    assert "world size 2 from slurm (SLURM_NTASKS=2)" in out and "checked at launch: nothing machine-specific" in out


def test_rpt_dry_run_applies_rpt_checks(capsys, tmp_path):
    from functools import partial

    from megatron_rpt.validate import validate_rpt_config
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("")
    argv = ["--model-preset", "tiny", "--lr", "1e-6", "--train-iters", "1", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "100", "--rpt-data", str(tasks), "--rpt-contexts-per-step", "4", "--rpt-group-size", "4",
            "--rpt-max-response-length", "32"]
    out = _run(argv, 2, capsys, parse=parse_rpt_args, validate=validate_rpt_config)
    assert "global batch 16 x 128 tokens" in out   # RPT derives it: 4 contexts x 4 rollouts
    with pytest.raises(ConfigError, match="--hidden-dropout 0.1"):
        dry_run(parse_rpt_args(argv + ["--hidden-dropout", "0.1", "--dry-run"]), environ={"WORLD_SIZE": "2"},
                validate=partial(validate_rpt_config))


def test_refused_megatron_lm_flags_are_reported_together(paths):
    """Refused flags (and a schedule that mixes iterations and samples) are all in one error."""
    llama = fill(LLAMA3_8B, paths)
    with pytest.raises(ConfigError) as e:
        parse_args(llama + ["--use-legacy-models", "--use-torch-fsdp2"])
    assert [p.split(" is not supported")[0] for p in e.value.problems] == ["--use-legacy-models", "--use-torch-fsdp2"]
    with pytest.raises(ConfigError) as e:   # Megatron-LM asserts 'expected sample-based training'
        dry_run(parse_args(llama + ["--train-iters", "1000", "--lr-warmup-iters", "10", "--dry-run"]),
                environ={"WORLD_SIZE": "8"})
    assert e.value.problems == [
        "--lr-warmup-iters is for iteration-based training; with --train-samples give --lr-warmup-samples",
        "--train-iters and --train-samples are exclusive (iteration- or sample-based training, as in Megatron-LM)"]


def test_unknown_flags_and_refused_values():
    with pytest.raises(ConfigError) as e:
        parse_args(["--model-preset", "tiny", "--num-layerz", "2", "--ckpt-format", "torch", "--foo", "--use-legacy-models",
                    "stray"])
    assert e.value.problems == [
        "unknown flag --num-layerz (did you mean --num-layers?)",
        "--ckpt-format torch is not supported: checkpoints are torch_dist (Megatron-Core dist_checkpointing)",
        "unknown flag --foo",
        "--use-legacy-models is not supported: megatron-rpt builds Megatron-Core models only",
        "unexpected argument 'stray' (a value without a flag?)"]
    # values of our own flags keep argparse's checks (a wrong type is still an error)
    with pytest.raises(SystemExit):
        parse_args(["--num-layers", "two"])


def test_memory_estimate_by_hand():
    """models/memory.py against its formulas worked by hand: parameters per GPU from the analytic count (TP=1
    PP=1: the whole model; PP=2: the busier stage), bytes per parameter, activations, logits."""
    from megatron_rpt.config.arguments import model_flags_argv
    from megatron_rpt.config.presets import QWEN3_FAMILY
    from megatron_rpt.models.flops import count_parameters, layer_params, norm_params
    from megatron_rpt.models.memory import estimate_memory
    from megatron_rpt.validate import validate_config
    base = [*model_flags_argv(QWEN3_FAMILY), "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
            "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32", "--lr", "1e-3",
            "--train-iters", "1", "--mock-data", "--vocab-size", "256", "--micro-batch-size", "2"]
    v, s, b, h = 256, 32, 2, 64
    cfg = validate_config(parse_args(base + ["--bf16", "--use-distributed-optimizer"]), 4)   # DP 4
    mem = estimate_memory(cfg, v, 4)
    total = count_parameters(cfg.model, v).total
    assert (mem.dense_params, mem.expert_params) == (total, 0)
    assert (mem.weights, mem.gradients, mem.optimizer) == (2 * total, 4 * total, 12 * total / 4)
    assert mem.activations == 4 * s * b * h * (10 + 24)          # 4 layers, TP 1, no SP
    assert mem.logits == 4 * s * b * v
    # PP=2 (fp32, plain optimizer): stage 0 holds 2 layers + embedding, the last 2 layers + norm + a copy of
    # the tied output layer; global batch 8 = 4 micro-batches, 2 in flight on stage 0.
    cfg = validate_config(parse_args(base + ["--pipeline-model-parallel-size", "2", "--global-batch-size", "8"]), 2)
    mem = estimate_memory(cfg, v, 2)
    layer = layer_params(cfg.model, False)
    stage = 2 * (layer["matmul"] + layer["other"]) + v * h
    assert mem.dense_params == stage + norm_params(cfg.model, h)
    assert (mem.weights, mem.gradients, mem.optimizer) == (4 * mem.dense_params, 4 * mem.dense_params,
                                                           8 * mem.dense_params)
    assert mem.activations == 2 * s * b * h * (10 + 24) * 2
    # MoE with EP=2: the routed experts are split over EP, the rest is not.
    moe = validate_config(parse_args(base + ["--num-experts", "4", "--moe-ffn-hidden-size", "32",
                                             "--expert-model-parallel-size", "2"]), 2)
    mem = estimate_memory(moe, v, 2)
    experts = 4 * layer_params(moe.model, True)["experts"]
    assert mem.expert_params == experts // 2
    assert mem.dense_params + experts == count_parameters(moe.model, v).total
