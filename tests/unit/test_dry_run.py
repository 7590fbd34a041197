"""`--dry-run` on Megatron-LM's own example launch lines: the model flags of
examples/llama/train_llama3_8b_h100_fp8.sh, examples/mixtral/train_mixtral_8x7b_distributed.sh and
examples/gpt3/train_gpt3_175b_distributed.sh (written here as data: their flag values are facts),
with the world sizes those scripts launch, validate without a process group and count the published
parameter totals. The Llama-3 script's schedule is sample-based (--train-samples, --lr-*-samples,
--decoupled-lr); its other flags (profiling, ...) are classified by config/megatron_lm.py.
"""

import pytest

from megatron_rpt.config import ConfigError, parse_args, parse_rpt_args
from megatron_rpt.training.dry_run import dry_run

LLAMA3_8B = ["--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "14336", "--num-attention-heads", "32",
             "--group-query-attention", "--num-query-groups", "8", "--kv-channels", "128", "--seq-length", "8192",
             "--max-position-embeddings", "8192", "--position-embedding-type", "rope", "--rotary-base", "1000000",
             "--rotary-percent", "1.0", "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--swiglu",
             "--init-method-std", "0.0134", "--apply-layernorm-1p", "--untie-embeddings-and-output-weights",
             "--disable-bias-linear",
             "--micro-batch-size", "1", "--global-batch-size", "128", "--lr", "0.00015", "--min-lr", "0.00001",
             "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--weight-decay", "0.1", "--adam-beta1", "0.9",
             "--adam-beta2", "0.95", "--bf16", "--calculate-per-token-loss", "--exit-duration-in-mins", "235",
             "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max",
             "--fp8-param-gather", "--tensor-model-parallel-size", "1", "--context-parallel-size", "1",
             "--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
             "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128256", "--split", "99,1,0",
             "--log-interval", "1", "--eval-iters", "32", "--eval-interval", "100", "--save-interval", "1000",
             "--distributed-timeout-minutes", "60", "--save", "checkpoints/llama3_8b_fp8", "--train-samples",
             "1953125000", "--lr-decay-samples", "1949218748", "--lr-warmup-samples", "3906252", "--decoupled-lr",
             "5.0e-4", "--decoupled-min-lr", "4.5e-5", "--grad-reduce-in-bf16"]
MIXTRAL_8X7B = ["--disable-bias-linear", "--seq-length", "4096", "--max-position-embeddings", "32768",
                "--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "14336", "--num-attention-heads",
                "32", "--init-method-std", "0.01", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
                "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
                "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "8",
                "--rotary-base", "1000000", "--num-experts", "8", "--moe-router-topk", "2",
                "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm",
                "--moe-token-dispatcher-type", "alltoall", "--overlap-param-gather", "--overlap-grad-reduce",
                "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "31999", "--split", "99990,8,2",
                "--micro-batch-size", "1", "--global-batch-size", "256", "--lr", "1e-4", "--train-iters", "500000",
                "--lr-decay-iters", "320000", "--lr-decay-style", "cosine", "--min-lr", "1.0e-5",
                "--weight-decay", "0.1", "--lr-warmup-iters", "500", "--clip-grad", "1.0", "--bf16",
                "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "4",
                "--expert-model-parallel-size", "8", "--use-distributed-optimizer", "--sequence-parallel"]
