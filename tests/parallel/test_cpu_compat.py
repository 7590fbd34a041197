"""Multi-rank (gloo) tests of the Megatron-Core CPU compatibility layer, one per patch.

Each test runs a real Megatron-Core operation on forked ranks and compares it with a reference
(TP=1, PP=1, EP=1, torch AdamW, an uninterrupted run). Where a patch matters, the same operation
is also run in workers where that patch is undone (`uninstall_patches`) to show the failure it
fixes: an exception for most, wrong numbers for the silent ones (P2 restore, P10, batched p2p).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch

from megatron_rpt.platform import setup_platform

setup_platform(force_cpu=True)  # before megatron.core is imported, as the entry points do

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed import finalize_model_grads  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core import dist_checkpointing  # noqa: E402

from megatron_rpt.platform.compat.registry import installed_patches, uninstall_patches  # noqa: E402
from megatron_rpt.training.checkpointing import prepare_optimizer_for_load  # noqa: E402
from tests.dist_harness import RankError, run_ranks  # noqa: E402

VOCAB, SEQ, MBS = 512, 32, 2
# The layouts are compared in float64 (the model's params and pipeline dtype): two summation orders
# then agree to ~1e-13 relative on values of order 1-100, so 1e-10 is exact, while a wrong layout is
# off by > 1e-3. (In fp32 the same comparisons sit a few ulps apart and depend on the CPU's kernels.)
EXACT = 1e-10


# --------------------------------------------------------------------------------------------
# Tiny model + data helpers (run inside the workers)
# --------------------------------------------------------------------------------------------


def _config(**overrides: Any) -> TransformerConfig:
    kw: dict[str, Any] = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float64,
        pipeline_dtype=torch.float64,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def _gpt_chunks(cfg: TransformerConfig, seed: int = 1, vpp: int | None = None, **spec_kw: Any) -> list[GPTModel]:
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    spec = get_gpt_layer_local_spec(**spec_kw)
    chunks = []
    for stage in range(vpp or 1):
        vp = stage if vpp else None
        chunks.append(
            GPTModel(
                config=cfg,
                transformer_layer_spec=spec,
                vocab_size=VOCAB,
                max_sequence_length=SEQ,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                share_embeddings_and_output_weights=False,
                vp_stage=vp,
            ).to(cfg.params_dtype)   # the local spec's norms are created in the default dtype
        )
    return chunks


def _batch(index: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + index)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "position_ids": torch.arange(SEQ).expand(MBS, SEQ),
    }


def _global_name(name: str, module: torch.nn.Module, ep_rank: int = 0, local_experts: int = 0) -> str:
    """Parameter name in a PP=1/EP=1 model: global layer index, global expert index."""
    m = re.match(r"(decoder\.layers\.)(\d+)(\..*)", name)
    if m:
        layer = module.decoder.layers[int(m.group(2))]
        name = f"{m.group(1)}{layer.layer_number - 1}{m.group(3)}"
    if local_experts:
        name = re.sub(
            r"local_experts\.(\d+)\.",
            lambda e: f"local_experts.{ep_rank * local_experts + int(e.group(1))}.",
            name,
        )
    return name


def _load_reference(chunks: list[GPTModel], ref: dict[str, torch.Tensor], ep_rank: int = 0, local_experts: int = 0) -> None:
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                p.copy_(ref[_global_name(name, chunk, ep_rank, local_experts)])


def _loss_step(data: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple:
    out = model(data["tokens"], data["position_ids"], None, labels=data["labels"])

    def loss_func(per_token: torch.Tensor) -> tuple:
        loss = per_token.mean()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def _fwd_bwd(chunks: list, num_mb: int, cfg: TransformerConfig) -> list[float]:
    batches = [_batch(i) for i in range(num_mb)]
    iters = [iter(batches) for _ in chunks]

    def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple:
        return _loss_step(next(data_iterator), model)

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_mb,
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=False,
    )
    return [float(d["loss"]) for d in losses]


def _grads(chunks: list, ep_rank: int = 0, local_experts: int = 0) -> dict[str, torch.Tensor]:
    out = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            out[_global_name(name, chunk, ep_rank, local_experts)] = g.detach().clone()
    return out


def _assert_close(a: dict, b: dict, tol: float) -> float:
    worst = 0.0
    for k, v in a.items():
        worst = max(worst, (v - b[k]).abs().max().item())
    assert worst <= tol, f"max abs diff {worst} > {tol}"
    return worst


# --------------------------------------------------------------------------------------------
# P2: CUDA RNG tracker on the CPU generator
# --------------------------------------------------------------------------------------------


def _rng_worker(rank: int, world: int, undo: tuple[str, ...]) -> dict:
    uninstall_patches(undo)
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    torch.manual_seed(7)
    model_parallel_cuda_manual_seed(123)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    after = torch.get_rng_state()
    return {"inside": inside, "restored": bool(torch.equal(before, after))}


def test_p2_rng_tracker_fork_uses_tp_seed_and_restores_state() -> None:
    res = run_ranks(_rng_worker, 2, ())
    for rank, r in enumerate(res):
        # Megatron's tensor-parallel seed: seed + 2718 + tp_rank.
        expected = torch.rand(4, generator=torch.Generator().manual_seed(123 + 2718 + rank))
        assert torch.equal(r["inside"], expected)
        assert r["restored"]
    assert not torch.equal(res[0]["inside"], res[1]["inside"])
    with pytest.raises(RankError, match="CUDA|cuda"):
        run_ranks(_rng_worker, 1, ("P2",))


# --------------------------------------------------------------------------------------------
# P3: TP=2 GPTModel logits equal TP=1
# --------------------------------------------------------------------------------------------


def _logits_worker(rank: int, world: int, undo: tuple[str, ...]) -> torch.Tensor:
    uninstall_patches(undo)
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    (model,) = _gpt_chunks(_config(tensor_model_parallel_size=world))
    data = _batch(0)
    logits = model(data["tokens"], data["position_ids"], None)
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits).detach()


def test_p3_tp2_logits_equal_tp1() -> None:
    (ref,) = run_ranks(_logits_worker, 1, ())
    tp2 = run_ranks(_logits_worker, 2, ())
    assert ref.shape == (MBS, SEQ, VOCAB)
    for out in tp2:
        assert (out - ref).abs().max().item() < EXACT
    with pytest.raises(RankError, match="CUDA|cuda"):
        run_ranks(_logits_worker, 2, ("P3",))


# --------------------------------------------------------------------------------------------
# P4 + the batched-p2p platform setting: interleaved pipeline PP=2 x VPP=2 vs PP=1
# --------------------------------------------------------------------------------------------

_PP_LAYERS, _PP_MB = 4, 4


def _pp_reference(rank: int, world: int) -> tuple[dict, list[float], dict]:
    ps.initialize_model_parallel()
    cfg = _config(num_layers=_PP_LAYERS)
    chunks = _gpt_chunks(cfg)
    weights = {k: v.detach().clone() for k, v in chunks[0].named_parameters()}
    losses = _fwd_bwd(chunks, _PP_MB, cfg)
    return weights, losses, _grads(chunks)


def _pp_worker(rank: int, world: int, ref: dict, batch_p2p: bool, undo: tuple[str, ...]) -> tuple[list[float], dict]:
    uninstall_patches(undo)
    ps.initialize_model_parallel(pipeline_model_parallel_size=world, virtual_pipeline_model_parallel_size=2)
    cfg = _config(
        num_layers=_PP_LAYERS,
        pipeline_model_parallel_size=world,
        virtual_pipeline_model_parallel_size=2,
        batch_p2p_comm=batch_p2p,
    )
    chunks = _gpt_chunks(cfg, vpp=2)
    _load_reference(chunks, ref)
    losses = _fwd_bwd(chunks, _PP_MB, cfg)
    return losses, _grads(chunks)


def test_p4_interleaved_pipeline_matches_pp1_only_without_batched_p2p() -> None:
    platform = setup_platform(force_cpu=True)
    assert platform.batch_p2p_comm is False
    ((weights, ref_losses, ref_grads),) = run_ranks(_pp_reference, 1)
    res = run_ranks(_pp_worker, 2, weights, platform.batch_p2p_comm, ())
    grads = {**res[0][1], **res[1][1]}
    assert grads.keys() == ref_grads.keys()
    _assert_close(grads, ref_grads, EXACT)
    assert res[1][0] == pytest.approx(ref_losses, abs=EXACT)  # losses live on the last stage

    # Upstream behaviour on gloo (docs/megatron-core-on-cpu.md, settings): with batch_isend_irecv the previous and
    # next stage are the same peer, gloo matches in posting order and the messages cross.
    # Depending on timing the crossed messages give wrong numbers or a gloo size-mismatch error.
    try:
        crossed = run_ranks(_pp_worker, 2, weights, True, ())
    except RankError as err:
        assert "gloo" in str(err).lower() or "connection" in str(err).lower(), err
    else:
        crossed_grads = {**crossed[0][1], **crossed[1][1]}
        worst = max((crossed_grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
        assert worst > 1e-3, "batched p2p on gloo became exact: Platform.batch_p2p_comm could be True"

    with pytest.raises(RankError, match="CUDA|cuda"):
        run_ranks(_pp_worker, 2, weights, False, ("P4",))


# --------------------------------------------------------------------------------------------
# P5, P6, P13: MoE with the alltoall dispatcher, EP=2 vs EP=1
# --------------------------------------------------------------------------------------------

_EXPERTS = 4


def _moe_config(ep: int) -> TransformerConfig:
    return _config(
        num_moe_experts=_EXPERTS,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0,
        add_bias_linear=False,  # with bias, EP=1 experts crash upstream (transformer/mlp.py)
        expert_model_parallel_size=ep,
    )


def _moe_worker(rank: int, world: int, ref: dict | None, batches: int, undo: tuple[str, ...]) -> tuple:
    """EP=world MoE GPT; rank r runs batch r (or, at world 1, `batches` batches accumulated)."""
    uninstall_patches(undo)
    ps.initialize_model_parallel(expert_model_parallel_size=world)
    chunks = _gpt_chunks(_moe_config(world), num_experts=_EXPERTS)
    ep_rank = ps.get_expert_model_parallel_rank()
    local = _EXPERTS // world if world > 1 else 0
    if ref is not None:
        _load_reference(chunks, ref, ep_rank, local)
    weights = {k: v.detach().clone() for k, v in chunks[0].named_parameters()}
    losses = []
    for b in range(rank, rank + batches):
        data = _batch(b)
        loss = chunks[0](data["tokens"], data["position_ids"], None, labels=data["labels"]).mean()
        loss.backward()
        losses.append(loss.item())
    return weights, losses, _grads(chunks, ep_rank, local)


def test_p5_p6_p13_moe_alltoall_ep2_equals_ep1() -> None:
    ((weights, _, _),) = run_ranks(_moe_worker, 1, None, 1, ())
    ((_, ref_losses, ref_grads),) = run_ranks(_moe_worker, 1, weights, 2, ())
    res = run_ranks(_moe_worker, 2, weights, 1, ())
    assert [r[1][0] for r in res] == pytest.approx(ref_losses, abs=EXACT)
    # Expert grads collect both ranks' tokens through the alltoall; dense grads are per rank.
    experts = {**res[0][2], **res[1][2]}
    dense = {k: res[0][2][k] + res[1][2][k] for k in res[0][2] if "local_experts" not in k}
    experts = {k: v for k, v in experts.items() if "local_experts" in k}
    assert len(experts) == _EXPERTS * 2 * 2  # fc1, fc2 per expert per layer
    assert min(v.abs().sum().item() for v in experts.values()) > 0  # every expert got tokens
    _assert_close({**experts, **dense}, ref_grads, EXACT)
    needed = [("P5", "CUDA|cuda"), ("P6", "incompatible function arguments")]
    if "P13" in installed_patches():  # megatron-core < 0.17 only (0.19 defines te_general_gemm = None)
        needed.append(("P13", "te_general_gemm"))
    for pid, pattern in needed:
        with pytest.raises(RankError, match=pattern):
            run_ranks(_moe_worker, 2, weights, 1, (pid,))


# --------------------------------------------------------------------------------------------
# P7: sequence parallel with the torch norm (TP=2 + SP grads equal TP=1)
# --------------------------------------------------------------------------------------------


def _sp_worker(rank: int, world: int, undo: tuple[str, ...]) -> tuple[float, dict]:
    uninstall_patches(undo)
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    cfg = _config(tensor_model_parallel_size=world, sequence_parallel=world > 1)
    (model,) = _gpt_chunks(cfg)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
    cfg.finalize_model_grads_func = finalize_model_grads
    data = _batch(0)
    loss = ddp(data["tokens"], data["position_ids"], None, labels=data["labels"]).mean()
    loss.backward()
    finalize_model_grads([ddp])
    norms = {k: v for k, v in _grads([model]).items() if "layernorm" in k or "final_layernorm" in k}
    return loss.item(), norms


def test_p7_sequence_parallel_norm_grads_equal_tp1() -> None:
    ((ref_loss, ref_norms),) = run_ranks(_sp_worker, 1, ())
    res = run_ranks(_sp_worker, 2, ())
    assert ref_norms
    for loss, norms in res:
        assert abs(loss - ref_loss) < EXACT
        _assert_close(norms, ref_norms, EXACT)
    with pytest.raises(RankError, match="sequence parallel not supported"):
        run_ranks(_sp_worker, 2, ("P7",))


# --------------------------------------------------------------------------------------------
# P8 (+P3..P5): DDP + distributed optimizer, one step at DP=2 equals torch AdamW
# --------------------------------------------------------------------------------------------

_OPT = dict(lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0)
# Megatron's optimizer wraps fp32/fp16/bf16 parameters only: the optimizer tests run in fp32.
_FP32 = dict(params_dtype=torch.float32, pipeline_dtype=torch.float32)


def _build_trainable(seed: int) -> tuple:
    cfg = _config(**_FP32)
    (model,) = _gpt_chunks(cfg, seed=seed)
    ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    ddp = DistributedDataParallel(cfg, ddp_cfg, model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", use_distributed_optimizer=True, **_OPT), [ddp]
    )
    # wd_mult (0 for biases and 1-D params) only takes effect through OptimizerParamScheduler;
    # without one every group would decay at the full rate. Apply it as the scheduler does.
    for group in opt.param_groups:
        group["weight_decay"] = _OPT["weight_decay"] * group["wd_mult"]
    return model, ddp, opt


def _train_step(ddp: Any, opt: Any, step: int, rank: int, world: int) -> None:
    ddp.zero_grad_buffer()
    opt.zero_grad()
    data = _batch(step * world + rank)
    ddp(data["tokens"], data["position_ids"], None, labels=data["labels"]).mean().backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok


def _opt_worker(rank: int, world: int, undo: tuple[str, ...]) -> tuple[dict, dict]:
    uninstall_patches(undo)
    ps.initialize_model_parallel()
    model, ddp, opt = _build_trainable(seed=1)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    _train_step(ddp, opt, 0, rank, world)
    return init, {k: v.detach().clone() for k, v in model.named_parameters()}


def _adamw_reference(init: dict, world: int) -> dict:
    """torch.optim.AdamW on a TP=1 copy, mean loss over the DP ranks' batches, clip 1.0."""
    model = _gpt_chunks(_config(**_FP32), seed=1)[0]
    model.load_state_dict({**model.state_dict(), **init})
    params = dict(model.named_parameters())
    no_wd = [p for n, p in params.items() if n.endswith(".bias") or p.ndim == 1]
    wd = [p for n, p in params.items() if not (n.endswith(".bias") or p.ndim == 1)]
    opt = torch.optim.AdamW(
        [{"params": wd, "weight_decay": _OPT["weight_decay"]}, {"params": no_wd, "weight_decay": 0.0}],
        lr=_OPT["lr"], betas=(_OPT["adam_beta1"], _OPT["adam_beta2"]), eps=_OPT["adam_eps"],
    )
    loss = sum(
        model(b["tokens"], b["position_ids"], None, labels=b["labels"]).mean()
        for b in (_batch(r) for r in range(world))
    ) / world
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), _OPT["clip_grad"])
    opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _ref_worker(rank: int, world: int, init: dict, dp: int) -> dict:
    ps.initialize_model_parallel()
    return _adamw_reference(init, dp)


