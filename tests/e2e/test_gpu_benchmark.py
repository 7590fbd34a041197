"""benchmarks/gpu.py on CPU: the staging parts survive the trip (and corruption is named), and the
pretrain / rollout phases run their code path end to end at toy sizes (--smoke), so GPU time is
not spent finding a typo. The GPU numbers themselves come from running it on the H100."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import run_python

ROOT = Path(__file__).resolve().parents[2]


def gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pack_unpack_round_trip_and_damage(tmp_path):
    gpu = gpu_module()
    src = tmp_path / "src"
    (src / "wheels").mkdir(parents=True)
    blob = bytes(range(256)) * 5000 + b"tail"                     # 1,280,004 bytes
    (src / "wheels" / "a.whl").write_bytes(blob)
    (src / "paths.json").write_text('{"x": 1}')
    parts = tmp_path / "parts"
    manifest = gpu.pack(src, parts, part_bytes=300_000)
    assert len(manifest["parts"]) == -(-manifest["tar_bytes"] // 300_000) >= 5
    assert all(p["bytes"] <= 300_000 for p in manifest["parts"])
    assert sum(p["bytes"] for p in manifest["parts"]) == manifest["tar_bytes"]
    out = gpu.unpack(parts, tmp_path / "dest")
    assert (out / "wheels" / "a.whl").read_bytes() == blob and (out / "paths.json").read_text() == '{"x": 1}'

    second = parts / manifest["parts"][1]["name"]
    data = bytearray(second.read_bytes())
    data[100] ^= 1
    second.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"corrupt parts \(sha256 differs from the manifest\): payload\.tar\.001$"):
        gpu.unpack(parts, tmp_path / "dest2")
    (parts / manifest["parts"][-1]["name"]).unlink()
    with pytest.raises(SystemExit, match=r"parts not here yet: payload\.tar\.\d{3} \(carry them first\)"):
        gpu.unpack(parts, tmp_path / "dest3")
    (parts / "manifest.json").unlink()
    with pytest.raises(SystemExit, match="manifest.json is missing"):
        gpu.unpack(parts, tmp_path / "dest4")


def run_phase(*argv, out: Path):
    proc = run_python([sys.executable, "benchmarks/gpu.py", *argv, "--smoke", "--output", out], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_session_smoke(tmp_path):
    """The budgeted session's phases at toy sizes in one call (check, pretrain, rollout), its record of plan vs
    actual minutes, a second call merging into the same documents, and a phase skipped for want of budget."""
    proc = run_python([sys.executable, "benchmarks/gpu.py", "session", "--smoke", "--only", "check", "pretrain",
                       "rollout", "--budget-s", "600", "--output", tmp_path], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    session = json.loads((tmp_path / "gpu_session.json").read_text())["results"]
    assert list(session) == ["check", "pretrain", "rollout"]
    assert all(r["status"] == "ok" and r["actual_min"] > 0 and r["estimate_min"] > 0 for r in session.values())
    assert "| pretrain | 3.5 |" in (tmp_path / "gpu_session.md").read_text()
    check = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    assert check["ceilings"] == {"note": "no CUDA device"} and check["gpu_tests"]["returncode"] == 0
    assert "skipped" in check["gpu_tests"]["summary"][-1]          # tests/gpu: every test skips by reason here

    doc = json.loads((tmp_path / "gpu_pretrain.json").read_text())
    for name in ("dense-bf16-ce", "dense-bf16-gen"):
        r = doc["results"][name]
        assert r["returncode"] == 0 and r["iterations"] == 8 and r["timed_iterations"] == 3, r
        assert sorted(map(int, r["losses"])) == list(range(1, 9))
        assert r["tokens_per_s"] == pytest.approx(4 * 64 / (r["ms_per_iter"] / 1000), rel=0.02)
        assert "--loss-function" in r["argv"] and r["peak_mem_gib"] > 0
    overhead = doc["summary"]["dense_bf16_generalized_overhead"]
    assert overhead == pytest.approx(doc["results"]["dense-bf16-gen"]["ms_per_iter"]
                                     / doc["results"]["dense-bf16-ce"]["ms_per_iter"] - 1)
    assert "| dense-bf16-gen | 8 |" in (tmp_path / "gpu_pretrain.md").read_text()
    rows = json.loads((tmp_path / "gpu_rollout.json").read_text())["results"]["static_engine"]["batches"]
    assert [r["generated_tokens"] for r in rows.values()] == [8, 32]     # no EOD stop: every token generated
    assert all(r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["seconds"]) for r in rows.values())

    # a second call (the next device call of a split session) merges into the same document, and the
    # summary compares runs of different calls (the FP8-vs-bf16 curve; on CPU the "fp8" run is bf16)
    run_phase("pretrain", "--runs", "dense-fp8-ce", out=tmp_path)
    doc = json.loads((tmp_path / "gpu_pretrain.json").read_text())
    assert set(doc["results"]) == {"dense-bf16-ce", "dense-bf16-gen", "dense-fp8-ce"} and len(doc["commands"]) == 2
    curve = doc["summary"]["curve"]
    assert curve["iterations"] == 8 and curve["max_rel_diff"] < 1e-6 and curve["within_tolerance"]
    assert doc["summary"]["dense_fp8_speedup"] == pytest.approx(
        doc["results"]["dense-fp8-ce"]["tokens_per_s"] / doc["results"]["dense-bf16-ce"]["tokens_per_s"])

    # what no longer fits half its estimate is skipped and named, not started
    proc = run_python([sys.executable, "benchmarks/gpu.py", "session", "--smoke", "--only", "loss", "--budget-s", "5",
                       "--output", tmp_path], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    loss = json.loads((tmp_path / "gpu_session.json").read_text())["results"]["loss"]
    assert loss["status"] == "skipped" and "estimate is 90 s" in loss["why"]
    assert not (tmp_path / "gpu_loss_floor.json").exists()


def test_plan_fits_the_budget(capsys):
    gpu = gpu_module()
    total = sum(st.minutes for st in gpu.SESSION)
    # one call plus the machine start within the budget, leaving the 4 minutes a second call may need
    assert gpu.MACHINE_START_MIN + total + 4 <= gpu.DEVICE_BUDGET_MIN
    assert [st.phase for st in gpu.SESSION] == ["install", "check", "loss", "pretrain", "rollout"]
    gpu.print_plan()
    out = capsys.readouterr().out
    assert f"session --budget-s {int(60 * (total + 1))}" in out and "carry=['benchmarks/.gpu-stage/lean']" in out
    with pytest.raises(SystemExit, match="unknown phases"):
        gpu.main(["session", "--only", "nonsense", "--smoke"])


def _tiny_wheel(folder: Path) -> Path:
    """A pure-Python wheel built by hand (name mrpt_probe): what `install` must put into the venv offline."""
    import base64
    import hashlib
    import zipfile
    files = {"mrpt_probe/__init__.py": b"VALUE = 42\n",
             "mrpt_probe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: mrpt-probe\nVersion: 0.1\n",
             "mrpt_probe-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               b"Tag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + "mrpt_probe-0.1.dist-info/RECORD,,\n"
    path = folder / "mrpt_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("mrpt_probe-0.1.dist-info/RECORD", record)
    return path


def test_install_phase_offline(tmp_path):
    """`install` from carried parts: checks them, makes the venv, installs the wheels with no index, and
    proves the probe modules import (the TE build and the real wheels only exist on the GPU side)."""
    gpu = gpu_module()
    payload = tmp_path / "payload"
    (payload / "wheels").mkdir(parents=True)
    _tiny_wheel(payload / "wheels")
    gpu.pack(payload, tmp_path / "stage" / "parts", part_bytes=1000)
    venv = tmp_path / "venv"
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "install", "--stage", str(tmp_path / "stage"),
                           "--venv", str(venv), "--probe", "mrpt_probe"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((venv / "install.json").read_text())
    assert report["imports"] == ["mrpt_probe 0.1"] and report["sdist_build_s"] < 5
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import mrpt_probe; print(mrpt_probe.VALUE)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "42"
    # a missing part stops the install with its name, before anything is installed
    (tmp_path / "stage" / "parts" / "payload.tar.001").unlink()
    again = subprocess.run([sys.executable, "benchmarks/gpu.py", "install", "--stage", str(tmp_path / "stage"),
                            "--venv", str(tmp_path / "venv2")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "parts not here yet: payload.tar.001" in again.stderr
    assert not (tmp_path / "venv2" / "bin").exists()
    # the 15-minute plan carries a plain folder of wheels (stage --lean) instead of parts
    lean = subprocess.run([sys.executable, "benchmarks/gpu.py", "install", "--wheels", str(payload), "--venv",
                           str(tmp_path / "venv3"), "--probe", "mrpt_probe"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert lean.returncode == 0, lean.stdout[-3000:] + lean.stderr[-3000:]
    assert json.loads((tmp_path / "venv3" / "install.json").read_text())["imports"] == ["mrpt_probe 0.1"]
    empty = subprocess.run([sys.executable, "benchmarks/gpu.py", "install", "--wheels", str(tmp_path / "stage"),
                            "--venv", str(tmp_path / "venv4")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert empty.returncode != 0 and "no wheels under" in empty.stderr


def test_bandwidth_bounds_by_hand():
    gpu = gpu_module()
    # 8192 x 151936 bf16: 3 passes of 2.49 GB at 3 TB/s
    moved, ms = gpu.loss_floor(8192, 151936, 2, 3000.0)
    assert moved == 3 * 8192 * 151936 * 2 == 7_467_958_272 and ms == pytest.approx(2.489319424)
    assert gpu.loss_floor(10, 10, 4, None) == (1200, None)
    # 1 GB of weights, 8 sequences at 1000 tokens of 100 kB KV each: 1.8 GB per step -> 8 tokens per 0.6 ms
    assert gpu.decode_roofline(8, 1e9, 1e5, 1000, 3000.0) == pytest.approx(8 / 0.0006)
    assert gpu.decode_roofline(1, 1e9, 0.0, 1, 1000.0) == pytest.approx(1000.0)   # weights only: 1 ms per token
    assert gpu.decode_roofline(8, 1e9, 1e5, 1000, None) is None
