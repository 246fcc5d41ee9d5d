"""One immutable segment of the embedded knowledge base: the chunks of the files one write added, with their
vectors in a FAISS index and their BM25 postings, in a folder `INDEX/seg-*/` that is never changed once written.

    Segment.write(folder, chunks, vectors, sources, 20000, *Segment.postings(chunks))
    segment = Segment.load(folder)           # chunk text and postings are memory-mapped, not read
    segment.chunk(row), segment.search(vector, pool, deleted), segment.vectors(rows)

A removal does not touch the segment: the manifest (`knowledge.store`) lists the sources deleted from it, and
searches skip their rows. Files:
- `chunks.jsonl` + `offsets.npy`: one chunk per line, read by row through mmap;
- `dense.faiss`: exact inner product below `approximate_after` rows, HNSW from there on (it holds the vectors too);
- `units.faiss` + `units.npy` (optional): the vectors of each row's sentences (`knowledge.chunking.sentence_units`)
  and where each row's sentences start (row r: units.npy[r]:units.npy[r + 1]); a search ranks a row by both (`search`);
- `words.*` and `characters.*`: `knowledge.lexical.Postings` of the rows' terms and characters;
- `sources.json`: source → path, sha256, added, rows [first, count], chunk languages.
Tested in tests/test_store.py.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from common.language import HAN
from knowledge.chunking import Chunk, language_counts
from knowledge.lexical import Part, Postings, character_terms, tokenize

HNSW_EF_SEARCH = 128  # recall@5 1.000 at 0.19x exact's time on 50k clustered vectors (benchmarks/)
# A row with sentence vectors ranks by (1 - SENTENCE_WEIGHT) x its own cosine + SENTENCE_WEIGHT x the best of its own
# and its sentences' cosines: on the bundled questions fused MRR 0.913 with the row's cosine alone, 0.941 at 0.5 and
# 0.7, measured on the five corpora the project did not write as well (README, "Sentence vectors").
SENTENCE_WEIGHT = 0.7
UNITS_PER_ROW = 4  # sentence hits searched per row hit: a row's sentences compete with other rows' for places


def build_faiss(vectors: np.ndarray, approximate_after: int) -> faiss.Index:
    """Exact inner-product search for small collections, HNSW for large ones."""
    dimension = vectors.shape[1]
    if len(vectors) >= approximate_after:
        index = faiss.IndexHNSWFlat(dimension, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        index = faiss.IndexFlatIP(dimension)
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@dataclass
class Segment:
    name: str
    folder: Path
    offsets: np.ndarray  # int64, rows + 1: row r is the bytes offsets[r]:offsets[r + 1] of chunks.jsonl
    text: mmap.mmap | bytes
    index: faiss.Index
    words: Postings
    characters: Postings
    sources: dict[str, dict]
    has_chinese: bool
    units: faiss.Index | None = None  # the rows' sentence vectors
    unit_offsets: np.ndarray | None = None  # int64, rows + 1: row r's sentences are units[offsets[r]:offsets[r + 1]]

    @property
    def size(self) -> int:
        return len(self.offsets) - 1

    # ----- writing -------------------------------------------------------------------------------------
    @staticmethod
    def write(folder: Path, chunks: list[Chunk], vectors: np.ndarray, sources: dict[str, dict],
              approximate_after: int, words: Postings, characters: Postings,
              units: list[np.ndarray] | None = None) -> None:
        """Write a segment into the new folder `folder` and fsync it. `chunks` are grouped by source, in the order
        of `sources`, whose entries get their `rows`, `chunks` and `languages` here; `words` and `characters` are
        the postings of the chunks' terms and characters (`Postings.build`, or `Postings.merge` of segments);
        `units[r]`: the sentence vectors of row r (none: a segment searched by its rows' vectors alone)."""
        folder.mkdir(parents=True)
        lines = [json.dumps(c.to_dict(), ensure_ascii=False).encode() + b"\n" for c in chunks]
        offsets = np.zeros(len(lines) + 1, np.int64)
        np.cumsum([len(line) for line in lines], out=offsets[1:])
        (folder / "chunks.jsonl").write_bytes(b"".join(lines))
        np.save(folder / "offsets.npy", offsets)
        words.save(folder, "words")
        characters.save(folder, "characters")
        faiss.write_index(build_faiss(vectors, approximate_after), str(folder / "dense.faiss"))
        if units is not None:
            if len(units) != len(chunks):
                raise ValueError("a segment needs one array of sentence vectors per row")
            starts = np.zeros(len(units) + 1, np.int64)  # row r's sentences: starts[r]:starts[r + 1]
            np.cumsum([len(u) for u in units], out=starts[1:])
            np.save(folder / "units.npy", starts)
            stacked = np.concatenate(units) if starts[-1] else np.zeros((0, vectors.shape[1]), np.float32)
            faiss.write_index(build_faiss(stacked, approximate_after), str(folder / "units.faiss"))
        first = 0
        for meta in sources.values():
            count = 0
            while first + count < len(chunks) and chunks[first + count].source == chunks[first].source:
                count += 1
            meta |= {"rows": [first, count], "chunks": count, "languages": language_counts(chunks[first:first + count])}
            first += count
        if first != len(chunks) or any(c.source not in sources for c in chunks):
            raise ValueError("a segment's chunks must be grouped by source, in the order of its sources")
        chinese = any(HAN.search(c.indexed_text) for c in chunks)
        (folder / "sources.json").write_text(json.dumps({"chinese": chinese, "sources": sources}, ensure_ascii=False))
        for path in folder.iterdir():
            fsync_file(path)

    @staticmethod
    def postings(chunks: list[Chunk], tokens: list[list[str]] | None = None) -> tuple[Postings, Postings]:
        """(words, characters) postings of new chunks; `tokens`: their BM25 terms, when the caller has them."""
        texts = [c.indexed_text for c in chunks]
        return (Postings.build(tokens if tokens is not None else [tokenize(t) for t in texts]),
                Postings.build([character_terms(t) for t in texts]))

    # ----- reading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path) -> Segment:
        meta = json.loads((folder / "sources.json").read_text())
        offsets = np.load(folder / "offsets.npy")
        with open(folder / "chunks.jsonl", "rb") as f:
            text = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if offsets[-1] else b""
        index = faiss.read_index(str(folder / "dense.faiss"))
        if isinstance(index, faiss.IndexHNSWFlat):
            index.hnsw.efSearch = HNSW_EF_SEARCH
        units, unit_offsets = None, None
        if (folder / "units.faiss").exists():  # (segments written before sentence vectors have none)
            units, unit_offsets = faiss.read_index(str(folder / "units.faiss")), np.load(folder / "units.npy")
            if isinstance(units, faiss.IndexHNSWFlat):
                units.hnsw.efSearch = HNSW_EF_SEARCH
        segment = cls(folder.name, folder, offsets, text, index, Postings.load(folder, "words"),
                      Postings.load(folder, "characters"), meta["sources"], meta["chinese"], units, unit_offsets)
        if not (segment.size == index.ntotal == len(segment.words.lengths)
                == sum(m["chunks"] for m in segment.sources.values())) or (
                units is not None and not (len(unit_offsets) == segment.size + 1 == len(offsets)
                                           and unit_offsets[-1] == units.ntotal)):
            raise ValueError(f"segment {folder} is inconsistent")
        return segment

    def chunk(self, row: int) -> Chunk:
        return Chunk(**json.loads(self.text[int(self.offsets[row]):int(self.offsets[row + 1])]))

    def chunks(self, rows: range | list[int]) -> list[Chunk]:
        return [self.chunk(r) for r in rows]

    def rows(self, source: str) -> range:
        first, count = self.sources[source]["rows"]
        return range(first, first + count)

    def vectors(self, rows: range | list[int]) -> np.ndarray:
        keys = np.asarray(list(rows), np.int64)
        if not len(keys):
            return np.zeros((0, self.index.d), np.float32)
        return self.index.reconstruct_batch(keys)

    def unit_vectors(self, rows: range | list[int]) -> list[np.ndarray]:
        """The sentence vectors of each of `rows` (none for a segment written without them)."""
        if self.units is None:
            return [np.zeros((0, self.index.d), np.float32) for _ in rows]
        offsets = self.unit_offsets
        keys = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows] or [np.zeros(0)]).astype(np.int64)
        stacked = self.units.reconstruct_batch(keys) if len(keys) else np.zeros((0, self.index.d), np.float32)
        return np.split(stacked, np.cumsum([offsets[r + 1] - offsets[r] for r in rows])[:-1])

    def deleted_mask(self, deleted: list[str]) -> np.ndarray | None:
        """Rows of the deleted sources, as a mask; None when nothing is deleted."""
        if not deleted:
            return None
        mask = np.zeros(self.size, bool)
        for source in deleted:
            rows = self.rows(source)
            mask[rows.start:rows.stop] = True
        return mask

    def part(self, deleted: np.ndarray | None, base: int) -> Part:
        return Part(self.words, self.characters, deleted, base, self.has_chinese)

    def search(self, vector: np.ndarray, pool: int, deleted: np.ndarray | None) -> list[tuple[int, float, float]]:
        """(row, score, cosine) of the `pool` live rows nearest to `vector`, best first. The score is the row's
        cosine, or with sentence vectors its mix with the best of its own and its sentences' (SENTENCE_WEIGHT),
        computed exactly for the rows either search finds. Deleted rows are filtered inside FAISS's search (an
        HNSW search does not return fewer hits because of them)."""
        if not self.size:
            return []
        found = self._nearest(self.index, vector, min(pool, self.size), deleted)
        if self.units is None or not self.units.ntotal:
            return [(row, score, score) for row, score in found]
        unit_hits = self._nearest(self.units, vector, min(UNITS_PER_ROW * pool, self.units.ntotal), None)
        owners = np.searchsorted(self.unit_offsets, [unit for unit, _ in unit_hits], side="right") - 1
        rows = sorted({row for row, _ in found} | {int(r) for r in owners if deleted is None or not deleted[r]})
        cosines = self.vectors(rows) @ vector[0]
        # The row's own vector is one of its views: "What is LoRA?" matches the passage that defines LoRA as a
        # whole better than any one of its sentences, and a sentence elsewhere must not outrank it for that.
        best = [max(float((units @ vector[0]).max()), float(cosine)) if len(units) else float(cosine)
                for units, cosine in zip(self.unit_vectors(rows), cosines, strict=True)]
        scored = [(row, (1 - SENTENCE_WEIGHT) * float(cosine) + SENTENCE_WEIGHT * sentence, float(cosine))
                  for row, cosine, sentence in zip(rows, cosines, best, strict=True)]
        return sorted(scored, key=lambda item: -item[1])[:pool]

    @staticmethod
    def _nearest(index: faiss.Index, vector: np.ndarray, k: int, deleted: np.ndarray | None
                 ) -> list[tuple[int, float]]:
        if deleted is None:
            scores, rows = index.search(vector, k)
        else:
            hnsw = isinstance(index, faiss.IndexHNSWFlat)
            params = faiss.SearchParametersHNSW() if hnsw else faiss.SearchParameters()
            if hnsw:
                params.efSearch = max(HNSW_EF_SEARCH, k)
            selector = faiss.IDSelectorBatch(np.flatnonzero(deleted).astype(np.int64))
            params.sel = excluded = faiss.IDSelectorNot(selector)  # noqa: F841 (both must outlive the search)
            scores, rows = index.search(vector, k, params=params)
        return [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
