"""GPU only: context parallelism with Transformer Engine's attention gives the loss and gradients of
the unsplit batch: CP=2 against CP=1, same weights, same micro-batches, the pretraining forward step
(`training.step.ForwardStep`: per-rank cut, loss accounting) through Megatron-Core's schedule, DDP and
finalize_model_grads.

Skipped without CUDA + Transformer Engine, and without 2 GPUs (NCCL does not put two ranks of one
communicator on one GPU). Each configuration is a fresh `torch.distributed.run` job running this
file as a script. What is checked, with and without --calculate-per-token-loss, on a batch whose loss
tokens are spread unevenly over the CP ranks (1:2, where per-rank token means would be wrong):
- the reported loss (token mean over the global batch) within 2e-3 relative, the token count exactly;
- every parameter's gradient (DDP's fp32 main_grad after finalize_model_grads): relative L2 error
  of the whole gradient <= 2e-2 and of each tensor <= 5e-2, cosine >= 0.999.
Tolerances are bf16's: TE's context-parallel attention needs its flash or cuDNN fused backends, which
take fp16/bf16 only, so there is no fp32 CP run to compare bit-for-bit; CP=2 changes only the order of
the attention's online-softmax merges and the GEMM shapes (bf16 outputs differ by a few ulps, 2^-8
relative each). The measured errors are printed (pytest -s). Four jobs of a 4-layer model, about
3 minutes on two H100s (estimated, not yet measured).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from megatron_rpt.config.arguments import model_flags_argv
from megatron_rpt.config.presets import QWEN3_FAMILY

ROOT = Path(__file__).resolve().parents[2]

MODEL = [*model_flags_argv(QWEN3_FAMILY), "--num-layers", "4", "--hidden-size", "512", "--ffn-hidden-size", "1536", "--num-attention-heads", "8",
         "--num-query-groups", "4", "--kv-channels", "64", "--seq-length", "256", "--max-position-embeddings", "256",
         "--vocab-size", "4096"]
TRAIN = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--train-iters", "1",
         "--bf16", "--seed", "7", "--eval-interval", "0"]
SEQ, MBS, N_MICRO, VOCAB = 256, 2, 2, 4096
LOSS_RTOL, GRAD_REL_TOTAL, GRAD_REL_TENSOR, MIN_COSINE = 2e-3, 2e-2, 5e-2, 0.999


def _cuda_te_gpus() -> int:
    try:
        import torch
        if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
            return 0
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


pytestmark = [pytest.mark.skipif(_cuda_te_gpus() == 0, reason="needs CUDA and Transformer Engine"),
              pytest.mark.skipif(0 < _cuda_te_gpus() < 2, reason="context parallel 2 needs 2 GPUs")]


def _micro_batches() -> list:
    """Deterministic micro-batches (CPU tensors; the forward step moves them). CP rank 0 keeps
    positions [0, 64) + [192, 256), rank 1 [64, 192): [0, 64) carries no loss, so rank 0 has about
    half as many loss tokens as rank 1 (per-rank token means would weight its tokens twice as much)."""
    import torch

    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(N_MICRO):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        mask = (torch.rand(MBS, SEQ, generator=g) > 0.1).float()
        mask[:, :64] = 0.0
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": mask,
                    "position_ids": torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ).contiguous()})
    return out


def _worker(cp: int, per_token_loss: bool, weights: str, out: str) -> None:
    """One job (every rank): build the model, take CP=1's weights, run one forward/backward, save
    the reported loss and the gradients (rank 0)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rpt.config import parse_args
    from megatron_rpt.distributed import destroy_distributed
    from megatron_rpt.loss import get_loss_function
    from megatron_rpt.training.setup import setup_job
    from megatron_rpt.training.step import _reduce_losses, make_forward_step

    cfg = parse_args(MODEL + TRAIN + ["--context-parallel-size", str(cp)]
                     + (["--calculate-per-token-loss"] if per_token_loss else []))
    job = setup_job(cfg, check_data=False)
    assert job.platform.transformer_engine
    model = job.state.model
    named = dict(model[0].named_parameters())
    if cp == 1:
        torch.save({n: p.detach().cpu() for n, p in named.items()}, weights)
    else:
        saved = torch.load(weights)
        assert set(saved) == set(named)
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(saved[n].to(p.device))
    forward_step = make_forward_step(get_loss_function(cfg, job.tokenizer.vocab_size), job.device)
    for chunk in model:
        chunk.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(_micro_batches()), model=model,
        num_microbatches=N_MICRO, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
    loss, tokens, _ = _reduce_losses(losses, job.device)
    grads = {n: p.main_grad.detach().float().cpu() for n, p in named.items()}
    if torch.distributed.get_rank() == 0:
        torch.save({"loss": loss, "tokens": tokens, "grads": grads}, out)
    destroy_distributed()


def _run(cp: int, per_token_loss: bool, tmp: Path) -> dict:
    import torch

    out = tmp / f"cp{cp}_{int(per_token_loss)}.pt"
    weights = tmp / f"weights_{int(per_token_loss)}.pt"     # written by the CP=1 job, read by CP=2's
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cp),
           str(Path(__file__).resolve()), str(cp), str(int(per_token_loss)), str(weights), str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    (tmp / f"cp{cp}_{int(per_token_loss)}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("per_token_loss", [False, True], ids=["mean-per-micro-batch", "per-token-loss"])
def test_cp2_equals_cp1(per_token_loss, tmp_path):
    import torch

    ref = _run(1, per_token_loss, tmp_path)     # writes the weights CP=2 loads
    cp2 = _run(2, per_token_loss, tmp_path)
    expected_tokens = int(sum(b["loss_mask"].sum().item() for b in _micro_batches()))
    assert ref["tokens"] == cp2["tokens"] == expected_tokens
    assert cp2["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL)
    names = sorted(ref["grads"])
    assert names == sorted(cp2["grads"])
    flat_ref = torch.cat([ref["grads"][n].flatten() for n in names]).double()
    flat_cp2 = torch.cat([cp2["grads"][n].flatten() for n in names]).double()
    total = ((flat_cp2 - flat_ref).norm() / flat_ref.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(flat_cp2, flat_ref, dim=0).item()
    per_tensor = {n: ((cp2["grads"][n] - ref["grads"][n]).double().norm()
                      / ref["grads"][n].double().norm().clamp_min(1e-30)).item() for n in names}
    worst = max(per_tensor, key=per_tensor.get)
    print(f"\nCP=2 vs CP=1 (per_token_loss={per_token_loss}): loss {cp2['loss']:.6f} vs {ref['loss']:.6f}; "
          f"gradient relative error {total:.2e}, cosine {cosine:.6f}, worst tensor {worst} {per_tensor[worst]:.2e}")
    assert total <= GRAD_REL_TOTAL and cosine >= MIN_COSINE, (total, cosine)
    assert per_tensor[worst] <= GRAD_REL_TENSOR, (worst, per_tensor[worst])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4])
