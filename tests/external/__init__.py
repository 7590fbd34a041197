"""Tests against real external inference servers (vLLM); skipped where they are not installed (`make test-vllm`)."""
