"""Mixture of experts on gloo: expert-parallel layouts follow the EP=1 reference, the router's expert
bias follows Megatron's update rule, MoE checkpoints reshard across EP / expert TP.

Every run is the real `pretrain()` on mock data in forked ranks (tiny-moe shrunk to 2 layers, hidden
64, sequence 32, fp32). EP=2 initialises the experts differently from EP=1 (each EP rank draws its
local experts from its own expert-parallel RNG stream, as on GPU; CPU layer patch P15), so every layout starts from
one common set of weights: the model of a 1-iteration EP=1 run loaded with --finetune (weights only,
iteration 0, fresh optimizer and schedule). Iteration 1 therefore already compares the layouts.

Tolerances: losses and grad norms rtol 1e-5 (measured EP2 vs EP1: 2.3e-8 / 9.4e-8; a wrong expert
layout is off by >1e-3); final weights atol 1e-6 (measured 1.2e-7), final gradients atol 1e-7
(measured 9.3e-9, largest gradient 3.8e-2). The expert bias is compared exactly: Megatron only ever
adds +-rate to it, in float32, and the test repeats that arithmetic.
"""

import numpy as np
import pytest

from tests.dist_harness import RankError, run_ranks

RTOL = 1e-5
RATE = 1e-3  # tiny-moe's --moe-router-bias-update-rate
ITERS = 4
SEQ, GBS, TOPK = 32, 8, 2

# tiny-moe (8 experts, top-2, sigmoid router + expert bias, untied output) shrunk to 2 layers, hidden 64.
BASE = ["--model-preset", "tiny-moe", "--num-layers", "2", "--hidden-size", "64", "--kv-channels", "16",
        "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
        "--lr", "3e-3", "--lr-warmup-iters", "1", "--train-iters", str(ITERS), "--micro-batch-size", "2",
        "--global-batch-size", str(GBS), "--eval-interval", "0", "--log-interval", "100", "--seed", "1234",
        "--no-log-memory"]
EP2 = ["--expert-model-parallel-size", "2"]


