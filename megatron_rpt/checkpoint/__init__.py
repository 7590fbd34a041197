"""Checkpoint I/O shared by training, RPT and conversion (conversion never imports training/).

- `layout.py`: the folders of a checkpoint root, the tracker file, atomic publication of a folder,
  run_config.json, retention (`--ckpt-keep-last`); plain file operations.
- `sharded.py`: torch_dist save/load through Megatron-Core's dist_checkpointing: the atomic save
  protocol, the common state, the model's checkpoint keys, validation of a checkpoint folder.
- `faults.py`: fault injection at each step of a save (crash-safety tests).

What a training checkpoint holds beyond the model (optimizer, scheduler, RNG, data position) and
when it is written belong to `training/checkpointing.py`.
"""

