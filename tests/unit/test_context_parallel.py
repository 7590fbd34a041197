"""Context parallelism: the per-rank cut of a micro-batch against a hand-built reference, the loss
accounting against the unsplit micro-batch through Megatron-Core's own schedule, DDP and
finalize_model_grads (2 forked gloo ranks), and the start-up refusal where attention has no CP.

The attention itself under CP (Transformer Engine) is checked on GPUs: tests/gpu/test_context_parallel_te.py.
Tests with tensor math run `forked` (never in the pytest process, which forks ranks later)."""

import dataclasses

import pytest
import torch

from megatron_rpt.config import ConfigError, parse_args
from megatron_rpt.validate import validate_config
from megatron_rpt.config.validation import validate_platform
from megatron_rpt.platform import Platform
from megatron_rpt.training.context_parallel import split_for_context_parallel
from tests.dist_harness import forked, run_ranks
from tests.unit.config_checks import config_checkers

B, S = 3, 16


def _batch(length: int = S, mask: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {"tokens": torch.randint(0, 1000, (B, length), generator=g),
           "labels": torch.randint(0, 1000, (B, length), generator=g),
           "loss_mask": (torch.rand(B, length, generator=g, dtype=torch.float64) > 0.3).double(),
           "position_ids": torch.arange(length).unsqueeze(0).expand(B, length).contiguous(),
           "old_log_probs": -torch.rand(B, length, generator=g, dtype=torch.float64),
           "advantages": torch.randn(B, 1, generator=g, dtype=torch.float64),
           "tag": "kept", "nothing": None}
    if mask:
        out["attention_mask"] = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)
    return out


def _reference_positions(cp: int, rank: int, length: int = S) -> list:
    """Sequence positions rank `rank` keeps, written out by hand: chunks rank and 2*cp-1-rank."""
    size = length // (2 * cp)
    first, second = rank, 2 * cp - 1 - rank
    return list(range(first * size, (first + 1) * size)) + list(range(second * size, (second + 1) * size))