def test_p8_ddp_distributed_optimizer_step_equals_torch_adamw() -> None:
    res = run_ranks(_opt_worker, 2, ())
    init, after = res[0]
    assert all(torch.equal(after[k], res[1][1][k]) for k in after)  # DP replicas agree
    (ref,) = run_ranks(_ref_worker, 1, init, 2)
    moved = max((after[k] - init[k]).abs().max().item() for k in after)
    assert moved > 1e-3  # the step did something
    _assert_close(after, ref, 1e-6)
    with pytest.raises(RankError, match="FloatTensor|type"):
        run_ranks(_opt_worker, 2, ("P8",))


# --------------------------------------------------------------------------------------------
# P9, P10, W1: distributed-optimizer checkpoint resume equals an uninterrupted run
# --------------------------------------------------------------------------------------------

_STEPS_BEFORE, _STEPS_AFTER = 2, 2


def _sharded(model: Any, opt: Any, loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": opt.sharded_state_dict(
            model_sd, is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
        ),
    }


def _resume_worker(rank: int, world: int, ckpt_dir: str, mode: str, undo: tuple[str, ...]) -> dict:
    """mode: 'straight' (no checkpoint) or 'resume' (save, rebuild, load, continue)."""
    uninstall_patches(undo)
    ps.initialize_model_parallel()
    model, ddp, opt = _build_trainable(seed=1)
    for step in range(_STEPS_BEFORE):
        _train_step(ddp, opt, step, rank, world)
    if mode == "resume":
        dist_checkpointing.save(_sharded(model, opt, False), ckpt_dir)
        model, ddp, opt = _build_trainable(seed=99)  # different init: the load must restore it
        if "W1" not in undo:
            prepare_optimizer_for_load(opt)
        loaded = dist_checkpointing.load(_sharded(model, opt, True), ckpt_dir)
        model.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optimizer"])
    for step in range(_STEPS_BEFORE, _STEPS_BEFORE + _STEPS_AFTER):
        _train_step(ddp, opt, step, rank, world)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_p9_p10_w1_distributed_optimizer_resume_is_exact(tmp_path: Any) -> None:
    for sub in ("ok", "p10", "p9", "w1"):
        (tmp_path / sub).mkdir()
    straight = run_ranks(_resume_worker, 2, "", "straight", ())[0]
    resumed = run_ranks(_resume_worker, 2, str(tmp_path / "ok"), "resume", ())[0]
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    # Without P10 the resumed run silently diverges (one shared Adam `step` for all params).
    diverged = run_ranks(_resume_worker, 2, str(tmp_path / "p10"), "resume", ("P10",))[0]
    worst = max((diverged[k] - straight[k]).abs().max().item() for k in straight)
    assert worst > 1e-4
    with pytest.raises(RankError, match="step"):
        run_ranks(_resume_worker, 2, str(tmp_path / "p9"), "resume", ("P9",))
    with pytest.raises(RankError, match="assert"):
        run_ranks(_resume_worker, 2, str(tmp_path / "w1"), "resume", ("W1",))


