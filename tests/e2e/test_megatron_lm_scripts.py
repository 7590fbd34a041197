"""Megatron-LM's example scripts, shrunk, train on CPU through mrpt-pretrain under a 2-rank torchrun launch.

Each launch line is the script's whole flag set (tests/megatron_lm_scripts.py) with only the sizes changed
(model, batch, run length, parallel layout for 2 ranks, profiler window) and the flags that need a Hopper
GPU with Transformer Engine left out (FP8, grouped GEMM): what a Megatron-LM user gets by swapping
pretrain_gpt.py for mrpt-pretrain and running the script small. Asserted: the run completes; the schedule
the script's flags describe (Llama-3: iterations from --train-samples; GPT-3: the step batch-size schedule)
is the one the log shows; losses are finite; the checkpoint, profiler trace and W&B run are written.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

from megatron_rpt.training.logging import parse_log_line
from tests.assets import gpt2_files
from tests.cli import run_python
from tests.megatron_lm_scripts import GPT3_175B, LLAMA3_8B, MIXTRAL_8X7B, fill, with_values, write_script_files

pytestmark = pytest.mark.slow

SMALL = {"--num-layers": 2, "--hidden-size": 64, "--num-attention-heads": 4, "--seq-length": 32,
         "--max-position-embeddings": 64, "--micro-batch-size": 1, "--log-interval": 1, "--eval-iters": 1,
         "--eval-interval": 2, "--save-interval": 1000}
GPU_ONLY = ("--fp8-format", "--fp8-amax-history-len", "--fp8-amax-compute-algo", "--fp8-param-gather",
            "--moe-grouped-gemm")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_script_files(tmp_path_factory.mktemp("scripts"))


def _train(argv: list[str], env: dict) -> tuple[str, list[dict]]:
    proc = run_python([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       "-m", "megatron_rpt.pretrain", *argv], env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    lines = [parse_log_line(x) for x in proc.stdout.splitlines()]
    lines = [x for x in lines if x is not None]
    assert lines and all(math.isfinite(x["loss"]) for x in lines), proc.stdout[-3000:]
    return proc.stdout, lines


def test_llama3_8b_script_small(paths):
    argv = with_values(fill(LLAMA3_8B, paths), {
        **SMALL, "--ffn-hidden-size": 128, "--num-query-groups": 2, "--kv-channels": 16, "--global-batch-size": 4,
        "--train-samples": 12, "--lr-decay-samples": 12, "--lr-warmup-samples": 4, "--vocab-size": 256,
        "--profile-step-start": 1, "--profile-step-end": 2}, drop=GPU_ONLY)
    out, lines = _train(argv, {})
    # sample-based: 12 samples / global batch 4 = 3 iterations; DP=2 with the distributed optimizer, bf16
    assert [(x["iteration"], x["consumed_samples"]) for x in lines] == [(1, 4), (2, 8), (3, 12)]
    assert "> --use-mcore-models ignored" in out and "> --ckpt-format torch_dist ignored" in out
    assert Path(paths["CKPT"], "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    traces = sorted(p.name for p in Path(paths["TB"]).parent.joinpath("torch_profile").iterdir())
    assert traces == ["rank-0.json.gz", "rank-1.json.gz"]   # --profile-ranks: all, as Megatron-LM


def test_mixtral_8x7b_script_small(paths, tmp_path):
    files = {**paths, "CKPT": tmp_path / "ckpt", "TB": tmp_path / "tb"}
    argv = with_values(fill(MIXTRAL_8X7B, files), {
        **SMALL, "--ffn-hidden-size": 128, "--num-query-groups": 2, "--num-experts": 4, "--global-batch-size": 4,
        "--train-iters": 3, "--lr-decay-iters": 3, "--lr-warmup-iters": 1, "--pipeline-model-parallel-size": 1,
        "--expert-model-parallel-size": 2}, drop=GPU_ONLY)
    out, lines = _train(argv, {"WANDB_MODE": "offline", "WANDB_CONSOLE": "off"})
    assert [x["iteration"] for x in lines] == [1, 2, 3] and "validation loss at iteration 2" in out
    assert list(Path(tmp_path, "ckpt", "wandb").glob("wandb/offline-run-*/run-*.wandb")), out[-2000:]


def test_gpt3_175b_script_small(paths, tmp_path):
    vocab, merges = gpt2_files()
    files = {**paths, "DATA": paths["GPT2_DATA"], "VOCAB": vocab, "MERGES": merges, "CKPT": tmp_path / "ckpt",
             "TB": tmp_path / "tb"}
    argv = with_values(fill(GPT3_175B, files), {
        **SMALL, "--global-batch-size": 4, "--step-batch-size-schedule": "0:2 64:4", "--train-iters": 3,
        "--lr-decay-iters": 3, "--tensor-model-parallel-size": 2, "--pipeline-model-parallel-size": 1,
        "--tokenizer-type": "GPT2BPETokenizer", "--initial-loss-scale": 1024})
    out, lines = _train(argv, {})
    # 64 tokens / --seq-length 32 = sample 2: batch 2 for the first step, then 4 (TP=2, fp16). A 3-iteration
    # run starts its loss scale at 1024, not 2^32 (whose overflows skip the first ~30 iterations)
    assert [(x["global_batch_size"], x["consumed_samples"], x["skipped"]) for x in lines] == [
        (2, 2, 0), (4, 6, 0), (4, 10, 0)]