def _traced(rank, world, argv, with_tensors=False):
    """pretrain() with each step's router loads (routing maps summed over the step's micro-batches,
    captured on the router's output) and every router's expert_bias before and after the step.
    With `with_tensors`: this rank's final weights and gradients under global expert numbers."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_rpt.config import parse_args
    from megatron_rpt.training import step as step_module
    from megatron_rpt.training.loop import pretrain
    from megatron_rpt.models.gpt import unwrap

    loads: dict = {}
    real_forward = TopKRouter.forward

    def forward(self, *args, **kwargs):
        probs, routing_map = real_forward(self, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            counts = routing_map.sum(dim=0).to(torch.int64)
            loads[self.layer_number] = loads.get(self.layer_number, 0) + counts
        return probs, routing_map

    TopKRouter.forward = forward  # this forked worker's class only
    steps, holder = [], {}
    real_step = step_module.train_step

    def train_step(state, *args, **kwargs):
        holder["state"] = state
        routers = {mod.layer_number: mod for chunk in state.model for mod in unwrap(chunk).modules()
                   if isinstance(mod, TopKRouter)}
        before = {n: r.expert_bias.detach().clone().numpy() for n, r in routers.items()}
        loads.clear()
        out = real_step(state, *args, **kwargs)
        steps.append({n: (before[n], r.expert_bias.detach().clone().numpy(), loads[n].numpy())
                      for n, r in routers.items()})
        return out

    step_module.train_step = train_step
    result = pretrain(parse_args(argv))
    out = {"losses": result.losses, "grad_norms": result.grad_norms, "steps": steps,
           "resumed_from": result.resumed_from}
    if with_tensors:
        ep_rank = ps.get_expert_model_parallel_rank()
        weights, grads = {}, {}
        for chunk in holder["state"].model:
            model = unwrap(chunk)
            n_local = None
            for name, param in model.named_parameters():
                if ".local_experts." in name:
                    head, tail = name.split(".local_experts.")
                    local, rest = tail.split(".", 1)
                    n_local = n_local or model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
                    name = f"{head}.experts.{ep_rank * n_local + int(local)}.{rest}"
                weights[name] = param.detach().clone().numpy()
                grads[name] = param.main_grad.detach().clone().numpy()
        out["weights"], out["grads"] = weights, grads
    return out


def run(world, extra, with_tensors=False):
    """Results of every rank."""
    return run_ranks(_traced, world, BASE + list(extra), with_tensors, timeout=300)


def assert_close(losses, ref, rtol=RTOL):
    assert sorted(losses) == sorted(ref)
    for it in ref:
        assert losses[it] == pytest.approx(ref[it], rel=rtol), (it, losses[it], ref[it])


def merged(ranks, key):
    """One dict name -> array from all ranks; copies of the same name must agree exactly."""
    out = {}
    for r in ranks:
        for name, value in r[key].items():
            if name in out:
                np.testing.assert_array_equal(out[name], value, err_msg=f"{key} {name} differs across replicas")
            out[name] = value
    return out


def check_expert_bias_rule(ranks, rate=RATE):
    """Megatron's rule (finalize_model_grads -> get_updated_expert_bias): after each step,
    bias_e += rate * sign(mean_load - load_e), load_e = tokens routed to expert e in the whole
    global batch (all micro-batches, all data-parallel / tensor-parallel ranks). Our loads come from
    the routing maps the router returned, independently of its local_tokens_per_expert counter."""
    n_steps = len(ranks[0]["steps"])
    assert n_steps > 0 and all(len(r["steps"]) == n_steps for r in ranks)
    layers = sorted({n for r in ranks for n in r["steps"][0]})
    for i in range(n_steps):
        for layer in layers:
            holders = [r["steps"][i][layer] for r in ranks if layer in r["steps"][i]]
            load = sum(h[2] for h in holders)
            # every token of the global batch reached TOPK experts of this layer exactly once
            assert load.sum() == GBS * SEQ * TOPK, (i, layer, load)
            before = holders[0][0]
            offset = load.mean() - load  # float64, exact for these integer loads
            expected = before + np.sign(offset).astype(np.float32) * np.float32(rate)
            for b, after, _ in holders:
                np.testing.assert_array_equal(b, before)
                np.testing.assert_array_equal(after, expected, err_msg=f"step {i} layer {layer} load {load}")
    return layers


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The common initial model: one EP=1 DP=2 step from scratch (zero expert bias), saved."""
    ckpt = str(tmp_path_factory.mktemp("moe_start") / "ckpt")
    ranks = run(2, ["--exit-interval", "1", "--save", ckpt])
    return {"ckpt": ckpt, "ranks": ranks}


def from_start(start):
    return ["--load", start["ckpt"], "--finetune"]


@pytest.fixture(scope="module")
def reference(start):
    """EP=1, DP=2 from the common weights."""
    return run(2, from_start(start), with_tensors=True)


@pytest.fixture(scope="module")
def ep2(start, tmp_path_factory):
    """EP=2 (alltoall), DP=2 from the common weights; saves iteration 2 for the reshard test."""
    ckpt = str(tmp_path_factory.mktemp("moe_ep2") / "ckpt")
    ranks = run(2, EP2 + from_start(start) + ["--save", ckpt, "--save-interval", "2"], with_tensors=True)
    return {"ranks": ranks, "ckpt": ckpt}