@pytest.mark.parametrize("cp", [2, 4])
@forked
def test_each_rank_keeps_chunks_r_and_2cp_minus_1_minus_r(cp):
    batch = _batch()
    for rank in range(cp):
        part = split_for_context_parallel(batch, cp, rank)
        keep = _reference_positions(cp, rank)
        assert len(keep) == S // cp
        for key in ("tokens", "labels", "loss_mask", "position_ids", "old_log_probs"):
            expected = torch.stack([torch.stack([batch[key][b, j] for j in keep]) for b in range(B)])
            assert part[key].dtype == batch[key].dtype
            assert torch.equal(part[key], expected), (key, rank)
        # position ids are the original positions of the kept tokens (RoPE / learned positions)
        assert part["position_ids"][0].tolist() == keep
        # attention mask: queries cut, keys whole
        mask = part["attention_mask"]
        assert mask.shape == (1, 1, S // cp, S)
        assert torch.equal(mask, batch["attention_mask"][:, :, keep, :])
        # values without a sequence dimension, and non-tensors, pass unchanged (same objects)
        assert part["advantages"] is batch["advantages"]
        assert part["tag"] == "kept" and part["nothing"] is None
        assert set(part) == set(batch)
    assert torch.equal(batch["tokens"], _batch()["tokens"])  # the input is not modified


@forked
def test_cp2_chunk_order_spelled_out():
    batch = {"tokens": torch.arange(8).unsqueeze(0)}
    assert split_for_context_parallel(batch, 2, 0)["tokens"].tolist() == [[0, 1, 6, 7]]
    assert split_for_context_parallel(batch, 2, 1)["tokens"].tolist() == [[2, 3, 4, 5]]
    assert split_for_context_parallel(batch, 4, 1)["tokens"].tolist() == [[1, 6]]


@pytest.mark.parametrize("cp", [2, 4])
@forked
def test_all_ranks_reconstruct_the_batch(cp):
    batch = _batch()
    parts = [split_for_context_parallel(batch, cp, r) for r in range(cp)]
    size = S // (2 * cp)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "old_log_probs"):
        chunks = [None] * (2 * cp)
        for r, part in enumerate(parts):
            chunks[r], chunks[2 * cp - 1 - r] = part[key][:, :size], part[key][:, size:]
        assert torch.equal(torch.cat(chunks, dim=1), batch[key]), key
    mask_chunks = [None] * (2 * cp)
    for r, part in enumerate(parts):
        m = part["attention_mask"]
        mask_chunks[r], mask_chunks[2 * cp - 1 - r] = m[:, :, :size], m[:, :, size:]
    assert torch.equal(torch.cat(mask_chunks, dim=2), batch["attention_mask"])


@pytest.mark.parametrize("cp", [2, 4])
@forked
def test_loss_sums_and_token_counts_add_up(cp):
    batch = _batch()
    per_token = torch.rand(B, S, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batch["per_token_loss"] = per_token
    parts = [split_for_context_parallel(batch, cp, r) for r in range(cp)]
    sums = [torch.sum(p["per_token_loss"] * p["loss_mask"]) for p in parts]
    counts = [p["loss_mask"].sum() for p in parts]
    assert torch.allclose(sum(sums), torch.sum(per_token * batch["loss_mask"]), rtol=0, atol=1e-12)
    assert sum(counts).item() == batch["loss_mask"].sum().item()
    # The accounting in training.context_parallel.loss_terms_for_schedule, replayed: Megatron-Core
    # divides each rank's returned loss by its returned count, DDP averages over the CP ranks.
    total = sum(counts)
    assert torch.allclose(sum(cp * s / total for s in sums) / cp, sum(sums) / total, rtol=1e-12)
    # whereas per-rank means (what Megatron-LM's loss_func returns) are not the unsplit mean here
    assert not torch.allclose(sum(s / c for s, c in zip(sums, counts)) / cp, sum(sums) / total, rtol=1e-6)


@forked
def test_cp_size_1_returns_the_same_object():
    batch = _batch(length=7)   # neither divisible nor checked: nothing is cut
    batch["odd"] = torch.zeros(B, 5)
    assert split_for_context_parallel(batch, 1, 0) is batch


@pytest.mark.parametrize("length,cp", [(12, 4), (10, 2), (6, 4)])
@forked
def test_length_not_divisible_names_length_and_cp(length, cp):
    with pytest.raises(ValueError, match=rf"sequence length {length} is not divisible by 2 x context-parallel "
                                         rf"size {cp} = {2 * cp}"):
        split_for_context_parallel(_batch(length=length), cp, 0)


@pytest.mark.parametrize("key,value,match", [
    ("already_cut", torch.zeros(B, S // 2), r"'already_cut' has shape \(3, 8\): size 8 at dimension 1 is neither"),
    ("cu_seqlens", torch.zeros(B, S + 1, dtype=torch.int32), r"'cu_seqlens' has shape \(3, 17\)"),
    ("pair_bias", torch.zeros(B, S, S), r"'pair_bias' .* appears at dimension 1 and again later"),
    ("attention_mask", torch.ones(1, 1, S // 2, S, dtype=torch.bool), r"expected \[b\|1, 1, 16, 16\]"),
    ("attention_mask", torch.ones(B, S, dtype=torch.bool), r"'attention_mask' has shape \(3, 16\)"),
])
@forked
def test_ambiguous_tensors_raise(key, value, match):
    batch = _batch(mask=False)
    batch[key] = value
    with pytest.raises(ValueError, match=match):
        split_for_context_parallel(batch, 2, 0)


@forked
def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="needs a 'tokens' tensor"):
        split_for_context_parallel({"labels": torch.zeros(B, S)}, 2, 0)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        split_for_context_parallel(_batch(), 2, 2)
    with pytest.raises(ValueError, match="positive integer"):
        split_for_context_parallel(_batch(), 0, 0)


@forked
def test_split_for_this_cp_rank_without_parallel_state_is_identity():
    from megatron_rpt.training.context_parallel import context_parallel_size_and_rank, split_for_this_cp_rank
    batch = _batch()
    assert context_parallel_size_and_rank() == (1, 0)
    assert split_for_this_cp_rank(batch) is batch


# ---------------------------------------------------------------------------------------------
# Loss and gradient accounting through Megatron-Core (schedule, DDP, finalize_model_grads)
# ---------------------------------------------------------------------------------------------

VOCAB, HIDDEN, MBS, N_MICRO = 32, 8, 2, 2


def _micro_batches() -> list:
    """Two micro-batches whose loss tokens are spread unevenly over the CP chunks (so per-rank means
    differ from the micro-batch mean)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(N_MICRO):
        tokens = torch.randint(0, VOCAB, (MBS, S), generator=g)
        mask = torch.ones(MBS, S)
        mask[:, : 4 + 2 * i] = 0.0                  # the first chunk (CP rank 0) loses its tokens
        mask[1, torch.randperm(S, generator=g)[:5]] = 0.0
        out.append({"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1), "loss_mask": mask,
                    "position_ids": torch.arange(S).unsqueeze(0).expand(MBS, S).contiguous()})
    return out


def _per_token_model(config):
    """A model without attention (per-token embedding + MLP + CE), so the CP cut is exact for it and the
    only thing under test is the accounting; positions enter through a learned position embedding."""
    from megatron.core.transformer.enums import ModelType
    from megatron.core.transformer.module import MegatronModule

    class PerToken(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            self.embedding = torch.nn.Embedding(VOCAB, HIDDEN)
            self.position = torch.nn.Embedding(S, HIDDEN)
            self.out = torch.nn.Linear(HIDDEN, VOCAB)

        def set_input_tensor(self, tensor):
            pass

        def forward(self, tokens, position_ids, attention_mask, labels):
            h = torch.tanh(self.embedding(tokens) + self.position(position_ids))
            logits = self.out(h)
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                     reduction="none").view_as(labels)

    return PerToken()


def _accounting_worker(rank, world, cp, broken_terms=False):
    from contextlib import nullcontext
    from unittest import mock

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from megatron_rpt import distributed as dist
    from megatron_rpt.training import step

    dist.init_distributed(backend="gloo", device_type="cpu", context_parallel_size=cp)
    device = torch.device("cpu")
    results = {}
    for per_token_loss in (False, True):
        config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1,
                                   context_parallel_size=cp, calculate_per_token_loss=per_token_loss,
                                   use_cpu_initialization=True)
        torch.manual_seed(0)
        ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                      module=_per_token_model(config))
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = ddp.no_sync
        ddp.zero_grad_buffer()
        forward_step = step.make_forward_step(None, device)
        identity = lambda loss, n, **kw: (loss, n)  # noqa: E731 - Megatron-LM's (S_r, N_r)
        with mock.patch.object(step, "loss_terms_for_schedule", identity) if broken_terms else nullcontext():
            losses = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(_micro_batches()), model=[ddp],
                num_microbatches=N_MICRO, seq_length=S, micro_batch_size=MBS, forward_only=False)
        loss, tokens, _ = step._reduce_losses(losses, device)
        grads = {name: p.main_grad.detach().clone() for name, p in ddp.module.named_parameters()}
        results[per_token_loss] = (loss, tokens, grads)
    return results


@pytest.fixture(scope="module")
def unsplit():
    return run_ranks(_accounting_worker, 1, 1)[0]


@pytest.mark.parametrize("per_token_loss", [False, True], ids=["mean-per-micro-batch", "per-token-loss"])
def test_cp2_loss_and_gradients_equal_the_unsplit_micro_batches(unsplit, per_token_loss):
    ranks = run_ranks(_accounting_worker, 2, 2)
    ref_loss, ref_tokens, ref_grads = unsplit[per_token_loss]
    for result in ranks:
        loss, tokens, grads = result[per_token_loss]
        assert tokens == ref_tokens
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_per_rank_means_would_be_wrong(unsplit):
    """The control: Megatron-LM's (local sum, local count) under CP gives other gradients for this
    batch without --calculate-per-token-loss (and the same with it)."""
    result = run_ranks(_accounting_worker, 2, 2, broken_terms=True)[0]
    ref_grads = unsplit[False][2]
    worst = max(((result[False][2][n] - g).norm() / g.norm()).item() for n, g in ref_grads.items())
    assert worst > 0.1   # 0.38 measured; the exact accounting is within 1e-7
    for name, g in result[True][2].items():
        torch.testing.assert_close(g, unsplit[True][2][name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# Start-up checks
# ---------------------------------------------------------------------------------------------

BASE = ["--model-preset", "tiny", "--lr", "1e-3", "--train-iters", "10", "--mock-data", "--vocab-size", "512"]
CPU = Platform("cpu", "gloo", False, False, "0.16.1", False)
CUDA_TE = Platform("cuda", "nccl", True, False, "0.16.1", True)
problems, one_problem = config_checkers(BASE)


def test_seq_length_must_be_a_multiple_of_2_cp():
    msg = one_problem(["--context-parallel-size", "4", "--seq-length", "36", "--max-position-embeddings", "64"],
                      world_size=4)
    assert msg == ("--seq-length 36 is not divisible by 2 x --context-parallel-size 4 = 8 (each context-parallel "
                   "rank keeps two of 2 x CP equal chunks)")
    validate_config(parse_args(BASE + ["--context-parallel-size", "4", "--seq-length", "32"]), 4)


def test_cpu_refuses_context_parallel():
    cfg = validate_config(parse_args(BASE + ["--context-parallel-size", "2"]), 2)
    with pytest.raises(ConfigError) as e:
        validate_platform(cfg, CPU)
    assert e.value.problems == [
        "--context-parallel-size 2 needs Transformer Engine's attention (TEDotProductAttention; Megatron-Core's "
        "local attention has no context parallelism); this platform has none (a cpu run): use "
        "--context-parallel-size 1"]
    with pytest.raises(ConfigError, match=r"none \(CUDA, but Transformer Engine does not import"):
        validate_platform(cfg, dataclasses.replace(CUDA_TE, transformer_engine=False))
    validate_platform(cfg, CUDA_TE)
    validate_platform(validate_config(parse_args(BASE), 1), CPU)


def test_setup_job_refuses_cp_on_cpu_before_any_process_group(monkeypatch):
    from megatron_rpt.training.setup import setup_job

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29999")):
        monkeypatch.setenv(name, value)
    cfg = parse_args(BASE + ["--context-parallel-size", "2", "--use-cpu"])
    with pytest.raises(ConfigError, match=r"--context-parallel-size 2 needs Transformer Engine's attention .* "
                                          r"this platform has none \(a cpu run \(--use-cpu\)\)"):
        setup_job(cfg, check_data=False)
    assert not torch.distributed.is_initialized()


def test_rpt_embedded_engine_refuses_context_parallel():
    from megatron_rpt.config import parse_rpt_args
    from megatron_rpt.validate import validate_rpt_config

    argv = BASE + ["--rpt-data", "tasks.jsonl", "--rpt-max-response-length", "64", "--rpt-contexts-per-step", "4",
                   "--rpt-group-size", "4", "--context-parallel-size", "2"]
    with pytest.raises(ConfigError) as e:
        validate_rpt_config(parse_rpt_args(argv), 2, check_files=False)
    assert e.value.problems == ["--rollout-engine megatron with --context-parallel-size 2: Megatron-Core's inference "
                                "engine has no context parallelism; use --rollout-engine openai (only the trainer is "
                                "context parallel then) or --context-parallel-size 1"]
    validate_rpt_config(parse_rpt_args(argv[:-2]), 2, check_files=False)
    try:   # an external engine: nothing about context parallelism (whatever else its flags need)
        validate_rpt_config(parse_rpt_args(argv + ["--rollout-engine", "openai"]), 2, check_files=False)
    except ConfigError as err:
        assert not [x for x in err.problems if "context" in x], err.problems
