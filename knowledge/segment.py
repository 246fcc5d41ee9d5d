"""One immutable segment of the embedded knowledge base: the chunks of the files one write added, with their
vectors in a FAISS index and their BM25 postings, in a folder `INDEX/seg-*/` that is never changed once written.

    Segment.write(folder, chunks, vectors, sources, 20000, *Segment.postings(chunks))
    segment = Segment.load(folder)           # chunk text and postings are memory-mapped, not read
    segment.chunk(row), segment.search(vector, pool, deleted), segment.vectors(rows)

A removal does not touch the segment: the manifest (`knowledge.store`) lists the sources deleted from it, and
searches skip their rows. Files:
- `chunks.jsonl` + `offsets.npy`: one chunk per line, read by row through mmap;
- `dense.faiss`: exact inner product below `approximate_after` rows, HNSW from there on (it holds the vectors too);
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

    @property
    def size(self) -> int:
        return len(self.offsets) - 1

    # ----- writing -------------------------------------------------------------------------------------
    @staticmethod
    def write(folder: Path, chunks: list[Chunk], vectors: np.ndarray, sources: dict[str, dict],
              approximate_after: int, words: Postings, characters: Postings) -> None:
        """Write a segment into the new folder `folder` and fsync it. `chunks` are grouped by source, in the order
        of `sources`, whose entries get their `rows`, `chunks` and `languages` here; `words` and `characters` are
        the postings of the chunks' terms and characters (`Postings.build`, or `Postings.merge` of segments)."""
        folder.mkdir(parents=True)
        lines = [json.dumps(c.to_dict(), ensure_ascii=False).encode() + b"\n" for c in chunks]
        offsets = np.zeros(len(lines) + 1, np.int64)
        np.cumsum([len(line) for line in lines], out=offsets[1:])
        (folder / "chunks.jsonl").write_bytes(b"".join(lines))
        np.save(folder / "offsets.npy", offsets)
        words.save(folder, "words")
        characters.save(folder, "characters")
        faiss.write_index(build_faiss(vectors, approximate_after), str(folder / "dense.faiss"))
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
        segment = cls(folder.name, folder, offsets, text, index, Postings.load(folder, "words"),
                      Postings.load(folder, "characters"), meta["sources"], meta["chinese"])
        if not (segment.size == index.ntotal == len(segment.words.lengths)
                == sum(m["chunks"] for m in segment.sources.values())):
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

    def search(self, vector: np.ndarray, pool: int, deleted: np.ndarray | None) -> list[tuple[int, float]]:
        """(row, cosine) of the `pool` live rows nearest to `vector`, best first; deleted rows are filtered
        inside FAISS's search (an HNSW search does not return fewer hits because of them)."""
        if not self.size:
            return []
        if deleted is None:
            scores, rows = self.index.search(vector, min(pool, self.size))
        else:
            params = faiss.SearchParametersHNSW() if isinstance(self.index, faiss.IndexHNSWFlat) \
                else faiss.SearchParameters()
            if isinstance(self.index, faiss.IndexHNSWFlat):
                params.efSearch = max(HNSW_EF_SEARCH, pool)
            selector = faiss.IDSelectorBatch(np.flatnonzero(deleted).astype(np.int64))
            params.sel = excluded = faiss.IDSelectorNot(selector)  # noqa: F841 (both must outlive the search)
            scores, rows = self.index.search(vector, min(pool, self.size), params=params)
        return [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]

