"""Data: tokenizers, the jsonl reader, blend flags, indexed-dataset writing, preprocessing, checks and
training datasets.

Submodules are imported explicitly (`megatron_rpt.data.tokenizers`, ...) so that light tools do
not pull in Megatron-Core.
"""
