"""Flags -> dataclasses, presets and every validation error of the foundation issue."""

import pytest

from megatron_rpt.config import ConfigError, get_preset, parse_args
from megatron_rpt.data.blend import parse_blend, parse_split
from megatron_rpt.validate import validate_config
from tests.assets import cl100k_path

BASE = ["--lr", "1e-3", "--train-iters", "10", "--mock-data", "--vocab-size", "512"]


def problems(argv, world_size=1, check_files=True):
    with pytest.raises(ConfigError) as e:
        validate_config(parse_args(argv), world_size, check_files=check_files)
    return e.value.problems


def test_preset_fills_shape_and_explicit_flags_win():
    cfg = parse_args(["--model-preset", "dense-1b", "--num-layers", "2"] + BASE)
    assert cfg.model.num_layers == 2
    assert (cfg.model.hidden_size, cfg.model.ffn_hidden_size, cfg.model.num_attention_heads,
            cfg.model.num_query_groups, cfg.model.kv_channels) == (1536, 4608, 16, 4, 128)
    cfg = parse_args(["--model-preset", "dense-4b"] + BASE)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_hidden_size,
            cfg.model.num_attention_heads, cfg.model.num_query_groups) == (36, 2560, 9728, 32, 8)


def test_megatron_flag_names_and_types():
    cfg = parse_args(["--model-preset", "tiny", "--tensor-model-parallel-size", "2",
                      "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                      "--sequence-parallel", "--use-distributed-optimizer", "--micro-batch-size", "2",
                      "--global-batch-size", "16", "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "WSD",
                      "--lr-warmup-iters", "5", "--lr-wsd-decay-iters", "20", "--train-iters", "100",
                      "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
                      "--bf16", "--recompute-granularity", "selective", "--data-path", "0.3", "a", "0.7", "b",
                      "--split", "98,2,0", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "m",
                      "--save", "s", "--load", "l", "--save-interval", "10", "--eval-interval", "50",
                      "--eval-iters", "2", "--log-interval", "5", "--tensorboard-dir", "tb", "--seed", "7",
                      "--no-qk-layernorm"])
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.sequence_parallel
    assert cfg.parallel.num_layers_per_virtual_pipeline_stage == 1
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.adam_beta2 == 0.95 and cfg.optimizer.lr_decay_style == "WSD"
    assert cfg.training.bf16 and cfg.training.seed == 7 and cfg.training.global_batch_size == 16
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]
    assert cfg.model.qk_layernorm is False
    assert parse_blend(cfg.data.data_path) == (["a", "b"], [0.3, 0.7])


def test_unknown_preset_and_unknown_flag_exit():
    with pytest.raises(SystemExit):
        parse_args(["--model-preset", "nope"])
    with pytest.raises(ValueError, match="known presets"):
        get_preset("nope")
    # an unknown flag is a ConfigError naming it (all unknown flags at once; config/megatron_lm.py)
    with pytest.raises(ConfigError, match=r"unknown flag --hidden-sise \(did you mean --hidden-size\?\)"):
        parse_args(["--hidden-sise", "3"])


def test_defaults_derived():
    cfg = validate_config(parse_args(["--model-preset", "tiny", "--micro-batch-size", "3"] + BASE), 2)
    assert cfg.training.global_batch_size == 6        # micro x DP
    assert cfg.optimizer.lr_decay_iters == 10
    cfg = validate_config(parse_args(["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
                                      "--num-attention-heads", "4", "--seq-length", "16"] + BASE), 1)
    assert cfg.model.kv_channels == 16 and cfg.model.num_query_groups == 4 and cfg.model.max_position_embeddings == 16


def test_world_size_vs_model_parallel():
    p = problems(["--model-preset", "tiny", "--tensor-model-parallel-size", "2",
                  "--pipeline-model-parallel-size", "2"] + BASE, world_size=6)
    assert any("world size 6 is not divisible" in x and "--tensor-model-parallel-size 2" in x for x in p)