def _initial_experts(rank, world, argv, disable=()):
    """Freshly initialised expert weights of this rank under their global expert numbers."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_rpt import distributed as dist
    from megatron_rpt.config import parse_args
    from megatron_rpt.validate import validate_config
    from megatron_rpt.models.gpt import build_model_chunks
    from megatron_rpt.platform import setup_platform

    platform = setup_platform(force_cpu=True)
    if disable:
        from megatron_rpt.platform.compat.registry import uninstall_patches
        uninstall_patches(set(disable))
    cfg = validate_config(parse_args(argv), world)
    dist.init_distributed(backend="gloo", device_type="cpu",
                          expert_model_parallel_size=cfg.parallel.expert_model_parallel_size)
    dist.set_random_seed(cfg.training.seed)  # as pretrain() does
    model = build_model_chunks(cfg, platform, 256, torch.device("cpu"))[0]
    n_local = cfg.model.num_experts // ps.get_expert_model_parallel_world_size()
    offset = ps.get_expert_model_parallel_rank() * n_local
    return {(layer, offset + i): expert.linear_fc2.weight.detach().numpy().copy()
            for layer, block in enumerate(model.decoder.layers)
            for i, expert in enumerate(block.mlp.experts.local_experts)}


def test_expert_parallel_initialises_distinct_experts():
    """CPU initialisation draws experts from the expert-parallel RNG stream (CPU layer patch P15), as on GPU;
    without P15 every EP rank's experts are copies of rank 0's."""
    ranks = run_ranks(_initial_experts, 2, BASE + EP2)
    experts = {**ranks[0], **ranks[1]}
    assert len(experts) == 2 * 8
    for layer in (0, 1):
        for e in range(4):
            assert not np.array_equal(experts[(layer, e)], experts[(layer, e + 4)]), (layer, e)
    unpatched = run_ranks(_initial_experts, 2, BASE + EP2, disable=("P15",))
    copies = {**unpatched[0], **unpatched[1]}
    assert all(np.array_equal(copies[(layer, e)], copies[(layer, e + 4)]) for layer in (0, 1) for e in range(4))


def test_expert_bias_update_from_zero(start):
    ranks = start["ranks"]
    layers = check_expert_bias_rule(ranks)
    assert layers == [1, 2]
    for layer in layers:
        before, after, load = ranks[0]["steps"][0][layer]
        assert not before.any()  # the step started from zero bias ...
        assert set(np.unique(after)) <= {np.float32(-RATE), np.float32(0), np.float32(RATE)}
        assert (after > 0).any() and (after < 0).any(), load  # ... and the loads were unbalanced
    # The check tells global from local loads: rank 0's tokens alone would move some bias the other way.
    local_rule = [np.sign(load.mean() - load) for load in (ranks[0]["steps"][0][n][2] for n in layers)]
    assert any((np.sign(ranks[0]["steps"][0][n][1]) != s).any() for n, s in zip(layers, local_rule))


def test_expert_parallel_2_matches_ep1(reference, ep2):
    ref, out = reference[0], ep2["ranks"][0]
    assert list(ref["losses"]) == list(range(1, ITERS + 1))
    assert ref["losses"][ITERS] < ref["losses"][1] - 0.05
    assert_close(out["losses"], ref["losses"])
    assert_close(out["grad_norms"], ref["grad_norms"])
    # weights and gradients of the last step, experts under their global numbers
    ref_w, ref_g = merged(reference, "weights"), merged(reference, "grads")
    w, g = merged(ep2["ranks"], "weights"), merged(ep2["ranks"], "grads")
    assert sorted(w) == sorted(ref_w) and sum(".experts." in n for n in w) == 2 * 8 * 2
    for name in ref_w:
        np.testing.assert_allclose(w[name], ref_w[name], rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(g[name], ref_g[name], rtol=0, atol=1e-7, err_msg=name)
    check_expert_bias_rule(reference)
    check_expert_bias_rule(ep2["ranks"])
    # the routers of both layouts made the same decisions: same per-step loads
    for a, b in zip(reference[0]["steps"], out["steps"]):
        for layer in a:
            np.testing.assert_array_equal(a[layer][2], b[layer][2])
            np.testing.assert_array_equal(a[layer][1], b[layer][1])


def test_allgather_dispatcher_matches_alltoall(start, ep2):
    out = run(2, EP2 + from_start(start) + ["--moe-token-dispatcher-type", "allgather"])
    assert_close(out[0]["losses"], ep2["ranks"][0]["losses"])
    assert_close(out[0]["grad_norms"], ep2["ranks"][0]["grad_norms"])
    check_expert_bias_rule(out)


def test_distributed_optimizer_ep2(start, ep2):
    out = run(2, EP2 + from_start(start) + ["--use-distributed-optimizer"])
    assert_close(out[0]["losses"], ep2["ranks"][0]["losses"])
    assert_close(out[0]["grad_norms"], ep2["ranks"][0]["grad_norms"])
    check_expert_bias_rule(out)


TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]


def test_tensor_parallel_2_expert_parallel_2(start, reference):
    """4 ranks: TP2 + sequence parallel, EP2 (alltoall), expert TP 1 (so expert-DP 2), dense DP 2."""
    out = run(4, EP2 + TP2_SP + ["--expert-tensor-parallel-size", "1"] + from_start(start))
    assert_close(out[0]["losses"], reference[0]["losses"])
    assert_close(out[0]["grad_norms"], reference[0]["grad_norms"])
    check_expert_bias_rule(out)  # loads summed over the sequence-parallel shards of both TP ranks


def test_tensor_parallel_2_expert_parallel_2_alltoall_expert_tp_2(start, reference):
    """The alltoall dispatcher all-gathers / reduce-scatters uneven token counts over the expert-TP
    group; gloo needs CPU layer patch P16 for that (without it: 'ProcessGroupGloo::allgather: invalid
    tensor size', see test_p16_is_what_makes_uneven_gathers_work)."""
    out = run(4, EP2 + TP2_SP + from_start(start))
    assert_close(out[0]["losses"], reference[0]["losses"])


def _uneven_gather(rank, world, disable=()):
    import torch
    from megatron_rpt.platform import setup_platform
    setup_platform(force_cpu=True)
    if disable:
        from megatron_rpt.platform.compat.registry import uninstall_patches
        uninstall_patches(set(disable))
    from megatron.core.tensor_parallel import mappings
    group = torch.distributed.group.WORLD
    sizes = [3, 5]
    x = torch.arange(sizes[rank] * 2, dtype=torch.float32).reshape(-1, 2) + 100 * rank
    gathered = mappings._gather_along_first_dim(x, group, output_split_sizes=sizes)
    full = torch.arange(16, dtype=torch.float32).reshape(8, 2) * (rank + 1)
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
    return gathered.tolist(), scattered.tolist()


def test_p16_is_what_makes_uneven_gathers_work():
    import torch
    out = run_ranks(_uneven_gather, 2)
    expected = torch.cat([torch.arange(6.).reshape(3, 2), torch.arange(10.).reshape(5, 2) + 100]).tolist()
    assert out[0][0] == out[1][0] == expected
    full = (torch.arange(16.).reshape(8, 2) * 3)  # sum over ranks of (rank + 1) x arange
    assert out[0][1] == full[:3].tolist() and out[1][1] == full[3:].tolist()
    with pytest.raises(RankError, match="invalid tensor size|does not support|reduce_scatter"):
        run_ranks(_uneven_gather, 2, disable=("P16",))


def test_pipeline_parallel_2_expert_parallel_2(start, reference):
    """4 ranks: PP2 (one MoE layer per stage), EP2, dense DP 2."""
    out = run(4, EP2 + from_start(start) + ["--pipeline-model-parallel-size", "2"])
    assert_close(out[0]["losses"], reference[0]["losses"])
    assert_close(out[0]["grad_norms"], reference[0]["grad_norms"])
    assert check_expert_bias_rule(out) == [1, 2]


def test_reshard_ep2_checkpoint_to_ep1(ep2):
    """EP2 iteration 2 (model, Adam states, schedule, data position) continues at EP1 like the
    uninterrupted EP2 run."""
    out = run(2, ["--load", ep2["ckpt"], "--ckpt-step", "2"])
    assert out[0]["resumed_from"].endswith("iter_0000002")
    straight = ep2["ranks"][0]["losses"]
    assert_close(out[0]["losses"], {k: v for k, v in straight.items() if k > 2})
    check_expert_bias_rule(out)


def test_reshard_ep2_checkpoint_to_tp2_ep2_expert_tp2(ep2, reference):
    """EP2 iteration 2 loaded at TP2 + SP, EP2, expert TP 2 (each expert's weights and Adam states split
    over two ranks), allgather dispatcher: continues like the uninterrupted EP2 run and the reference."""
    out = run(4, EP2 + TP2_SP + ["--moe-token-dispatcher-type", "allgather", "--load", ep2["ckpt"],
                                 "--ckpt-step", "2"])
    after_2 = {k: v for k, v in ep2["ranks"][0]["losses"].items() if k > 2}
    assert_close(out[0]["losses"], after_2)
    assert_close(out[0]["losses"], {k: v for k, v in reference[0]["losses"].items() if k > 2})
    check_expert_bias_rule(out)
