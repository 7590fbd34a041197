"""Pretraining: loop, step, optimizer/scheduler, checkpointing and logging on Megatron-Core."""
