"""megatron_rpt.fileio: the one atomic-write helper (content, failure keeps the old file, no leftovers)."""
import json
import os
import stat

import pytest

from megatron_rpt.fileio import atomic_open, write_json, write_jsonl


def test_write_json_and_jsonl_round_trip(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": "é"})
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8")) == {"a": "é", "b": 1}
    assert (tmp_path / "m.json").read_text(encoding="utf-8").startswith('{\n  "a"')  # sorted, indented
    write_jsonl(tmp_path / "d.jsonl", [{"text": "ü"}, {"text": "x"}])
    assert (tmp_path / "d.jsonl").read_text(encoding="utf-8") == '{"text": "ü"}\n{"text": "x"}\n'
    assert stat.S_IMODE(os.stat(tmp_path / "d.jsonl").st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "m.json"]


def test_error_keeps_previous_file_and_removes_temporary(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path) as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["r.jsonl"]
    with pytest.raises(TypeError):  # an unserialisable record: nothing published
        write_jsonl(path, [{"ok": 1}, {"bad": object()}])
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["r.jsonl"]


def test_binary_mode_and_bad_mode(tmp_path):
    with atomic_open(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_open(tmp_path / "c", "a"):
            pass