# --------------------------------------------------------------------------------------------
# P14: dist-checkpoint's results-queue Manager starts with fork, not spawn (speed)
# --------------------------------------------------------------------------------------------


def _results_queue_worker(rank: int, world: int, undo: tuple[str, ...]) -> tuple[str, str, list[str]]:
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    uninstall_patches(undo)
    # 0.16.x: `_get_write_results_queue()`; 0.19.x: `get_write_results_queue(mp_mode="spawn")`.
    name = "get_write_results_queue" if hasattr(fa, "get_write_results_queue") else "_get_write_results_queue"
    fa._results_queue = None
    before = set(mp.active_children())
    queue = getattr(fa, name)()
    queue.put("x")
    started = [type(p).__name__ for p in mp.active_children() if p not in before]
    return getattr(fa, name).__qualname__, queue.get(timeout=30), started


def test_p14_checkpoint_results_queue_manager_is_forked() -> None:
    """Upstream starts the Manager with spawn: a fresh interpreter that re-imports the main module,
    4-13 s per rank at a training run's first save on 2 cores; P14 forks it (~0.05 s)."""
    ((qualname, item, started),) = run_ranks(_results_queue_worker, 1, ())
    assert "_p14_" in qualname and item == "x"
    assert started == ["ForkProcess"]
    ((qualname, item, started),) = run_ranks(_results_queue_worker, 1, ("P14",))
    assert "_p14_" not in qualname and item == "x"
    assert started == ["SpawnProcess"]
