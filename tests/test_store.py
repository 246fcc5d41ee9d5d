"""The on-disk knowledge base: incremental add/change/remove in segments, persistence, crash safety, HNSW past a
size, merging and compaction, consistency between processes, upgrading an index of the earlier format."""

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
import numpy as np
import pytest

from knowledge.chunking import sentence_units
from knowledge.config import KnowledgeConfig
from knowledge.embedded import KnowledgeBase
from knowledge.lexical import LexicalIndex, character_terms, tokenize
from knowledge.store import IndexError_

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "knowledge" / "corpus"


def consistent(folder: Path) -> KnowledgeBase:
    kb = KnowledgeBase.open(folder, create=False)
    for segment in kb.state.segments:
        assert segment.size == segment.index.ntotal == len(segment.words.lengths) == len(segment.characters.lengths)
    assert sum(meta["chunks"] for meta in kb.sources.values()) == len(kb) == len(kb.chunks())
    assert {c.source for c in kb.chunks()} == set(kb.sources)
    return kb


def manifest(folder: Path) -> dict:
    return json.loads((folder / (folder / "CURRENT").read_text()).read_text())


def test_build_add_change_remove(tmp_path, docs, tiny_embedder):
    index = tmp_path / "index"
    kb = KnowledgeBase.open(index)
    report = kb.add([docs], tiny_embedder, progress=False)
    assert sorted(report.added) == ["lora.md", "rag.md"] and report.chunks == 3
    generation = (index / "CURRENT").read_text()
    ids = {c.id for c in consistent(index).chunks()}

    again = KnowledgeBase.open(index).add([docs], tiny_embedder, progress=False)
    assert sorted(again.unchanged) == ["lora.md", "rag.md"] and not again.added
    assert (index / "CURRENT").read_text() == generation, "an unchanged file must not rewrite the index"
    assert {c.id for c in consistent(index).chunks()} == ids

    (docs / "lora.md").write_text("# LoRA\n\nLoRA freezes the base weights.\n\n## Size\n\nAdapters are tiny.")
    changed = KnowledgeBase.open(index).add([docs], tiny_embedder, progress=False)
    assert changed.updated == ["lora.md"] and changed.unchanged == ["rag.md"]
    kb = consistent(index)
    texts = [c.text for c in kb.chunks()]
    assert "Adapters are tiny." in texts and "Adapters are a few MB." not in texts
    assert len(ids & {c.id for c in kb.chunks()}) == 2, "unchanged chunks keep their ids"

    assert KnowledgeBase.open(index).remove(["lora.md", "nope.md"]) == ["lora.md"]
    kb = consistent(index)
    assert {c.source for c in kb.chunks()} == {"rag.md"} and list(kb.sources) == ["rag.md"]
    assert len(list(index.glob("gen-*"))) == 1, "old generations are cleaned up"
    assert {p.name for p in index.glob("seg-*")} == {seg.name for seg in kb.state.segments}


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
    before = [c.id for c in consistent(index).chunks()]
    (docs / "new.md").write_text("# New\n\nA new document about early stopping.")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)  # dies half-way through writing the new segment
    with pytest.raises(OSError, match="disk full"):
        KnowledgeBase.open(index).add([docs], tiny_embedder, progress=False)
    monkeypatch.undo()
    assert [c.id for c in consistent(index).chunks()] == before
    monkeypatch.setattr("knowledge.embedded._alive", lambda name: False)  # as if the writer had died
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
    assert [type(s.index) for s in consistent(tmp_path / "index").state.segments] == [faiss.IndexHNSWFlat]


def test_the_settings_are_saved_with_the_index(tmp_path, docs, tiny_embedder):
    index = tmp_path / "index"
    KnowledgeBase.open(index, KnowledgeConfig(chunk_tokens=50)).add([docs], tiny_embedder, progress=False)
    saved = manifest(index)
    assert saved["config"] == asdict(KnowledgeConfig(chunk_tokens=50)) and saved["embedder"] == "tiny-hash"
    assert "dense_languages" not in saved["config"], "a setting of the search is not saved with the index"
    assert KnowledgeBase.open(index).config.chunk_tokens == 50
    # Indexes written before dense_languages moved to the retriever still open.
    saved["config"]["dense_languages"] = "en"
    (index / (index / "CURRENT").read_text()).write_text(json.dumps(saved))
    assert KnowledgeBase.open(index, create=False).config.chunk_tokens == 50


