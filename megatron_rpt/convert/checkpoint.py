"""Hugging Face folder <-> Megatron distributed checkpoint (what tools/convert_checkpoint.py runs).

`import_hf`: config.json -> our model flags (`hf_config`), safetensors -> the Megatron model of
this process (TP=1), saved as a *model-only* checkpoint at iteration 0 with the run
configuration recorded: `mrpt-pretrain --load DIR` (any TP/PP/EP: checkpoints reshard on load)
starts from these weights with a fresh optimizer. The HF folder's tokenizer is recorded as
`--tokenizer-type HuggingFaceTokenizer --tokenizer-model HF_DIR`.

`export_hf`: a checkpoint saved at any layout is read as the TP=1 model's parameters (the
checkpoint reshards), mapped back tensor by tensor, and written as safetensors shards with an
index, config.json and generation_config.json (and the tokenizer files when the run used an HF
tokenizer folder).

Safety: safetensors only (nothing unpickled from the HF side; our checkpoints are read with
Megatron-Core's dist_checkpointing), outputs go to a temporary folder renamed when complete, and a
non-empty output folder is refused without `force`.
Both directions stream (`convert.streaming`): the model exists only on the meta device, each
parameter is converted when it is written (import) or read with its own partial load (export), so
peak memory is about the largest tensor plus one output shard, whatever the model size.
MoE export needs the Qwen3-MoE router (softmax, no expert bias).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

import torch

from megatron_rpt.checkpoint.layout import publish_folder, read_run_config
from megatron_rpt.convert.hf_config import architecture, model_flags_from_hf, shape_from_hf
from megatron_rpt.convert.mapping import Shape, expand, family_rules, hf_names, to_hf, to_megatron
from megatron_rpt.models.flops import kv_groups

SHARD_BYTES = 2 * 10**9   # --max-shard-size default (2GB)
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class ConversionError(ValueError):
    """A conversion that cannot be done as asked (names the file / tensor / flag)."""


def _prepare_output(path: str, force: bool) -> str:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        if not force:
            raise ConversionError(f"{path} exists and is not empty; pass --force to replace it")
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


class _SafetensorsFolder:
    """Lazy tensor access to an HF folder (single file or sharded with an index)."""

    def __init__(self, folder: str):
        from safetensors import safe_open
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise ConversionError(f"--hf-dir {folder}: no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors are read: pickled .bin files are refused)")
        self._files = {}
        self._map = {}
        for name, file in (weight_map.items() if weight_map else ()):
            self._map[name] = os.path.join(folder, file)
        if weight_map is None:
            handle = safe_open(single, "pt")
            self._files[single] = handle
            self._map = {name: single for name in handle.keys()}
        for path in set(self._map.values()):
            if not os.path.isfile(path):
                raise ConversionError(f"--hf-dir {folder}: shard {os.path.basename(path)} named by the index is missing")
            if path not in self._files:
                self._files[path] = safe_open(path, "pt")

    def names(self) -> set[str]:
        return set(self._map)

    def _file(self, name: str):
        if name not in self._map:
            raise ConversionError(f"tensor {name} not found in the HF checkpoint")
        return self._files[self._map[name]]

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return self._file(name).get_slice(name).get_shape()


def _single_process_model(cfg, vocab: int, device: str = "cpu"):
    """Platform + a 1-rank process group + this run's model (unwrapped chunks) at TP=PP=EP=1, whatever
    layout `cfg` was trained with (the checkpoint reshards on load). `device="meta"` builds the
    structure only (no parameter memory)."""
    from megatron_rpt import distributed as dist
    from megatron_rpt.config.schema import ParallelConfig
    from megatron_rpt.models.gpt import build_model_chunks
    from megatron_rpt.platform import setup_platform
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig())
    platform = setup_platform(force_cpu=True)
    dist.init_distributed(backend="gloo", device_type="cpu")
    dist.set_random_seed(cfg.training.seed)
    with torch.device(device):
        return build_model_chunks(cfg, platform, vocab, torch.device(device))


def _teardown() -> None:
    """Destroy the 1-rank process group (a gloo group left alive at interpreter exit can abort it)."""
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _run_config(model_flags: dict, tokenizer_dir: Optional[str], vocab_size: int, layout: tuple[int, int, int]):
    """The run configuration recorded with an imported checkpoint; `layout` = (TP, PP, EP) the user
    means to train with (the checkpoint itself reshards to any; this records and checks it)."""
    from megatron_rpt.config import parse_args
    from megatron_rpt.validate import validate_config
    tp, pp, ep = layout
    argv = ["--mock-data", "--lr", "0", "--train-iters", "1", "--seq-length",
            str(min(4096, model_flags["max_position_embeddings"])), "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), "--expert-model-parallel-size", str(ep)]
    cfg = parse_args(argv)
    model = dataclasses.replace(cfg.model, vocab_size=vocab_size, **model_flags)
    data = cfg.data
    if tokenizer_dir:
        data = dataclasses.replace(data, mock_data=False, tokenizer_type="HuggingFaceTokenizer",
                                   tokenizer_model=os.path.abspath(tokenizer_dir))
    # Checked as a mock-data run: the training data is the user's to give at --load time.
    checked = validate_config(dataclasses.replace(cfg, model=model, data=dataclasses.replace(data, mock_data=True)),
                              tp * pp * ep, check_files=False)
    return dataclasses.replace(checked, data=data)


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model"))


def import_hf(hf_dir: str, save: str, *, force: bool = False, progress: bool = True,
              layout: tuple[int, int, int] = (1, 1, 1)) -> dict:
    """HF folder -> model-only Megatron checkpoint under `save` (see module docstring); `layout`:
    the (TP, PP, EP) sizes recorded in the run configuration (checked against the model)."""
    from megatron_rpt.models.gpt import padded_vocab_size
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"--hf-dir {hf_dir}: no config.json")
    with open(config_path) as f:
        config = json.load(f)
    flags = model_flags_from_hf(config)
    arch = architecture(config)
    tensors = _SafetensorsFolder(hf_dir)
    cfg = _run_config(flags, hf_dir if _has_tokenizer(hf_dir) else None, config["vocab_size"], layout)
    vocab = padded_vocab_size(config["vocab_size"], cfg.model.make_vocab_size_divisible_by, 1)
    shape = shape_from_hf(config, vocab)
    rules = family_rules(arch)
    missing = sorted(hf_names(rules, shape) - tensors.names())
    if missing:
        raise ConversionError(f"--hf-dir {hf_dir}: {len(missing)} tensors of a {arch} are missing, e.g. "
                              f"{', '.join(missing[:3])}")
    if os.path.exists(save) and os.listdir(save) and not force:
        raise ConversionError(f"--save {save} exists and is not empty; pass --force to replace it")
    chunks = _single_process_model(cfg, vocab, device="meta")
    try:
        path = _import_into(chunks, cfg, rules, shape, tensors, save, force, progress)
    finally:
        _teardown()
    return {"path": path, "architecture": arch, "flags": flags, "vocab_size": config["vocab_size"],
            "tokenizer": cfg.data.tokenizer_model}


def _import_into(chunks, cfg, rules, shape, tensors, save, force, progress) -> str:
    from megatron_rpt.convert.streaming import LazySaveStrategy, placeholder_model
    from megatron_rpt.checkpoint.sharded import model_state_dict, save_sharded
    own = {k: v for k, v in placeholder_model(chunks[0]).items() if not k.endswith("_extra_state")}
    items = {name: (sources, rule) for name, sources, rule, _, _ in expand(rules, shape)}
    params = {name for name, _ in chunks[0].named_parameters()}
    for name in items:
        if name not in own:
            raise ConversionError(f"{name}: no such parameter in the Megatron model (mapping out of date?)")
    unmapped = sorted(params - set(items))
    if unmapped:
        raise ConversionError(f"model parameters with no mapping: {', '.join(unmapped[:5])}")
    # Every shape is checked before anything is written (meta tensors: no data is read).
    for name, (sources, rule) in items.items():
        metas = [torch.empty(tensors.shape(h), device="meta") for h in sources]
        try:
            got = to_megatron(rule, metas, shape, 0, 1, name).shape
        except (ValueError, RuntimeError) as e:
            raise ConversionError(f"{name} <- {', '.join(sources)}: shapes "
                                  f"{[tuple(m.shape) for m in metas]} do not fit: {e}") from None
        if got != own[name].shape:
            raise ConversionError(f"{name} <- {', '.join(sources)}: shape {tuple(got)} does not match "
                                  f"the model's {tuple(own[name].shape)}")
    bar = _bar(len(items), "import", progress)

    def produce(name: str) -> torch.Tensor:
        if name not in items:  # a buffer (router expert bias / counts): its fresh-model value
            return own[name]
        sources, rule = items[name]
        value = to_megatron(rule, [tensors.get(h) for h in sources], shape, 0, 1, name).to(own[name].dtype)
        bar.update(1)
        return value

    if force and os.path.isdir(save):
        shutil.rmtree(save)
    strategy = LazySaveStrategy(own, produce)
    # A model-only checkpoint: `--load` starts from its weights at iteration 0 with a fresh optimizer.
    path = save_sharded(save, 0, model_state_dict(chunks), cfg, model_only=True, fully_parallel=False,
                        sharded_strategy=strategy, common={"consumed_train_samples": 0, "consumed_valid_samples": 0})
    bar.close()
    return path


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def _hf_config(cfg, arch: str, vocab_size: int, dtype: str) -> dict:
    m = cfg.model
    config = {
        "architectures": [arch], "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                                                "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe",
                                                "MixtralForCausalLM": "mixtral"}[arch],
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": kv_groups(m),
        "head_dim": m.kv_channels or m.hidden_size // m.num_attention_heads, "vocab_size": vocab_size,
        "max_position_embeddings": m.max_position_embeddings or m.seq_length, "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rotary_base, "rope_parameters": {"rope_theta": m.rotary_base, "rope_type": "default"},
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": m.init_method_std,
        "torch_dtype": {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype], "use_cache": True,
    }
    if arch == "Qwen3MoeForCausalLM":
        config.update(num_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk,
                      moe_intermediate_size=m.moe_ffn_hidden_size or m.ffn_hidden_size, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=m.moe_aux_loss_coeff)
    if arch == "MixtralForCausalLM":   # intermediate_size is each expert's
        config.update(num_local_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk,
                      intermediate_size=m.moe_ffn_hidden_size or m.ffn_hidden_size, sliding_window=None,
                      router_aux_loss_coef=m.moe_aux_loss_coeff, router_jitter_noise=0.0)
    if arch == "Qwen2ForCausalLM":
        config.pop("attention_bias")   # Qwen2 always has Q/K/V biases (no such field)
        config.update(use_sliding_window=False, sliding_window=None)
    return config


def _export_architecture(cfg) -> str:
    m = cfg.model
    # What every exported family shares; anything else has no Hugging Face architecture here.
    family = {"--swiglu": m.swiglu, "--normalization RMSNorm": m.normalization == "RMSNorm",
              "--disable-bias-linear": not m.add_bias_linear, "--position-embedding-type rope":
              m.position_embedding_type == "rope", "--rotary-percent 1.0": m.rotary_percent == 1.0,
              "no --apply-layernorm-1p": not m.apply_layernorm_1p,
              "no --moe-shared-expert-intermediate-size": not m.moe_shared_expert_intermediate_size,
              "--moe-layer-freq 1": str(m.moe_layer_freq).strip() == "1"}
    missing = [flag for flag, ok in family.items() if not ok]
    if missing:
        raise ConversionError("no Hugging Face architecture to export this model to: the exported families "
                              "(Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral) need " + ", ".join(missing))
    if m.add_qkv_bias and (m.qk_layernorm or m.num_experts):
        raise ConversionError("Q/K/V biases are exported as Qwen2, which has no QK-norm and no experts; "
                              "no Hugging Face architecture has this combination here")
    if m.num_experts:
        if m.moe_router_score_function != "softmax" or m.moe_router_enable_expert_bias:
            raise ConversionError("this MoE uses a sigmoid router with a per-expert bias, which Qwen3-MoE and Mixtral "
                                  "cannot represent (softmax top-k only); no Hugging Face architecture to export to")
        return "Qwen3MoeForCausalLM" if m.qk_layernorm else "MixtralForCausalLM"
    if m.add_qkv_bias:
        return "Qwen2ForCausalLM"
    return "Qwen3ForCausalLM" if m.qk_layernorm else "LlamaForCausalLM"


def export_hf(load: str, output: str, *, dtype: str = "bf16", iteration: Optional[int] = None,
              force: bool = False, progress: bool = True, shard_bytes: int = SHARD_BYTES) -> dict:
    """Megatron checkpoint (any layout) -> HF folder (see module docstring). `shard_bytes`: the
    largest output file (a larger single tensor gets a file of its own)."""
    from megatron_rpt.checkpoint.sharded import open_checkpoint
    from megatron_rpt.data.tokenizers import tokenizer_from_config
    from megatron_rpt.models.gpt import model_vocab_size, padded_vocab_size
    if dtype not in _DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(_DTYPES)}")
    it, path, cfg = read_run_config(load, iteration, "--load", "--iteration")
    arch = _export_architecture(cfg)
    tokenizer_dir = cfg.data.tokenizer_model if cfg.data.tokenizer_type == "HuggingFaceTokenizer" else None
    # As the training run's model: an imported checkpoint (no tokenizer recorded) has exactly the
    # recorded --vocab-size rows (the NullTokenizer's extra eod id is not an HF token).
    tok_vocab = tokenizer_from_config(cfg).vocab_size if cfg.data.tokenizer_type else 0
    vocab_size = model_vocab_size(tok_vocab, cfg)
    vocab = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
    m = cfg.model
    shape = Shape(num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
                  num_query_groups=m.num_query_groups or m.num_attention_heads,
                  head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads, vocab_size=vocab_size,
                  padded_vocab_size=vocab, tied=not m.untie_embeddings_and_output_weights,
                  num_experts=m.num_experts or 0)
    chunks = _single_process_model(cfg, vocab, device="meta")
    try:
        open_checkpoint(load, it)  # every data file present, readable by this megatron-core
        return _export_from(chunks, cfg, arch, shape, path, it, output, tokenizer_dir, dtype=dtype, force=force,
                            progress=progress, shard_bytes=shard_bytes)
    finally:
        _teardown()


def _export_from(chunks, cfg, arch, shape, path, it, output, tokenizer_dir, *, dtype, force, progress,
                 shard_bytes) -> dict:
    from safetensors.torch import save_file

    from megatron_rpt.convert.streaming import read_tensors
    from megatron_rpt.checkpoint.sharded import load_sharded
    sharded = chunks[0].sharded_state_dict()
    tmp = _prepare_output(output, force)
    try:
        items = {name: (sources, rule) for name, sources, rule, _, _ in expand(family_rules(arch), shape)}
        missing = sorted(set(items) - set(sharded))
        if missing:
            raise ConversionError(f"{path}: the model has no {', '.join(missing[:3])} (mapping out of date?)")
        bar = _bar(len(items), "export", progress)
        shard: dict = {}
        size, files, weight_map = 0, [], {}

        def flush():
            nonlocal shard, size
            if shard:
                name = f"model-{len(files) + 1:05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                files.append(name)
                weight_map.update({k: name for k in shard})
                shard, size = {}, 0

        for name, value in read_tensors(lambda sub: load_sharded(sub, path, partial=True), sharded, items):
            sources, rule = items[name]
            for hf_name, tensor in zip(sources, to_hf(rule, value, shape)):
                tensor = tensor.to(_DTYPES[dtype]).contiguous()
                if size and size + tensor.numel() * tensor.element_size() > shard_bytes:
                    flush()
                shard[hf_name] = tensor
                size += tensor.numel() * tensor.element_size()
            bar.update(1)
        flush()
        bar.close()
        total = len(files)
        final_names = {}
        for i, name in enumerate(files, 1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors"
            os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
            final_names[name] = final
        if total > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": {k: final_names[v] for k, v in weight_map.items()}}, f,
                          indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_hf_config(cfg, arch, shape.vocab_size, dtype), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"do_sample": False}, f, indent=2)
        if tokenizer_dir:
            for fname in os.listdir(tokenizer_dir):
                if fname.startswith(("tokenizer", "special_tokens_map", "vocab", "merges", "chat_template")):
                    shutil.copy2(os.path.join(tokenizer_dir, fname), tmp)
        publish_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": output, "architecture": arch, "iteration": it, "files": total, "vocab_size": shape.vocab_size}
