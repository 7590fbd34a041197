"""Model builders (Qwen3-style GPT on Megatron-Core) and parameter/FLOP accounting."""