def test_a_segment_that_cannot_be_deleted_is_reported(tmp_path, docs, tiny_embedder, monkeypatch, capsys):
    index = tmp_path / "index"
    KnowledgeBase.open(index).add([docs / "lora.md"], tiny_embedder, progress=False)
    KnowledgeBase.open(index).add([docs / "rag.md"], tiny_embedder, progress=False)
    first = index / manifest(index)["segments"][0]["name"]

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    with monkeypatch.context() as patch:
        patch.setattr("knowledge.embedded.shutil.rmtree", refuse)
        KnowledgeBase.open(index).remove(["lora.md"])  # its segment is then wholly deleted
    assert first.is_dir() and f"could not delete {first}" in capsys.readouterr().err
    KnowledgeBase.open(index).remove(["rag.md"])  # the next write deletes it
    assert not first.exists() and len(list(index.glob("gen-*"))) == 1


def test_opening_a_missing_or_inconsistent_index_fails_clearly(tmp_path, docs, tiny_embedder):
    with pytest.raises(IndexError_, match="holds no index"):
        KnowledgeBase.open(tmp_path / "none", create=False)
    index = tmp_path / "index"
    KnowledgeBase.open(index).add([docs], tiny_embedder, progress=False)
    segment = index / manifest(index)["segments"][0]["name"]
    np.save(segment / "offsets.npy", np.load(segment / "offsets.npy")[:-1])
    with pytest.raises(IndexError_, match="inconsistent"):
        KnowledgeBase.open(index, create=False)
    os.remove(segment / "dense.faiss")
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


