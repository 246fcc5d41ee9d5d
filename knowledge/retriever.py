"""Searching a knowledge base: dense (FAISS), lexical (BM25 + jieba), and their fusion.

    retriever = Retriever(KnowledgeBase.open(path), Embedder())
    hits = retriever.search("什么是LoRA？", k=3)          # fused by default
    hits[0].chunk.label, hits[0].score, hits[0].relevance

Fusion is reciprocal-rank fusion weighted by the query's language: the embedder only votes for languages it
was trained on (`KnowledgeConfig.dense_languages`), because an English embedder's ranking of Chinese text
drags an equal-weight fusion far below BM25 alone (see `python -m knowledge evaluate`).

`relevance` (0..1) says whether a hit answers the query at all, for the "not covered" decision: the larger of
the dense cosine (when the embedder knows the language) and the IDF-weighted share of query terms the chunk
contains. Unlike BM25 or RRF scores, both are comparable across queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from knowledge.chunking import Chunk, text_language
from knowledge.embedder import Embedder
from knowledge.lexical import LexicalIndex, tokenize
from knowledge.store import IndexError_, KnowledgeBase

RRF_K = 60  # the usual constant: ranks 1 and 2 differ little, so neither retriever dominates by itself
MODES = ("fused", "dense", "lexical")


@dataclass
class Hit:
    chunk: Chunk
    score: float  # the ranking score of the mode searched (cosine, BM25 or weighted RRF)
    relevance: float  # 0..1, comparable across queries
    dense: float | None = None  # cosine similarity, when dense search ran
    lexical: float | None = None  # BM25 score (words), or its fusion with BM25 over characters for Chinese

    def to_dict(self) -> dict:
        chunk = self.chunk
        return {"source": chunk.source, "chunk_id": chunk.id, "heading": chunk.heading, "page": chunk.page,
                "text": chunk.text, "score": round(self.score, 4), "relevance": round(self.relevance, 4)}


class Retriever:
    def __init__(self, kb: KnowledgeBase, embedder: Embedder):
        self.kb, self.embedder = kb, embedder
        self.lexical = LexicalIndex(kb.tokens, [c.indexed_text for c in kb.chunks])

    @classmethod
    def open(cls, folder: Path, embedding_model: str | None = None) -> Retriever:
        """The index in `folder` with the embedder it was built with (IndexError_ if there is none)."""
        kb = KnowledgeBase.open(folder, create=False)
        if embedding_model and embedding_model != kb.embedder_name:
            raise IndexError_(f"the index in {folder} was built with '{kb.embedder_name}', not '{embedding_model}'")
        return cls(kb, Embedder(kb.config.embedding_model))

    def refresh(self) -> None:
        """Rebuild the in-memory BM25 index after the knowledge base changed."""
        self.lexical = LexicalIndex(self.kb.tokens, [c.indexed_text for c in self.kb.chunks])

    def search(self, query: str, k: int = 5, mode: str = "fused", language: str | None = None) -> list[Hit]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not len(self.kb) or not query.strip():
            return []
        language = language or text_language(query)
        terms = tokenize(query)
        pool = min(len(self.kb), max(50, 10 * k))  # candidates from each retriever before fusion
        use_dense = mode == "dense" or (mode == "fused" and self.kb.config.uses_dense(language))
        dense = self._dense(query, pool) if use_dense else {}
        lexical = self.lexical.search(query, pool) if mode != "dense" else {}
        if mode == "dense":
            ranked = sorted(dense.items(), key=lambda item: -item[1])
        elif mode == "lexical":
            ranked = sorted(lexical.items(), key=lambda item: -item[1])
        else:
            ranked = sorted(self._fuse(dense, lexical).items(), key=lambda item: -item[1])
        hits = []
        for row, score in ranked[:k]:
            coverage = self.lexical.coverage(terms, self.kb.tokens[row])
            cosine = dense.get(row) if self.kb.config.uses_dense(language) else None
            hits.append(Hit(self.kb.chunks[row], float(score), max(coverage, cosine or 0.0),
                            dense.get(row), lexical.get(row)))
        return hits

    def _dense(self, query: str, pool: int) -> dict[int, float]:
        vector = self.embedder.encode([query])
        scores, rows = self.kb.index.search(vector, pool)
        return {int(r): float(s) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0}

    @staticmethod
    def _fuse(dense: dict[int, float], lexical: dict[int, float]) -> dict[int, float]:
        fused: dict[int, float] = {}
        for results in (dense, lexical):
            for rank, row in enumerate(sorted(results, key=lambda r: -results[r]), 1):
                fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + rank)
        return fused
