"""The embedded rollout engine (Megatron-Core's static engine on the trainer's model) against a
hand-written reference: full-sequence forwards without a KV cache, log_softmax of the gathered logits.

Checks, at TP=1 and TP=2: greedy rollouts equal the reference's greedy continuation; every returned
log-prob equals the reference log-prob of that token (log_softmax(z / T) at the sampling temperature,
full padded vocabulary, the convention of inference.base) for greedy and temperature/top-k sampled rollouts; a seed reproduces
the samples; the KV-cache engine leaves the model in training mode.
"""

import pytest

from tests.dist_harness import run_ranks
from megatron_rpt.config.arguments import model_flags_argv
from megatron_rpt.config.presets import QWEN3_FAMILY

ARGS = [*model_flags_argv(QWEN3_FAMILY), "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "48", "--max-position-embeddings", "48",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--lr", "1e-3", "--train-iters", "1",
        "--micro-batch-size", "1", "--seed", "7", "--init-method-std", "0.3"]
PROMPTS = [[5, 1, 4, 3, 2, 0, 6], [1, 2], [6, 1, 2, 3]]   # ids < 7: valid in every vocabulary used here


def _job(extra):
    from megatron_rpt.config import parse_rpt_args
    from megatron_rpt.validate import validate_config
    from megatron_rpt.training.setup import setup_job
    cfg = parse_rpt_args(ARGS + list(extra))
    return setup_job(cfg, validate=lambda c, w: validate_config(c, w, pretraining_data=False), check_data=False)


def _reference(job, sequence, temperature):
    """log_softmax(z / T) over the gathered vocabulary of one full forward (no cache) -> [len, V]."""
    import torch
    from megatron.core import tensor_parallel
    model = job.state.model[0]
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([sequence])
        n = ids.shape[1]
        mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
        logits = model(ids, torch.arange(n).unsqueeze(0), mask)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    model.train()
    return torch.log_softmax(logits[0].double() / temperature, dim=-1)


def _engine_case(rank, world, extra, sampling_kw, n, row_multiple=1):
    from megatron_rpt.inference import SamplingConfig
    from megatron_rpt.inference.megatron_engine import MegatronEngine
    job = _job(extra)
    engine = MegatronEngine(job.state.model, job.tokenizer, padded_vocab_size=job.vocab_size,
                            max_batch_size=4, max_sequence_length=48, row_multiple=row_multiple)
    batch_rows = []
    generate = engine.engine.generate
    engine.engine.generate = lambda inference_requests: (batch_rows.append(len(inference_requests)),
                                                         generate(inference_requests=inference_requests))[1]
    sampling = SamplingConfig(**sampling_kw)
    out = engine.generate(PROMPTS, n, sampling)
    again = engine.generate(PROMPTS, n, sampling)
    training = job.state.model[0].training
    rows = []
    for prompt, group in zip(PROMPTS, out):
        for o in group:
            ref = _reference(job, prompt + o.tokens, sampling.temperature)
            ref_lp = [float(ref[len(prompt) - 1 + i, tok]) for i, tok in enumerate(o.tokens)]
            if o.finished:   # the terminating EOD is part of the response, with its log-prob
                assert o.tokens[-1] == job.tokenizer.eod
            greedy = [int(ref[len(prompt) - 1 + i].argmax()) for i in range(len(o.tokens))]
            rows.append({"tokens": o.tokens, "log_probs": o.log_probs, "ref": ref_lp, "greedy": greedy,
                         "finished": o.finished, "eod": job.tokenizer.eod})
    return {"rows": rows, "same_again": [[o.tokens for o in g] for g in out] == [[o.tokens for o in g] for g in again],
            "training": training, "batch_rows": batch_rows}


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_matches_reference(tp):
    out = run_ranks(_engine_case, tp, ["--tensor-model-parallel-size", str(tp)],
                    {"max_new_tokens": 12, "top_k": 1, "seed": 3}, 1, timeout=180)
    for rank_out in out:
        assert rank_out["training"]
        assert rank_out["same_again"]
        for row in rank_out["rows"]:
            assert 1 <= len(row["tokens"]) <= 12
            assert row["tokens"] == row["greedy"]
            assert row["log_probs"] == pytest.approx(row["ref"], abs=2e-4)
    assert out[0]["rows"] == [{**r} for r in out[-1]["rows"]]   # TP ranks return the same rollouts


@pytest.mark.parametrize("tp", [1, 2])
def test_sampled_log_probs_match_reference(tp):
    out = run_ranks(_engine_case, tp, ["--tensor-model-parallel-size", str(tp)],
                    {"max_new_tokens": 10, "temperature": 1.5, "top_k": 50, "seed": 11}, 3, timeout=180)
    rows = out[0]["rows"]
    assert out[0]["same_again"]
    assert len(rows) == 3 * len(PROMPTS)
    assert len({tuple(r["tokens"]) for r in rows}) > len(PROMPTS)  # sampling, not greedy
    for row in rows:
        assert row["log_probs"] == pytest.approx(row["ref"], abs=2e-4)
        assert row["finished"] == (row["tokens"][-1] == row["eod"])
        assert row["eod"] not in row["tokens"][:-1]


