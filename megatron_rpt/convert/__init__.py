"""Hugging Face <-> Megatron checkpoint conversion: declarative per-family mapping (`mapping`),
config translation (`hf_config`)."""