def test_heads_groups_ffn_vs_tp():
    p = problems(["--model-preset", "tiny", "--tensor-model-parallel-size", "8"] + BASE, world_size=8)
    assert any(x.startswith("--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 8") for x in p)
    assert any(x.startswith("--num-query-groups 2 is not divisible") for x in p)
    p = problems(["--model-preset", "tiny", "--num-query-groups", "3"] + BASE)
    assert any("--num-attention-heads 4 is not divisible by --num-query-groups 3" in x for x in p)


def test_layers_vs_pp_and_vpp():
    p = problems(["--model-preset", "tiny", "--pipeline-model-parallel-size", "3"] + BASE, world_size=3)
    assert any("--num-layers 4 is not divisible by --pipeline-model-parallel-size 3" in x for x in p)
    p = problems(["--model-preset", "tiny", "--pipeline-model-parallel-size", "2",
                  "--num-layers-per-virtual-pipeline-stage", "3"] + BASE, world_size=2)
    assert any("--num-layers-per-virtual-pipeline-stage 3" in x for x in p)
    p = problems(["--model-preset", "tiny", "--num-layers-per-virtual-pipeline-stage", "1"] + BASE)
    assert any("needs --pipeline-model-parallel-size >= 2" in x for x in p)


def test_global_batch_vs_micro_and_dp():
    p = problems(["--model-preset", "tiny", "--micro-batch-size", "2", "--global-batch-size", "6"] + BASE,
                 world_size=2)
    assert any("--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2" in x
               for x in p)


def test_missing_data_and_tokenizer_files(tmp_path):
    argv = ["--model-preset", "tiny", "--lr", "1e-3", "--train-iters", "10",
            "--data-path", str(tmp_path / "corpus_text_document"),
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "tok.model")]
    p = problems(argv)
    assert any("corpus_text_document.bin and" in x and "not found" in x and "preprocess_data" in x for x in p)
    assert any(x == f"--tokenizer-model: {tmp_path / 'tok.model'} not found" for x in p)
    (tmp_path / "corpus_text_document.bin").write_bytes(b"")
    p = problems(argv)
    assert any("corpus_text_document.idx not found" in x for x in p)


def test_required_and_misc_errors():
    p = problems(["--hidden-size", "64"])
    for flag in ("--num-layers", "--num-attention-heads", "--seq-length", "--lr",
                 "--train-iters", "--data-path"):
        assert any(x.startswith(flag + " is required") for x in p), flag
    # --ffn-hidden-size has Megatron-LM's default: 4h, or 8h/3 rounded down to a multiple of 64 with SwiGLU
    assert not any(x.startswith("--ffn-hidden-size") for x in p)
    shape = ["--num-layers", "2", "--hidden-size", "1000", "--num-attention-heads", "8", "--seq-length", "8"] + BASE
    assert validate_config(parse_args(shape), 1).model.ffn_hidden_size == 4000
    assert validate_config(parse_args(shape + ["--swiglu"]), 1).model.ffn_hidden_size == 2624  # int(2666.7/64)*64
    p = problems(["--model-preset", "tiny", "--bf16", "--fp16", "--lr-decay-style", "WSD",
                  "--save-interval", "5", "--recompute-granularity", "full", "--min-lr", "1"] + BASE)
    joined = "\n".join(p)
    for text in ("--bf16 and --fp16 are mutually exclusive", "--lr-decay-style WSD needs --lr-wsd-decay-iters",
                 "--save-interval needs --save", "--recompute-granularity full needs --recompute-method",
                 "--min-lr 1.0 exceeds --lr 0.001"):
        assert text in joined
    p = problems(["--model-preset", "tiny", "--tensor-model-parallel-size", "0"] + BASE)
    assert p == ["--tensor-model-parallel-size must be >= 1 (got 0)"]
    p = problems(["--model-preset", "tiny", "--lr", "1e-3", "--train-iters", "10", "--mock-data"])
    assert "--mock-data without --tokenizer-type needs --vocab-size" in p
    p = problems(["--model-preset", "tiny", "--exit-duration-in-mins", "0", "--exit-interval", "0",
                  "--nonfinite-grad-skip-limit", "-1"] + BASE)
    assert p == ["--exit-duration-in-mins must be > 0 (got 0.0)", "--exit-interval must be >= 1 (got 0)",
                 "--nonfinite-grad-skip-limit must be >= 0 (got -1)"]


