"""Searching a knowledge base: dense (FAISS), lexical (BM25 + jieba), and their fusion.

    retriever = Retriever(KnowledgeBase.open(path), Embedder())
    hits = retriever.search("什么是LoRA？", k=3)          # fused by default
    hits[0].chunk.label, hits[0].score, hits[0].relevance

Fusion is reciprocal-rank fusion by the query's language: the embedder only votes for languages it was trained
on (`dense_languages`), because an English embedder's ranking of Chinese text drags an equal-weight fusion far
below BM25 alone (see `python -m knowledge evaluate`). It is a setting of the search, not of the index: the same
index serves `Retriever(kb, embedder, "en")` and `retriever.with_dense_languages("*")`. For English queries the
two are fused by score instead (`SCORE_FUSION`): reciprocal ranks buried a clear dense first that BM25 missed.

`relevance` (0..1) says whether a hit answers the query at all, for the "not covered" decision: the larger of
the dense cosine (when the embedder knows the language; rescaled from the embedder's `similarity_floor`, where
unrelated texts sit, to 1) and the IDF-weighted share of query terms the chunk contains. Unlike BM25 or RRF
scores, both are comparable across queries.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.language import detect_language
from knowledge.chunking import Chunk
from knowledge.config import DENSE_LANGUAGES
from knowledge.embedder import Embedder
from knowledge.lexical import Vocabulary, coverage, tokenize
from knowledge.store import IndexError_, Store, open_store

MODES = ("fused", "dense", "lexical")
# Query language → the dense ranking's weight in a fusion by rescaled scores (`knowledge.fusion.score_fusion`);
# other languages are fused by reciprocal rank. Chosen on the bundled questions by MRR (`python
# benchmarks/corpora.py --embedders bilingual --sweep`; English: MiniLM's cosines with BM25, 0.915 → 0.941, weights
# 0.55, 0.65 and 0.7 within 0.002; Chinese: reciprocal rank best, 0.969 against at most 0.968) and confirmed on the
# English corpora the project did not write (README, "Fusion that keeps strong single hits").
SCORE_FUSION = {"en": 0.75}
CHECK_EVERY = 2.0  # seconds between checks for changes committed by other processes


@dataclass
class Hit:
    chunk: Chunk
    score: float  # the ranking score of the mode searched (cosine, BM25, RRF or fused scores)
    relevance: float  # 0..1, comparable across queries
    dense: float | None = None  # cosine similarity, when dense search ran
    lexical: float | None = None  # BM25 score (words), or its fusion with BM25 over characters for Chinese
    meaning: float | None = None  # the dense cosine rescaled as in `relevance` (0..1); None when dense did not vote

    def to_dict(self) -> dict:
        chunk = self.chunk
        return {"source": chunk.source, "chunk_id": chunk.id, "heading": chunk.heading, "page": chunk.page,
                "text": chunk.text, "score": round(self.score, 4), "relevance": round(self.relevance, 4)}


class Retriever:
    def __init__(self, kb: Store, embedder: Embedder, dense_languages: str = DENSE_LANGUAGES,
                 score_fusion: dict[str, float] | None = None):
        """`kb`: the embedded `KnowledgeBase` or a `knowledge.milvus.MilvusStore`; `dense_languages`:
        comma-separated query languages the embedder handles ("*" = all, "auto" = the embedder's own);
        `score_fusion`: query language → dense weight of a fusion by score (default `SCORE_FUSION`; {}: reciprocal
        rank for every language)."""
        self.kb, self.embedder = kb, embedder
        self.score_fusion = SCORE_FUSION if score_fusion is None else score_fusion
        self.dense_languages = _language_set(dense_languages, embedder)
        # A search uses one committed state of the store from start to end whatever writes do meanwhile; the lock
        # only keeps the checks for other processes' changes (`sync`) one at a time.
        self.lock = threading.RLock()
        self.checked = time.monotonic()  # when the folder was last checked for other processes' changes

    @classmethod
    def open(cls, folder: Path | None, embedding_model: str | None = None, dense_languages: str = DENSE_LANGUAGES,
             milvus_uri: str | None = None, collection: str = "knowledge") -> Retriever:
        """The index in `folder` (or the Milvus collection at `milvus_uri`) with the embedder it was built with
        (IndexError_ if there is none)."""
        kb = open_store(folder, milvus_uri, collection, create=False)
        if embedding_model and embedding_model != kb.embedder_name:
            raise IndexError_(f"the index in {kb.location} was built with '{kb.embedder_name}', not "
                              f"'{embedding_model}'")
        return cls(kb, Embedder.for_index(kb.config, kb.embedder_name), dense_languages)

    def uses_dense(self, language: str) -> bool:
        """Whether the embedder's similarity counts for queries in `language`."""
        return "*" in self.dense_languages or language in self.dense_languages

    def similarity(self, cosine: float, language: str = "en") -> float:
        """The embedder's cosine on a 0..1 scale comparable across embedders: [its floor for queries in `language`,
        where unrelated texts sit, 1] → [0, 1]."""
        embedder = self.embedder
        floor = embedder.floor(language) if hasattr(embedder, "floor") else getattr(embedder, "similarity_floor", 0.0)
        return max(0.0, (cosine - floor) / (1 - floor))

    def with_dense_languages(self, dense_languages: str) -> Retriever:
        """The same indexes and embedder, searched with other `dense_languages` (nothing is rebuilt)."""
        other = copy.copy(self)
        other.dense_languages = _language_set(dense_languages, self.embedder)
        return other

    @property
    def lexical(self) -> Vocabulary:
        """The collection's term statistics, for relevance and routing."""
        return self.kb.lexical

    def sync(self) -> bool:
        """Pick up what another process (`python -m knowledge add`, a second app) committed, at most every
        CHECK_EVERY seconds; True if the index changed."""
        with self.lock:
            if time.monotonic() - self.checked < CHECK_EVERY:
                return False
            self.checked = time.monotonic()
            return self.kb.reload()

    def search(self, query: str, k: int = 5, mode: str = "fused", language: str | None = None) -> list[Hit]:
        """The best `k` chunks for `query`. Searches run side by side (each on one committed state of the store);
        only the check for other processes' changes is taken one at a time."""
        self.sync()
        return self._search(query, k, mode, language)

    def _search(self, query: str, k: int, mode: str, language: str | None) -> list[Hit]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not len(self.kb) or not query.strip():
            return []
        own = detect_language(query)  # the language the embedder reads the query in (BilingualEmbedder's half)
        language = language or own
        use_dense = mode == "dense" or (mode == "fused" and self.uses_dense(language))
        vector = self.embedder.queries([query]) if use_dense else None
        terms, vocabulary = tokenize(query), self.kb.lexical
        hits = []
        for found in self.kb.search(query, vector, k, mode, self.score_fusion.get(own) if use_dense else None):
            share = coverage(vocabulary, terms, tokenize(found.chunk.indexed_text))
            meaning = (self.similarity(found.dense, own) if self.uses_dense(language) and found.dense is not None
                       else None)
            hits.append(Hit(found.chunk, found.score, max(share, meaning or 0.0), found.dense, found.lexical,
                            meaning))
        return hits


def _language_set(codes: str, embedder) -> frozenset[str]:
    """The languages in `codes`; "auto": the embedder's (`languages`: en for MiniLM, * for e5 and bilingual)."""
    if codes.strip() == "auto":
        codes = getattr(embedder, "languages", "en")
    return frozenset(code.strip() for code in codes.split(",") if code.strip())