GPT3_175B = ["--num-layers", "96", "--hidden-size", "12288", "--num-attention-heads", "96", "--seq-length", "2048",
             "--max-position-embeddings", "2048", "--micro-batch-size", "1", "--global-batch-size", "1536",
             "--train-iters", "500000", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
             "--init-method-std", "0.006", "--clip-grad", "1.0", "--fp16", "--lr", "6.0e-5",
             "--lr-decay-style", "cosine", "--min-lr", "6.0e-6", "--lr-decay-iters", "430000",
             "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "16",
             "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "50256", "--split", "949,50,1"]


def _run(argv, world, capsys, parse=parse_args, **kw):
    dry_run(parse(argv + ["--dry-run"]), environ={"WORLD_SIZE": str(world)}, **kw)
    return capsys.readouterr().out


def _billions(out, key="total"):
    line = next(x for x in out.splitlines() if x.startswith("> parameters:"))
    total = float(line.split(":")[1].split("B total")[0])
    if key == "active":
        return float(line.split("B non-embedding), ")[1].split("B active")[0])
    return total


def test_llama3_8b_script(capsys):
    out = _run(LLAMA3_8B, 8, capsys)
    # HF Llama-3-8B: 8.030B; Megatron's script uses LayerNorm (+bias) and NullTokenizer's eod row (padded)
    assert abs(_billions(out) - 8.031) < 0.002, out
    assert "world size 8 from torchrun (WORLD_SIZE=8)" in out and "TP=1 PP=1 CP=1 EP=1 ETP=1 DP=8" in out
    assert "LayerNorm-1p eps 1e-05, no biases, rope 100% base 1e+06, 32 heads / 8 kv x 128" in out
    # a login node has no GPU: FP8 is what the launch will check (the zero-centred norm runs anywhere)
    checked = next(x for x in out.splitlines() if x.startswith("> checked at launch:"))
    assert "compute capability >= 8.9 (--fp8-format hybrid" in checked and "--apply-layernorm-1p" not in checked
    assert "sequence parallel off" in out   # TP = 1: turned off with a warning, as Megatron-LM
    # 1,953,125,000 samples // 128 per step (Megatron-LM's update_train_iters); the LR schedule in samples
    assert ("15258789 iterations (from --train-samples 1953125000; LR warmup 3906252, decay 1949218748 samples)"
            in out), out


def test_mixtral_8x7b_script(capsys):
    out = _run(MIXTRAL_8X7B, 64, capsys)   # 8 nodes x 8 GPUs: PP4 x EP8 -> expert DP 2, DP 16
    assert _billions(out) == pytest.approx(46.703, abs=0.001)            # HF Mixtral-8x7B: 46,702,792,704
    assert _billions(out, "active") == pytest.approx(12.880, abs=0.001)  # 12.9B active
    assert "TP=1 PP=4 CP=1 EP=8 ETP=1 DP=16" in out
    assert "MoE 8 experts x 14336 top-2" in out
    assert "Transformer Engine (--moe-grouped-gemm)" in out


def test_gpt3_175b_script(capsys):
    out = _run(GPT3_175B, 1024, capsys)
    assert 174.5 < _billions(out) < 175.5, out
    assert "GeLU MLP 49152, LayerNorm eps 1e-05, biases, learned_absolute, 96 heads / 96 kv x 128" in out
    assert "TP=8 PP=16 CP=1 EP=1 ETP=8 DP=8" in out
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


# The rest of the Llama-3 8B script's flags: Megatron-LM flags megatron-rpt does not carry.
LLAMA3_8B_REST = ["--use-mcore-models", "--attention-backend", "fused", "--cross-entropy-loss-fusion",
                  "--manual-gc", "--empty-unused-memory-level", "1", "--no-create-attention-mask-in-dataloader",
                  "--no-mmap-bin-files", "--num-workers", "1", "--log-throughput", "--profile",
                  "--profile-step-start", "4", "--profile-step-end", "6", "--ckpt-format", "torch_dist"]


def test_megatron_lm_flags_we_do_not_carry_are_reported_together(capsys):
    """The whole Llama-3 script dry-runs: the flags that change nothing here are accepted with one line each
    saying why; refused ones (and a schedule that mixes iterations and samples) are all in one error."""
    out = _run(LLAMA3_8B + LLAMA3_8B_REST, 8, capsys)
    ignored = [x.split(" ignored:")[0] for x in out.splitlines() if " ignored: " in x]
    assert ignored == ["> --use-mcore-models", "> --attention-backend fused", "> --cross-entropy-loss-fusion",
                       "> --no-create-attention-mask-in-dataloader", "> --ckpt-format torch_dist"]
    assert abs(_billions(out) - 8.031) < 0.002, out
    with pytest.raises(ConfigError) as e:
        parse_args(LLAMA3_8B + ["--use-legacy-models", "--use-torch-fsdp2"])
    assert [p.split(" is not supported")[0] for p in e.value.problems] == ["--use-legacy-models", "--use-torch-fsdp2"]
    with pytest.raises(ConfigError) as e:   # Megatron-LM asserts 'expected sample-based training'
        dry_run(parse_args(LLAMA3_8B + ["--train-iters", "1000", "--lr-warmup-iters", "10", "--dry-run"]),
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
