"""benchmarks/train_step.py end to end at toy size: every method runs the real training step (TP 1
and TP 2 ranks), the CE-valued methods start from the baseline's loss, and the results files carry
the ratios the README quotes. The numbers themselves come from the full run (results/)."""

import json
import sys

from tests.cli import run_python


def test_train_step_benchmark_smoke(tmp_path):
    out = tmp_path / "ts"
    proc = run_python([sys.executable, "benchmarks/train_step.py", "--dtype", "fp32", "--tp", "1", "2",
                       "--vocab", "500", "--seq-length", "16", "--hidden-size", "64", "--steps", "1", "--rounds", "2",
                       "--output", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert [(p["dtype"], p["tp"]) for p in doc["results"]] == [("fp32", 1), ("fp32", 2)]
    for point in doc["results"]:
        assert point["check"] == "ok"
        methods = point["methods"]
        assert list(methods) == ["mcore_ce", "ours_ce", "ours_beta", "ours_low"]
        base = methods["mcore_ce"]
        assert base["time_ratio"] == 1.0 and base["memory"]["peak_ratio"] == 1.0
        # our CE is Megatron's CE (bit-identical at zero settings); beta and top-k change the loss
        assert methods["ours_ce"]["losses"][0] == base["losses"][0]
        assert methods["ours_beta"]["losses"][0] != base["losses"][0]
        for e in methods.values():
            assert len(e["time_s"]["all"]) == 2 and e["time_s"]["median"] > 0                 # 2 rounds x 1 step
            assert e["memory"]["extra_bytes"] > 0 and len(e["losses"]) == 2
    md = out.with_suffix(".md").read_text()
    assert "| fp32 | 2 | `ours_low` |" in md and "Megatron-Core" in md
