"""GPU only: Transformer Engine layer specs and FP8 training through `python -m megatron_rpt.pretrain`.

Skipped without CUDA + Transformer Engine (every CPU machine, CI included); run on the H100 by
`benchmarks/gpu.py check`. Each run is a fresh single-process job (no fork of a CUDA parent).
What is checked:
- the TE spec is chosen on CUDA (the model's linear layers are TE modules, dense and MoE);
- FP8 (hybrid; tensorwise, and delayed with an amax history) trains: the loss falls like bf16's, the
  curves agree within 5% over the last 10 iterations, and are not identical (identical would mean
  FP8 never ran);
- MoE with TE grouped GEMM in FP8 learns; --fp8-param-gather with the distributed optimizer stays
  within 5% of the plain FP8 run.
Seven training runs of a 4-layer model, about 5 minutes on an H100 (estimated, not yet measured).
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from megatron_rpt.config.arguments import model_flags_argv
from megatron_rpt.config.presets import QWEN3_FAMILY

ROOT = Path(__file__).resolve().parents[2]


def _cuda_te() -> bool:
    try:
        import torch
        return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None
    except Exception:  # noqa: BLE001
        return False


def _hopper() -> bool:
    import torch
    return torch.cuda.get_device_capability() >= (8, 9)


pytestmark = pytest.mark.skipif(not _cuda_te(), reason="needs CUDA and Transformer Engine")

# A small model whose GEMM shapes satisfy TE's FP8 rule (multiples of 16); mock data are learnable.
MODEL = [*model_flags_argv(QWEN3_FAMILY), "--num-layers", "4", "--hidden-size", "512", "--ffn-hidden-size", "1536", "--num-attention-heads", "8",
         "--num-query-groups", "4", "--kv-channels", "64", "--seq-length", "256", "--max-position-embeddings", "256",
         "--vocab-size", "4096"]
TRAIN = ["--mock-data", "--micro-batch-size", "4", "--global-batch-size", "16", "--lr", "1e-3", "--min-lr", "1e-4",
         "--lr-warmup-iters", "5", "--train-iters", "40", "--log-interval", "1", "--bf16", "--seed", "7",
         "--eval-interval", "0"]
ITERS = 40


def pretrain(*argv: str, tmp: Path) -> dict:
    from megatron_rpt.training.logging import parse_log_line

    proc = subprocess.run([sys.executable, "-m", "megatron_rpt.pretrain", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    (tmp / "log.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [parse_log_line(x) for x in proc.stdout.splitlines()]
    return {"stdout": proc.stdout, "losses": {x["iteration"]: x["loss"] for x in lines if x}}


def _tail_mean(losses: dict, n: int = 10) -> float:
    last = sorted(losses)[-n:]
    return sum(losses[i] for i in last) / len(last)


def test_te_spec_is_chosen_on_cuda():
    script = ("import sys\n"
              "from megatron_rpt.config import parse_args\n"
              "from megatron_rpt.training.setup import setup_job\n"
              f"cfg = parse_args({MODEL + TRAIN!r} + sys.argv[1:])\n"
              "job = setup_job(cfg, check_data=False)\n"
              "names = {type(m).__name__ for m in job.state.model[0].modules()}\n"
              "print('MODULES', sorted(names))\n"
              "from megatron_rpt.distributed import destroy_distributed; destroy_distributed()\n")
    for extra, expect in (([], {"TELayerNormColumnParallelLinear", "TERowParallelLinear", "TEDotProductAttention"}),
                          (["--num-experts", "4", "--moe-ffn-hidden-size", "512", "--moe-grouped-gemm"],
                           {"TEGroupedMLP"})):
        proc = subprocess.run([sys.executable, "-c", script, *extra], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "transformer engine: True" in proc.stdout
        modules = proc.stdout.split("MODULES", 1)[1]
        for name in expect:
            assert name in modules, (name, modules)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    if not _hopper():
        pytest.skip("FP8 needs compute capability >= 8.9")
    return pretrain(*MODEL, *TRAIN, tmp=tmp_path_factory.mktemp("bf16"))


@pytest.fixture(scope="module")
def tensorwise_run(tmp_path_factory, bf16_run):
    return pretrain(*MODEL, *TRAIN, *FP8_TENSORWISE, tmp=tmp_path_factory.mktemp("tensorwise"))


FP8_TENSORWISE = ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]


def _assert_follows(fp8: dict, bf16: dict) -> None:
    assert sorted(fp8["losses"]) == list(range(1, ITERS + 1))
    first, last_bf16, last_fp8 = bf16["losses"][1], _tail_mean(bf16["losses"]), _tail_mean(fp8["losses"])
    assert last_bf16 < 0.7 * first, bf16["losses"]              # the mock sequences are learnt
    assert abs(last_fp8 - last_bf16) <= 0.05 * last_bf16, (last_fp8, last_bf16)
    assert any(fp8["losses"][i] != bf16["losses"][i] for i in fp8["losses"]), "FP8 run identical to bf16"


def test_fp8_tensorwise_curve_follows_bf16(bf16_run, tensorwise_run):
    _assert_follows(tensorwise_run, bf16_run)


def test_fp8_delayed_curve_follows_bf16(bf16_run, tmp_path):
    _assert_follows(pretrain(*MODEL, *TRAIN, "--fp8-format", "hybrid", "--fp8-recipe", "delayed",
                             "--fp8-amax-history-len", "16", "--fp8-amax-compute-algo", "max", tmp=tmp_path), bf16_run)


def test_fp8_moe_grouped_gemm(bf16_run, tmp_path):
    moe = pretrain(*MODEL, *TRAIN, *FP8_TENSORWISE, "--num-experts", "4", "--moe-ffn-hidden-size", "512",
                   "--moe-router-topk", "2", "--moe-grouped-gemm", "--moe-aux-loss-coeff", "1e-2", tmp=tmp_path)
    assert all(v == v and v < 20 for v in moe["losses"].values()) and _tail_mean(moe["losses"]) < 0.7 * moe["losses"][1]


def test_fp8_param_gather_follows_fp8(tensorwise_run, tmp_path):
    """FP8 weights (TE's fp8_model_init) with the distributed optimizer's fp32 main copy: the curve stays
    with the plain FP8 run's (DP=1: the distributed optimizer is the plain one, sharded over one rank)."""
    gathered = pretrain(*MODEL, *TRAIN, *FP8_TENSORWISE, "--use-distributed-optimizer", "--fp8-param-gather",
                        tmp=tmp_path)
    assert sorted(gathered["losses"]) == list(range(1, ITERS + 1))
    last, ref = _tail_mean(gathered["losses"]), _tail_mean(tensorwise_run["losses"])
    assert abs(last - ref) <= 0.05 * ref, (last, ref)
