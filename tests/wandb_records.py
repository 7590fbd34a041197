"""Read an offline W&B run back: the scalars of its history records, from the run's `.wandb` file.

wandb 0.31 has no Python reader of its transaction log any more (the writer is its Go core, and
`wandb sync` has no view mode), so the file's framing is read here: a 7-byte header (b":W&B", a
2-byte magic, a version byte), then LevelDB log records in 32 KiB blocks (CRC32C, 2-byte length, type
FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4; a block tail shorter than a header is padding), each payload one
`wandb.proto.wandb_internal_pb2.Record` - decoded with wandb's own protobuf classes.
"""

from __future__ import annotations

import glob
import json
import os
import struct

_BLOCK = 32768
_HEADER = 7


def records(path: str):
    """Every Record of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, payload = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0:
            continue
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            yield record


def history(run_folder_parent: str) -> dict:
    """{step: {key: value}} of the one offline run under `run_folder_parent` (wandb.init's dir), W&B's
    own keys (_step, _runtime, _timestamp) left out."""
    paths = glob.glob(os.path.join(run_folder_parent, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(paths) == 1, paths
    out: dict = {}
    for record in records(paths[0]):
        if record.WhichOneof("record_type") != "history":
            continue
        row = out.setdefault(record.history.step.num, {})
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                row[key] = json.loads(item.value_json)
    return out
