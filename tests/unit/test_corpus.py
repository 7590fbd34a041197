"""The offline demo corpus really comes from the Debian packages and is clean prose."""

import json
import shutil

import pytest

from megatron_rpt.data.corpus import CorpusError, build_demo_corpus

needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                               reason="apt-get/dpkg-deb not available (not a Debian/Ubuntu machine)")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return build_demo_corpus(tmp_path_factory.mktemp("corpus"))


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


@needs_apt
def test_corpus_is_cached_and_deterministic(corpus, tmp_path):
    stamp = corpus.stat().st_mtime_ns
    assert build_demo_corpus(corpus.parent) == corpus and corpus.stat().st_mtime_ns == stamp
    again = build_demo_corpus(tmp_path, sources=("austen", "moby_dick"))
    assert again.read_bytes() == corpus.read_bytes()


def test_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus sources"):
        build_demo_corpus(tmp_path, sources=("shakespeare",))


def test_missing_apt_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match="needs `apt-get`"):
        build_demo_corpus(tmp_path)