def many_files(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    topics = ["LoRA freezes the base weights", "早停在验证损失上升时停止训练", "BLEU counts matching n-grams",
              "困惑度衡量模型对文本的意外程度", "Dropout zeroes random activations"]
    files = []
    for i in range(count):
        files.append(folder / f"note{i:02d}.md")
        files[-1].write_text(f"# Note {i}\n\n{topics[i % 5]} (note {i}).\n\n{topics[(i * 3) % 5]} again, {i} times.")
    return files


def test_a_write_costs_what_the_file_costs(tmp_path, docs, tiny_embedder, monkeypatch):
    import knowledge.segment as segment_module

    folder = tmp_path / "index"
    big = many_files(tmp_path / "many", 30)
    KnowledgeBase.open(folder, KnowledgeConfig(approximate_after=8)).add(big, tiny_embedder, progress=False)
    built: list[int] = []
    original = segment_module.build_faiss
    monkeypatch.setattr(segment_module, "build_faiss", lambda vectors, after: built.append(len(vectors)) or
                        original(vectors, after))
    kb = KnowledgeBase.open(folder)
    kb.add([docs / "lora.md"], tiny_embedder, progress=False)
    sentences = sum(len(sentence_units(c)) for c in kb.chunks("lora.md"))
    assert built == [2, sentences], "adding a file of two chunks indexed only those two (and their sentences)"
    kb.remove(["note03.md"])
    assert built == [2, sentences], "a removal rebuilds nothing"
    (tmp_path / "many" / "note04.md").write_text("# Note 4\n\nRewritten entirely.")
    kb.add([tmp_path / "many" / "note04.md"], tiny_embedder, progress=False)
    assert built == [2, sentences, 1, 0, 3, sentences + 0], \
        "a changed file is a segment of its own, then merged with the small newest one"
    kb = consistent(folder)
    assert "note03.md" not in kb.sources and kb.chunks("note04.md")[0].text == "Rewritten entirely."
    assert manifest(folder)["segments"][0]["deleted"] == ["note03.md", "note04.md"]
    for query in ("LoRA base weights", "Rewritten", "note 3"):
        assert all(hit.chunk.source != "note03.md" for hit in kb.search(query, None, 10, "lexical"))
    vector = tiny_embedder.encode(["note 3 dropout"])
    hits = kb.search("", vector, 10, "dense")
    assert len(hits) == 10 and all(hit.chunk.source != "note03.md" for hit in hits), "HNSW skips deleted rows"


def test_segments_score_as_one_index_and_merge_to_a_few(tmp_path, tiny_embedder):
    files = many_files(tmp_path / "many", 24)
    incremental = KnowledgeBase.open(tmp_path / "a")
    for file in files:
        incremental.add([file], tiny_embedder, progress=False)
    incremental.remove(["note05.md", "note17.md"])
    assert len(incremental.state.segments) <= 6, "small writes are merged, a logarithmic number of segments"
    once = KnowledgeBase.open(tmp_path / "b")
    once.add([f for f in files if f.name not in ("note05.md", "note17.md")], tiny_embedder, progress=False)
    assert len(once.state.segments) == 1 and len(once) == len(incremental)
    chunks = once.chunks()
    reference = LexicalIndex.of([tokenize(c.indexed_text) for c in chunks], [c.indexed_text for c in chunks])
    def by_id(kb, query, mode="lexical"):
        return {h.chunk.id: round(h.score, 4) for h in kb.search(query, tiny_embedder.encode([query]), 10, mode)}

    for query in ("LoRA base weights", "早停 验证损失", "BLEU n-grams note 7", "困惑度"):
        # The same scores (equal ones at the cut may be other chunks: the rows are numbered differently).
        for mode in ("lexical", "dense"):
            scores = [sorted(by_id(kb, query, mode).values()) for kb in (incremental, once)]
            assert scores[0] == scores[1], (query, mode)
        expected = dict(list(reference.search(query, 100).items())[:10])  # as one BM25 index over the same rows
        assert {chunks[row].id: round(score, 4) for row, score in expected.items()} == by_id(once, query), query
        for term in tokenize(query):
            assert incremental.lexical.df(term) == reference.df(term) and once.lexical.df(term) == reference.df(term)
        characters = [sorted(round(v, 4) for v in lexicon.scores(character_terms(query), 10, "characters").values())
                      for lexicon in (incremental.lexical, reference)]
        assert characters[0] == characters[1], query
    incremental.compact()
    assert len(incremental.state.segments) == 1 and not manifest(tmp_path / "a")["segments"][0]["deleted"]
    assert sorted(c.id for c in incremental.chunks()) == sorted(c.id for c in chunks)


def test_an_index_of_the_earlier_format_is_upgraded(tmp_path, docs, tiny_embedder):
    from knowledge.chunking import chunk_document
    from knowledge.loaders import load_file

    folder = tmp_path / "index"
    generation = folder / "gen-20260101-000000-abcdef12"
    generation.mkdir(parents=True)
    rows, sources = [], {}
    for name in ("lora.md", "rag.md"):
        chunks = chunk_document(load_file(docs / name, name), 160, 30)
        rows += [c.to_dict() | {"tokens": tokenize(c.indexed_text)} for c in chunks]
        sources[name] = {"path": str(docs / name), "sha256": "-", "chunks": len(chunks), "added": "2026-01-01"}
    vectors = tiny_embedder.encode([(r["heading"] + "\n" + r["text"]) if r["heading"] else r["text"] for r in rows])
    (generation / "chunks.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    np.save(generation / "vectors.npy", vectors)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(generation / "dense.faiss"))
    (generation / "manifest.json").write_text(json.dumps({
        "format": 1, "embedder": "tiny-hash", "dimension": 64, "chunks": len(rows),
        "config": asdict(KnowledgeConfig()), "sources": sources}))
    (folder / "CURRENT").write_text(generation.name)
    kb = consistent(folder)
    assert sorted(kb.sources) == ["lora.md", "rag.md"] and not generation.exists()
    assert kb.search("LoRA base weights", None, 1, "lexical")[0].chunk.source == "lora.md"


def test_background_embedding_keeps_the_order_of_the_texts_and_reports_its_errors(tiny_embedder):
    from knowledge.embedder import Background

    class Slow:  # a window takes 0.3 s, as on a large build, so that progress is reported on the way
        dimension = tiny_embedder.dimension

        def encode(self, texts):
            time.sleep(0.3)
            return tiny_embedder.encode(texts)

    texts = [f"text {i} " + "word " * (i % 7) for i in range(4 * Background.WINDOW)]  # windows are sorted inside
    job = Background(Slow())
    for start in range(0, len(texts), 11):  # file by file, as read_files calls it
        job.add(texts[start:start + 11])
    reports: list[tuple[float, str]] = []
    vectors = job.vectors(lambda fraction, text: reports.append((fraction, text)))
    assert np.allclose(vectors, tiny_embedder.encode(texts))
    assert all(0.5 <= f <= 1 for f, _ in reports) and any(f < 1 for f, _ in reports), "progress on the way"
    assert all(text.startswith("embedding: ") and text.endswith(" s left") for _, text in reports), reports

    job = Background(tiny_embedder)  # fewer texts than a window: close() starts them without vectors()
    job.add(texts[:5])
    job.close()
    job.thread.join(5)
    assert job.done == 5 and np.allclose(job.vectors(), tiny_embedder.encode(texts[:5]))

    class Failing:
        dimension = 4

        def encode(self, texts):
            raise RuntimeError("the model failed")

    job = Background(Failing())
    job.add(["a", "b"])
    with pytest.raises(RuntimeError, match="the model failed"):
        job.vectors()
    with Background(tiny_embedder) as job:  # an error before vectors(): the thread stops, nothing waits
        job.add(["a"])
    job.thread.join(5)
    assert not job.thread.is_alive()


def test_a_file_that_fails_to_read_midway_leaves_the_index_as_it_was(tmp_path, tiny_embedder, monkeypatch):
    import knowledge.store

    folder = tmp_path / "index"
    KnowledgeBase.open(folder).add([CORPUS / "en"], tiny_embedder, progress=False)
    before = len(KnowledgeBase.open(folder))

    def broken(*args, **kwargs):
        raise MemoryError("out of memory while chunking")

    monkeypatch.setattr(knowledge.store, "chunk_document", broken)
    with pytest.raises(MemoryError):
        KnowledgeBase.open(folder).add([CORPUS / "zh"], tiny_embedder, progress=False)
    assert len(consistent(folder)) == before


def test_a_chunk_is_found_by_its_best_sentence_and_keeps_its_sentences_through_a_merge(tmp_path, tiny_embedder):
    """A question that repeats one sentence of a long chunk finds that chunk by the sentence's vector, where the
    chunk's own vector (an average of many sentences) loses to a short chunk that shares a few of its words."""
    folder = tmp_path / "docs"
    folder.mkdir()
    other = " ".join(f"Topic {word} covers {word} tables and {word} queues." for word in
                     ("alpha", "bravo", "delta", "echo", "foxtrot", "golf", "hotel"))
    (folder / "long.md").write_text(f"# Notes\n\n{other} Gradient checkpointing trades compute for memory.")
    (folder / "short.md").write_text("# Budget\n\nCompute and memory budgets. Plan the compute.")
    question = "gradient checkpointing trades compute for memory"
    vector = tiny_embedder.queries([question])
    found = {}
    for sentences in (False, True):
        kb = KnowledgeBase.open(tmp_path / f"index-{sentences}", KnowledgeConfig(sentence_vectors=sentences))
        kb.add([folder], tiny_embedder, progress=False)
        found[sentences] = [hit.chunk.source for hit in kb.search(question, vector, 2, "dense")]
        segment = kb.state.segments[0]
        assert (segment.units is not None) is sentences
        assert (segment.folder / "units.faiss").exists() is sentences
    assert found == {False: ["short.md", "long.md"], True: ["long.md", "short.md"]}
    kb = KnowledgeBase.open(tmp_path / "index-True")
    (folder / "more.md").write_text("# More\n\nAnother note. It says little.")
    kb.add([folder / "more.md"], tiny_embedder, progress=False)
    kb.compact()
    kb = consistent(tmp_path / "index-True")
    assert len(kb.state.segments) == 1 and kb.state.segments[0].units.ntotal == 8 + 2 + 2
    hits = kb.search(question, vector, 3, "dense")
    assert hits[0].chunk.source == "long.md", "the merged segment kept the sentence vectors"
    assert hits[0].dense == pytest.approx(float(tiny_embedder.encode([kb.chunks("long.md")[0].indexed_text])[0]
                                                @ vector[0]), abs=1e-5), "relevance is still the chunk's cosine"
    embedded: list[str] = []

    class Counting(type(tiny_embedder)):
        def encode(self, texts, **kwargs):
            embedded.extend(texts)
            return super().encode(texts, **kwargs)

    long = (folder / "long.md").read_text()
    (folder / "long.md").write_text(f"{long}\n\n## Later\n\nA new section arrives. It is short.")
    kb.add([folder / "long.md"], Counting(), progress=False)
    assert embedded and not any("checkpointing" in text for text in embedded), \
        "a changed file's unchanged chunk keeps its vector and its sentences' vectors"
    assert consistent(tmp_path / "index-True").search(question, vector, 1, "dense")[0].chunk.source == "long.md"
    old = KnowledgeBase.open(tmp_path / "index-False")
    old.add([folder / "more.md"], tiny_embedder, progress=False)
    assert consistent(tmp_path / "index-False").search(question, vector, 1, "dense")[0].chunk.source == "short.md"