def test_blend_and_split_parsing():
    assert parse_blend(["x"]) == (["x"], None)
    with pytest.raises(ValueError, match="weight/prefix pairs"):
        parse_blend(["0.5", "a", "b"])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)  # Megatron-LM: unweighted, blended by size
    with pytest.raises(ValueError, match="'a' is not a weight"):
        parse_blend(["a", "0.5"])
    with pytest.raises(ValueError, match="negative weight"):
        parse_blend(["-1", "a", "1", "b"])
    assert parse_split("969,30,1") == [969.0, 30.0, 1.0]
    assert parse_split("100") == [100.0, 0.0, 0.0]
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)


def test_sequence_parallel_disabled_without_tp():
    with pytest.warns(UserWarning, match="--sequence-parallel has no effect"):
        cfg = validate_config(parse_args(["--model-preset", "tiny", "--sequence-parallel"] + BASE), 1)
    assert cfg.parallel.sequence_parallel is False


def test_loss_flags():
    cfg = validate_config(parse_args(["--model-preset", "tiny", "--loss-beta", "-0.25", "--loss-lambda-high", "0.1",
                                      "--loss-lambda-low", "-0.1", "--loss-topk", "50"] + BASE), 1)
    assert (cfg.loss.loss_function, cfg.loss.loss_beta, cfg.loss.loss_lambda_high, cfg.loss.loss_lambda_low,
            cfg.loss.loss_topk) == ("generalized", -0.25, 0.1, -0.1, 50)
    default = parse_args(["--model-preset", "tiny"] + BASE).loss
    assert (default.loss_beta, default.loss_lambda_high, default.loss_lambda_low) == (0.0, 0.0, 0.0)  # = CE
    p = problems(["--model-preset", "tiny", "--loss-beta", "-1.5", "--loss-topk", "0"] + BASE)
    assert any("--loss-beta -1.5 < -1" in x for x in p) and any("--loss-topk must be >= 1" in x for x in p)
    p = problems(["--model-preset", "tiny", "--loss-function", "cross_entropy", "--loss-lambda-low", "-0.1"] + BASE)
    assert any("need --loss-function generalized" in x for x in p)
    p = problems(["--model-preset", "tiny", "--loss-function", "focal"] + BASE)
    assert any("--loss-function 'focal' is unknown; known: cross_entropy, generalized" in x for x in p)
    p = problems(["--model-preset", "tiny", "--loss-lambda-high", "inf"] + BASE)
    assert any("--loss-lambda-high must be a finite number" in x for x in p)


def test_data_flags_parse():
    cfg = parse_args(["--train-data-path", "0.3", "a", "0.7", "b", "--valid-data-path", "c", "--test-data-path",
                      "d", "e", "--data-cache-path", "cache", "--split", "1"] + BASE)
    d = cfg.data
    assert (d.data_path, d.train_data_path, d.valid_data_path, d.test_data_path, d.data_cache_path, d.split) == (
        [], ["0.3", "a", "0.7", "b"], ["c"], ["d", "e"], "cache", "1")


def test_tiktokenizer_flags_reach_the_tokenizer():
    from megatron_rpt.data.tokenizers import tokenizer_from_config
    ranks = cl100k_path()
    cfg = parse_args(["--model-preset", "tiny", "--mock-data", "--tokenizer-type", "TikTokenizer",
                      "--tokenizer-model", ranks, "--tiktoken-pattern", "v1", "--tiktoken-num-special-tokens", "16",
                      "--vocab-size", "20016"])
    tok = tokenizer_from_config(cfg)
    assert (tok.vocab_size, tok.eod, tok.unique_identifiers["pattern"], tok.unique_identifiers["num_special_tokens"]) \
        == (20016, 2, "v1", 16)
    with pytest.raises(ConfigError, match="--tokenizer-type TikTokenizer needs --tokenizer-model"):
        validate_config(parse_args(["--model-preset", "tiny", "--mock-data", "--tokenizer-type", "TikTokenizer"]), 1)


