"""Reinforcement Pre-Training (RPT): next-token reasoning tasks, prefix-match reward, GRPO, loop, evaluation."""
