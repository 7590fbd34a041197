"""The offline demo corpus really comes from the Debian packages and is clean prose."""

import json
import shutil

import pytest

from megatron_rpt.demo_assets.corpus import CorpusError, build_demo_corpus

needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                               reason="apt-get/dpkg-deb not available (not a Debian/Ubuntu machine)")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    # Shared with tests/e2e/test_data_tools.py: one download per pytest session.
    return build_demo_corpus(tmp_path_factory.getbasetemp() / "demo_corpus_cache")


@needs_apt
def test_corpus_content(corpus):
    docs = [json.loads(line) for line in open(corpus, encoding="utf-8")]
    titles = {d["title"] for d in docs}
    assert titles == {"Sense and Sensibility", "Pride and Prejudice", "Mansfield Park", "Emma",
                      "Northanger Abbey", "Persuasion", "Moby Dick"}
    text = "\n".join(d["text"] for d in docs)
    assert len(text) > 4_000_000
    assert "Call me Ishmael." in text and "Elizabeth" in text and "It is a truth universally acknowledged" in text
    assert "Gutenberg" not in text and "\r" not in text and "\ufeff" not in text
    assert all(200 < len(d["text"]) and d["text"].strip() == d["text"] for d in docs)
    assert "Project Gutenberg" not in text and "*** START OF" not in text and "*** END OF" not in text
    # Documents are chapters or paragraph groups of a few KB, each chapter starting a new one.
    assert 3000 < sum(len(d["text"]) for d in docs) / len(docs) < 6000
    assert sum(d["text"].startswith(("CHAPTER", "Chapter")) for d in docs if d["title"] == "Moby Dick") >= 135
    assert docs[-1]["text"].endswith("only found another orphan.")  # Moby Dick's epilogue, footer stripped


@needs_apt
def test_corpus_is_cached_and_deterministic(corpus, tmp_path):
    stamp = corpus.stat().st_mtime_ns
    assert build_demo_corpus(corpus.parent) == corpus and corpus.stat().st_mtime_ns == stamp
    again = build_demo_corpus(tmp_path, sources=("austen", "moby_dick"))
    assert again.read_bytes() == corpus.read_bytes()


def test_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus sources"):
        build_demo_corpus(tmp_path, sources=("shakespeare",))


def test_empty_apt_lists_without_root_say_what_to_run(tmp_path, monkeypatch):
    import megatron_rpt.demo_assets.corpus as corpus_mod
    monkeypatch.setattr(corpus_mod, "_apt_lists_empty", lambda: True)
    monkeypatch.setattr(corpus_mod.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(corpus_mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(CorpusError, match=r"lists \(/var/lib/apt/lists\) are empty.*run `sudo apt-get update`"):
        build_demo_corpus(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_apt_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match="needs `apt-get`"):
        build_demo_corpus(tmp_path)