def test_warmup_must_be_shorter_than_decay():
    base = ["--model-preset", "tiny", "--mock-data", "--vocab-size", "100", "--lr", "1e-3"]
    with pytest.raises(ConfigError, match="--lr-warmup-iters 2 must be smaller than the decay iterations 2"):
        validate_config(parse_args(base + ["--train-iters", "2", "--lr-warmup-iters", "2"]), 1)
    validate_config(parse_args(base + ["--train-iters", "3", "--lr-warmup-iters", "2"]), 1)
    validate_config(parse_args(base + ["--train-iters", "1", "--lr-warmup-iters", "0"]), 1)


def test_run_configs_saved_before_the_architecture_flags_keep_their_model():
    """A checkpoint's run_config.json from before the flags existed describes the Qwen3-style model the code
    then built; a current one is read as written."""
    from megatron_rpt.config.schema import RunConfig
    legacy = RunConfig.from_dict({"model": {"num_layers": 2, "hidden_size": 64, "num_query_groups": 2,
                                            "qk_layernorm": False, "norm_epsilon": 1e-6}})
    m = legacy.model
    assert (m.swiglu, m.normalization, m.add_bias_linear, m.position_embedding_type, m.group_query_attention) == \
        (True, "RMSNorm", False, "rope", True)
    assert (m.num_query_groups, m.qk_layernorm, m.norm_epsilon) == (2, False, 1e-6)   # recorded values stay
    current = parse_args(["--num-layers", "2"])
    again = RunConfig.from_dict(current.to_dict()).model
    assert (again.swiglu, again.normalization, again.add_bias_linear) == (False, "LayerNorm", True)


def test_export_refuses_architectures_without_a_hugging_face_family():
    from megatron_rpt.convert.checkpoint import ConversionError, _export_architecture
    gpt = parse_args(["--num-layers", "2"])
    with pytest.raises(ConversionError) as e:
        _export_architecture(gpt)
    for flag in ("--swiglu", "--normalization RMSNorm", "--disable-bias-linear", "--position-embedding-type rope"):
        assert flag in str(e.value)
    family = ["--model-preset", "tiny"]
    assert _export_architecture(parse_args(family)) == "Qwen3ForCausalLM"
    assert _export_architecture(parse_args(family + ["--no-qk-layernorm"])) == "LlamaForCausalLM"
    assert _export_architecture(parse_args(family + ["--no-qk-layernorm", "--add-qkv-bias"])) == "Qwen2ForCausalLM"
    with pytest.raises(ConversionError, match="exported as Qwen2, which has no QK-norm"):
        _export_architecture(parse_args(family + ["--add-qkv-bias"]))
    with pytest.raises(ConversionError, match="--rotary-percent 1.0"):
        _export_architecture(parse_args(family + ["--rotary-percent", "0.5"]))


def test_async_save_and_megatron_lm_checkpoint_args():
    """--async-save is a real flag now; the persistent-worker and strategy flags of Megatron-LM's async
    save are accepted and said to change nothing; `checkpoint_args` is the Namespace Megatron-LM's loader
    reads (our fields under their dest names, derived values on top)."""
    from megatron_rpt.config import parse_args
    from megatron_rpt.config.megatron_lm import IGNORED, checkpoint_args, classify

    assert "--async-save" not in IGNORED
    cfg = parse_args(["--model-preset", "tiny", "--async-save"])
    assert cfg.checkpoint.async_save and not parse_args(["--model-preset", "tiny"]).checkpoint.async_save
    notices, problems = classify(["--use-persistent-ckpt-worker", "--async-strategy", "nvrx"])
    assert problems == [] and [n.split(" ignored:")[0] for n in notices] == [
        "> --use-persistent-ckpt-worker", "> --async-strategy nvrx"]
    args = checkpoint_args(cfg, padded_vocab_size=384, consumed_train_samples=96)
    assert (args.num_layers, args.hidden_size, args.tensor_model_parallel_size, args.async_save) == (
        cfg.model.num_layers, cfg.model.hidden_size, 1, True)
    assert (args.padded_vocab_size, args.consumed_train_samples, args.ckpt_format, args.add_position_embedding,
            args.use_rotary_position_embeddings) == (384, 96, "torch_dist", True,
                                                     cfg.model.position_embedding_type == "rope")