def test_eod_ends_rollouts():
    """A small vocabulary makes EOD frequent: finished rollouts end with it (and its log-prob), the
    rest use the whole budget."""
    out = run_ranks(_engine_case, 1, ["--vocab-size", "7", "--make-vocab-size-divisible-by", "1"],
                    {"max_new_tokens": 10, "seed": 1}, 4, timeout=180)[0]
    rows = out["rows"]
    assert any(r["finished"] for r in rows) and any(not r["finished"] for r in rows)
    for row in rows:
        assert row["finished"] == (row["tokens"][-1] == row["eod"])
        assert row["eod"] not in row["tokens"][:-1]
        assert row["finished"] or len(row["tokens"]) == 10
        assert row["log_probs"] == pytest.approx(row["ref"], abs=2e-4)


def test_batches_padded_to_a_row_multiple():
    """row_multiple (FP8: 16) pads every static batch with copies of its first request and drops them: the
    engine sees only multiples, the caller gets exactly its rollouts, each still matching the reference."""
    greedy = {"max_new_tokens": 8, "top_k": 1, "seed": 3}
    plain = run_ranks(_engine_case, 1, [], greedy, 2, timeout=180)[0]
    padded = run_ranks(_engine_case, 1, [], greedy, 2, 4, timeout=180)[0]
    assert plain["batch_rows"] == [4, 2, 4, 2]                 # 3 prompts x 2 = 6 requests, twice
    assert padded["batch_rows"] == [4, 4, 4, 4]
    assert [r["tokens"] for r in padded["rows"]] == [r["tokens"] for r in plain["rows"]]
    for row in padded["rows"]:
        assert row["tokens"] == row["greedy"] and row["log_probs"] == pytest.approx(row["ref"], abs=2e-4)
    sampled = run_ranks(_engine_case, 1, [], {"max_new_tokens": 6, "temperature": 1.3, "seed": 5}, 3, 4,
                        timeout=180)[0]
    assert len(sampled["rows"]) == 9 and all(n % 4 == 0 for n in sampled["batch_rows"])
    for row in sampled["rows"]:
        assert row["log_probs"] == pytest.approx(row["ref"], abs=2e-4)


def _lockstep_case(rank, world, sampling_kw):
    """Two data-parallel ranks with different prompts (rank 0: three, rank 1: one) decode in lockstep:
    rank 1 runs padding batches, every batch has both ranks' shortest and longest prompt, and a rank
    whose rows ended at EOD keeps stepping until the other's have."""
    import torch
    from megatron_rpt.inference import SamplingConfig
    from megatron_rpt.inference.megatron_engine import MegatronEngine
    job = _job(["--vocab-size", "7", "--make-vocab-size-divisible-by", "1"])
    prompts = PROMPTS if rank == 0 else [[3, 3, 3, 3, 3, 3, 3, 3, 3, 1]]
    sampling = SamplingConfig(**sampling_kw)
    forwards = []
    model = job.state.model[0]
    hook = model.register_forward_hook(lambda *a: forwards.append(1))
    lockstep = MegatronEngine(job.state.model, job.tokenizer, padded_vocab_size=job.vocab_size, max_batch_size=4,
                              max_sequence_length=48, lockstep_group=torch.distributed.group.WORLD)
    out = lockstep.generate(prompts, 2, sampling)
    n_lockstep = len(forwards)
    hook.remove()
    plain = MegatronEngine(job.state.model, job.tokenizer, padded_vocab_size=job.vocab_size, max_batch_size=4,
                           max_sequence_length=48).generate(prompts, 2, sampling)
    rows = []
    for prompt, group in zip(prompts, out):
        for o in group:
            ref = _reference(job, prompt + o.tokens, sampling.temperature)
            rows.append({"tokens": o.tokens, "finished": o.finished, "log_probs": o.log_probs,
                         "ref": [float(ref[len(prompt) - 1 + i, t]) for i, t in enumerate(o.tokens)],
                         "greedy": [int(ref[len(prompt) - 1 + i].argmax()) for i in range(len(o.tokens))]})
    return {"rows": rows, "forwards": n_lockstep, "eod": job.tokenizer.eod,
            "plain": [[o.tokens for o in g] for g in plain], "lockstep": [[o.tokens for o in g] for g in out]}


def test_lockstep_decoding_matches_reference_on_uneven_ranks():
    """Expert parallelism's lockstep (every rank runs the same forwards) changes nothing a rank returns:
    greedy rollouts equal the unsynchronised engine's and the no-cache reference; sampled log-probs at T
    match the reference; both ranks ran the same number of forwards although their prompts differ."""
    greedy = run_ranks(_lockstep_case, 2, {"max_new_tokens": 10, "top_k": 1, "seed": 3}, timeout=240)
    sampled = run_ranks(_lockstep_case, 2, {"max_new_tokens": 10, "temperature": 0.8, "seed": 4}, timeout=240)
    for outs in (greedy, sampled):
        assert outs[0]["forwards"] == outs[1]["forwards"]
        assert sum(len(o["rows"]) for o in outs) == 2 * (len(PROMPTS) + 1)
        for out in outs:
            for row in out["rows"]:
                assert row["log_probs"] == pytest.approx(row["ref"], abs=2e-4)
                assert row["finished"] == (row["tokens"][-1] == out["eod"])
                assert out["eod"] not in row["tokens"][:-1]
    for out in greedy:
        assert out["lockstep"] == out["plain"]
        assert all(row["tokens"] == row["greedy"] for row in out["rows"])
    # the case lockstep exists for: responses of different lengths
    assert len({len(row["tokens"]) for out in sampled for row in out["rows"]}) > 1
