"""Data: demo corpus, tokenizers, indexed-dataset writing, preprocessing and training datasets.

Submodules are imported explicitly (`megatron_rpt.data.tokenizers`, ...) so that light tools do
not pull in Megatron-Core.
"""
