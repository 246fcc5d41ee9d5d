"""The on-disk knowledge base: incremental add/change/remove, persistence, crash safety, HNSW past a size."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import faiss
import pytest

from knowledge.config import KnowledgeConfig
from knowledge.store import IndexError_, KnowledgeBase

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "knowledge" / "corpus"


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "lora.md").write_text("# LoRA\n\nLoRA freezes the base weights.\n\n## Size\n\nAdapters are a few MB.")
    (folder / "rag.md").write_text("# 检索增强生成\n\n先检索相关段落，再生成回答。回答要注明出处。")
    return folder


def consistent(folder: Path) -> KnowledgeBase:
    kb = KnowledgeBase.open(folder, create=False)
    assert len(kb.chunks) == len(kb.vectors) == kb.index.ntotal == len(kb.tokens)
    assert sum(meta["chunks"] for meta in kb.sources.values()) == len(kb.chunks)
    return kb


def test_build_add_change_remove(tmp_path, docs, tiny_embedder):
    index = tmp_path / "index"
    kb = KnowledgeBase.open(index)
    report = kb.add([docs], tiny_embedder, progress=False)
    assert sorted(report.added) == ["lora.md", "rag.md"] and report.chunks == 3
    generation = (index / "CURRENT").read_text()
    ids = {c.id for c in consistent(index).chunks}

    again = KnowledgeBase.open(index).add([docs], tiny_embedder, progress=False)
    assert sorted(again.unchanged) == ["lora.md", "rag.md"] and not again.added
    assert (index / "CURRENT").read_text() == generation, "an unchanged file must not rewrite the index"
    assert {c.id for c in consistent(index).chunks} == ids

    (docs / "lora.md").write_text("# LoRA\n\nLoRA freezes the base weights.\n\n## Size\n\nAdapters are tiny.")
    changed = KnowledgeBase.open(index).add([docs], tiny_embedder, progress=False)
    assert changed.updated == ["lora.md"] and changed.unchanged == ["rag.md"]
    kb = consistent(index)
    texts = [c.text for c in kb.chunks]
    assert "Adapters are tiny." in texts and "Adapters are a few MB." not in texts
    assert len(ids & {c.id for c in kb.chunks}) == 2, "unchanged chunks keep their ids"

    assert KnowledgeBase.open(index).remove(["lora.md", "nope.md"]) == ["lora.md"]
    kb = consistent(index)
    assert {c.source for c in kb.chunks} == {"rag.md"} and list(kb.sources) == ["rag.md"]
    assert len(list(index.glob("gen-*"))) == 1, "old generations are cleaned up"


def test_bad_files_are_skipped_and_the_build_goes_on(tmp_path, docs, tiny_embedder):
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 nonsense")
    (docs / "empty.txt").write_text("")
    report = KnowledgeBase.open(tmp_path / "index").add([docs], tiny_embedder, progress=False)
    assert sorted(report.added) == ["lora.md", "rag.md"]
    assert sorted(Path(path).name for path, _ in report.skipped) == ["broken.pdf", "empty.txt"]
    assert all(reason for _, reason in report.skipped)


def test_a_failed_write_leaves_the_previous_index(tmp_path, docs, tiny_embedder, monkeypatch):
    index = tmp_path / "index"
    KnowledgeBase.open(index).add([docs], tiny_embedder, progress=False)
    before = [c.id for c in consistent(index).chunks]
    (docs / "new.md").write_text("# New\n\nA new document about early stopping.")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)  # dies half-way through writing the new generation
    with pytest.raises(OSError, match="disk full"):
        KnowledgeBase.open(index).add([docs], tiny_embedder, progress=False)
    monkeypatch.undo()
    assert [c.id for c in consistent(index).chunks] == before
    KnowledgeBase.open(index).add([docs], tiny_embedder, progress=False)  # and the next write cleans up
    assert "new.md" in consistent(index).sources
    assert not list(index.glob("tmp-*"))


@pytest.mark.slow
def test_sigkill_during_build_never_leaves_a_broken_index(tmp_path, embedder):
    big = tmp_path / "big"
    for copy in range(3):  # enough text that embedding takes a few seconds
        shutil.copytree(CORPUS, big / f"copy{copy}")
        for file in (big / f"copy{copy}").rglob("*.md"):
            file.write_text(file.read_text() + f"\n\nCopy {copy}.")
    index = tmp_path / "index"
    KnowledgeBase.open(index).add([CORPUS / "en" / "lora.md"], embedder, progress=False)
    command = [sys.executable, "-m", "knowledge", "add", str(big), "--index", str(index)]
    start = time.time()
    subprocess.run(command[:3] + ["build", str(CORPUS / "en"), "--index", str(tmp_path / "timing")],
                   cwd=ROOT, check=True, capture_output=True)
    duration = time.time() - start
    for delay in [duration * f for f in (0.6, 0.9, 1.1, 1.4)]:  # while loading, reading, embedding, writing
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        kb = consistent(index)
        assert kb.sources, "the index must still load with its earlier contents"
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert len(consistent(index).sources) == 1 + 3 * 22


def test_hnsw_past_the_configured_size(tmp_path, docs, tiny_embedder):
    kb = KnowledgeBase.open(tmp_path / "index", KnowledgeConfig(approximate_after=2))
    kb.add([docs], tiny_embedder, progress=False)
    assert isinstance(consistent(tmp_path / "index").index, faiss.IndexHNSWFlat)


def test_the_settings_are_saved_with_the_index(tmp_path, docs, tiny_embedder):
    index = tmp_path / "index"
    KnowledgeBase.open(index, KnowledgeConfig(chunk_tokens=50)).add([docs], tiny_embedder, progress=False)
    manifest_file = index / (index / "CURRENT").read_text() / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["config"] == asdict(KnowledgeConfig(chunk_tokens=50)) and manifest["embedder"] == "tiny-hash"
    assert "dense_languages" not in manifest["config"], "a setting of the search is not saved with the index"
    assert KnowledgeBase.open(index).config.chunk_tokens == 50
    # Indexes written before dense_languages moved to the retriever still open.
    manifest["config"]["dense_languages"] = "en"
    manifest_file.write_text(json.dumps(manifest))
    assert KnowledgeBase.open(index, create=False).config.chunk_tokens == 50


def test_an_old_generation_that_cannot_be_deleted_is_reported(tmp_path, docs, tiny_embedder, monkeypatch, capsys):
    index = tmp_path / "index"
    KnowledgeBase.open(index).add([docs], tiny_embedder, progress=False)
    old = index / (index / "CURRENT").read_text()

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    with monkeypatch.context() as patch:
        patch.setattr("knowledge.store.shutil.rmtree", refuse)
        KnowledgeBase.open(index).remove(["rag.md"])
    assert old.is_dir() and f"could not delete the old index generation {old}" in capsys.readouterr().err
    KnowledgeBase.open(index).remove(["lora.md"])  # the next write deletes it
    assert not old.exists() and len(list(index.glob("gen-*"))) == 1


def test_opening_a_missing_or_inconsistent_index_fails_clearly(tmp_path, docs, tiny_embedder):
    with pytest.raises(IndexError_, match="holds no index"):
        KnowledgeBase.open(tmp_path / "none", create=False)
    index = tmp_path / "index"
    KnowledgeBase.open(index).add([docs], tiny_embedder, progress=False)
    generation = index / (index / "CURRENT").read_text()
    rows = (generation / "chunks.jsonl").read_text().splitlines()
    (generation / "chunks.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(IndexError_, match="inconsistent"):
        KnowledgeBase.open(index, create=False)
    os.remove(generation / "dense.faiss")
    with pytest.raises(IndexError_, match="cannot be read"):
        KnowledgeBase.open(index, create=False)


def test_two_writers_on_one_folder_lose_nothing_and_readers_catch_up(tmp_path, docs, tiny_embedder, monkeypatch):
    from knowledge import retriever as retriever_module
    from knowledge.retriever import Retriever

    folder = tmp_path / "index"
    KnowledgeBase.open(folder).add([docs], tiny_embedder, progress=False)
    app, cli = KnowledgeBase.open(folder), KnowledgeBase.open(folder)  # two processes' copies of the same state
    searcher = Retriever(app, tiny_embedder)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "cli.md").write_text("# Zanzibar\n\nThe Pemba cooperative grows cloves on Zanzibar.\n")
    (extra / "app.md").write_text("# Tromsø\n\nThe northern lights over Tromsø are brightest in February.\n")
    cli.add([extra / "cli.md"], tiny_embedder, progress=False)
    app.add([extra / "app.md"], tiny_embedder, progress=False)  # written from a copy that predates cli.md
    on_disk = KnowledgeBase.open(folder).sources
    assert {"cli.md", "app.md"} <= set(on_disk), "the second writer dropped the first one's document"
    assert len(KnowledgeBase.open(folder)) == len(app)

    cli.remove(["app.md"])
    monkeypatch.setattr(retriever_module, "CHECK_EVERY", 0.0)
    searcher.refresh()  # (the app refreshes its BM25 index after its own write)
    assert searcher.search("Tromsø northern lights", k=1, mode="lexical") == [], "the removal is seen"
    assert searcher.search("Pemba cooperative cloves", k=1, mode="lexical")[0].chunk.source == "cli.md"
    assert "app.md" not in app.sources


def test_a_file_over_the_limit_is_refused_before_it_is_read(tmp_path, tiny_embedder, monkeypatch):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(3 * 2**20)  # 3 MB of nothing
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    monkeypatch.setattr("knowledge.store.hashlib.sha256", lambda *args: pytest.fail("a digest was computed"))
    report = KnowledgeBase.open(tmp_path / "index", KnowledgeConfig(max_file_mb=1)).add([big], tiny_embedder,
                                                                                      progress=False)
    assert report.skipped and "too large" in report.skipped[0][1]


def test_adding_a_file_extends_the_hnsw_graph_instead_of_rebuilding_it(tmp_path, docs, tiny_embedder, monkeypatch):
    import knowledge.store as store

    folder = tmp_path / "index"
    KnowledgeBase.open(folder, KnowledgeConfig(approximate_after=2)).add([docs], tiny_embedder, progress=False)
    kb = KnowledgeBase.open(folder)
    assert isinstance(kb.index, faiss.IndexHNSWFlat)
    (tmp_path / "new.md").write_text("# Zanzibar\n\nThe Pemba cooperative grows cloves on Zanzibar.\n")
    monkeypatch.setattr(store, "build_faiss", lambda *args: pytest.fail("the graph was rebuilt for an append"))
    kb.add([tmp_path / "new.md"], tiny_embedder, progress=False)
    reopened = consistent(folder)
    assert isinstance(reopened.index, faiss.IndexHNSWFlat) and reopened.index.ntotal == len(reopened.chunks)
    row = next(i for i, c in enumerate(reopened.chunks) if c.source == "new.md")
    assert reopened.index.search(reopened.vectors[row:row + 1], 1)[1][0][0] == row
    monkeypatch.undo()
    kb.remove(["new.md"])  # a removal renumbers the rows: rebuilt
    assert consistent(folder).index.ntotal == len(kb.chunks)
