"""The knowledge base in Milvus, for collections that outgrow one machine: the same `Store` as the embedded one.

    python -m knowledge build docs/ --milvus-uri ./kb.db                 # Milvus Lite: an embedded local file
    python -m knowledge search "什么是LoRA？" --milvus-uri http://host:19530   # a Milvus Standalone/Distributed server
    python app.py --milvus-uri ./kb.db

`--milvus-uri` is what pymilvus' `MilvusClient(uri)` takes: a path ending in `.db` runs Milvus Lite in this process
(`pip install "milvus-lite[chinese]"`), `http://host:19530` talks to a server (several apps and the CLI can share
it; a Milvus Lite file is one process's). Without it the embedded store (`knowledge.store`) is used.

Two collections per knowledge base: `NAME` holds one row per chunk (dense vector, citation fields, and the text
Milvus indexes for BM25 itself, with the jieba tokenizer and the same stopwords as `knowledge.lexical`), and
`NAME_sources` one row per source file plus a settings row (embedder and `KnowledgeConfig`). Fused search is
Milvus's hybrid search: dense and BM25 requests ranked together by its RRF ranker (k = 60, as
`knowledge.fusion`). A changed file's new rows are inserted before its old ones are deleted, so a crash in between
leaves a duplicate, never a gap. Tested in tests/test_milvus.py against Milvus Lite.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from common.language import HAN
from knowledge.chunking import Chunk, language_counts
from knowledge.config import KnowledgeConfig
from knowledge.embedder import DEFAULT_EMBEDDER, Embedder
from knowledge.fusion import RRF_K
from knowledge.lexical import STOPWORDS, character_terms, normalized
from knowledge.store import FileEmbedding, IndexError_, Report, Scored, chunk_languages, read_files

COLLECTION = "knowledge"
SETTINGS = "#settings"  # the sources collection's row of settings (no file is found under that name)
PAGE = 5000  # rows per query page (Milvus caps one query at 16,384)
# A term's document frequency is counted up to this many rows: an exact count costs a BM25 search that returns every
# row with the term (a second at 20,000 rows on Milvus Lite), and past a few thousand the IDF of a term is small
# anyway. Routing needs "in no document" exactly, relevance the weights roughly.
MAX_DF_COUNT = 2000
FLUSH_AFTER = 1000  # rows; a large write is flushed so that its rows are indexed (Milvus Lite scans unflushed rows)
_CHUNK_FIELDS = ["chunk_id", "source", "heading", "page", "language", "text"]
ANALYZER = {"tokenizer": "jieba", "filter": ["lowercase", {"type": "stop", "stop_words": sorted(STOPWORDS)}]}


def _quoted(value: str) -> str:
    """A string literal for a Milvus filter expression."""
    return json.dumps(value, ensure_ascii=False)


class MilvusVocabulary:
    """Document frequencies from Milvus's own BM25 index (a term's count is the number of rows a BM25 search for
    it returns), cached until the collection changes; what routing and relevance need (`knowledge.lexical`)."""

    def __init__(self, store: MilvusStore):
        self.store = store
        self.size = len(store)
        self._df: dict[str, int] = {}

    def df(self, term: str) -> int:
        if term not in self._df:
            self._df[term] = self.store.count_matches(term) if self.size else 0
        return self._df[term]

    def idf(self, term: str) -> float:
        df = self.df(term)
        return float(np.log(1 + (self.size - df + 0.5) / (df + 0.5)))


class MilvusStore:
    def __init__(self, client, uri: str, collection: str, config: KnowledgeConfig, embedder_name: str):
        self.client, self.uri, self.collection = client, uri, collection
        self.config, self.embedder_name = config, embedder_name
        self.replaces = False
        self._sources: dict[str, dict] | None = None
        self._vocabulary: MilvusVocabulary | None = None
        self._generation: str | None = None  # of the collection's last write this copy knows of

    @classmethod
    def open(cls, uri: str, collection: str = COLLECTION, config: KnowledgeConfig | None = None,
             create: bool = True) -> MilvusStore:
        """The knowledge base in `collection` at `uri`; an empty one (created with its first write) if there is none
        yet and `create`."""
        store = cls.fresh(uri, collection, config)
        store.replaces = False
        if not store.client.has_collection(collection):
            if not create:
                raise IndexError_(f"{uri} has no collection '{collection}'; build one with `python -m knowledge build "
                                  f"DOCS --milvus-uri {uri}`")
            return store
        for name in (collection, store._sources_collection):  # a reopened collection is searchable once loaded
            if store.client.has_collection(name):
                store.client.load_collection(name)
        meta = store._settings()
        if not meta:
            raise IndexError_(f"the collection '{collection}' at {uri} was not written by this app (no settings row)")
        store.config, store.embedder_name = KnowledgeConfig.saved(meta["config"]), meta["embedder"]
        store._generation = meta.get("generation")
        if config is not None and config.embedding_model not in (None, store.config.embedding_model):
            raise IndexError_(f"the collection '{collection}' was built with the embedder '{store.embedder_name}', "
                              f"not '{config.embedding_model}'; rebuild it with `python -m knowledge build`")
        return store

    @classmethod
    def fresh(cls, uri: str, collection: str = COLLECTION, config: KnowledgeConfig | None = None) -> MilvusStore:
        """An empty knowledge base whose first write replaces the collection (`build`)."""
        try:
            from pymilvus import MilvusClient, MilvusException
        except ImportError as err:
            raise IndexError_('--milvus-uri needs pymilvus: pip install pymilvus "milvus-lite[chinese]"') from err
        try:
            client = MilvusClient(uri)
        except MilvusException as err:
            raise IndexError_(f"cannot open Milvus at {uri}: {err.message}") from err
        config = config or KnowledgeConfig()
        store = cls(client, uri, collection, config, config.embedding_model or DEFAULT_EMBEDDER)
        store.replaces = True
        return store

    @property
    def _sources_collection(self) -> str:
        return f"{self.collection}_sources"

    @property
    def location(self) -> str:
        return f"{self.uri} (collection {self.collection})"

    # ----- reading -------------------------------------------------------------------------------------
    @property
    def sources(self) -> dict[str, dict]:
        if self._sources is None:
            self._sources = self._read_sources()
        return self._sources

    def _read_sources(self) -> dict[str, dict]:
        if not self.client.has_collection(self._sources_collection):
            return {}
        sources: dict[str, dict] = {}
        while True:
            page = self.client.query(self._sources_collection, filter=f"source != {_quoted(SETTINGS)}",
                                     output_fields=["source", "meta"], limit=PAGE, offset=len(sources))
            sources |= {row["source"]: row["meta"] for row in page}
            if len(page) < PAGE:
                return dict(sorted(sources.items()))

    @property
    def lexical(self) -> MilvusVocabulary:
        if self._vocabulary is None:
            self._vocabulary = MilvusVocabulary(self)
        return self._vocabulary

    def __len__(self) -> int:
        return sum(meta["chunks"] for meta in self.sources.values())

    def reload(self) -> bool:
        """Whether another process (or another copy) wrote to the collection since this one last looked; if so, the
        sources are read again when next needed. One row is read to know (every write records a new generation in
        the settings row), so the retriever can ask every few seconds."""
        generation = self._settings().get("generation")
        if generation == self._generation:
            return False
        self._generation, self._sources, self._vocabulary = generation, None, None
        return True

    def _settings(self) -> dict:
        if not self.client.has_collection(self._sources_collection):
            return {}
        rows = self.client.get(self._sources_collection, ids=[SETTINGS])
        return rows[0]["meta"] if rows else {}

    def _touch(self) -> None:
        """Record a new generation after a write, for other processes' `reload`."""
        settings = self._settings() | {"generation": uuid.uuid4().hex}
        self.client.upsert(self._sources_collection, [{"source": SETTINGS, "meta": settings, "v": [0.0, 0.0]}])
        self._generation, self._sources, self._vocabulary = settings["generation"], None, None

    def count_matches(self, term: str) -> int:
        found = self.client.search(self.collection, data=[term], anns_field="sparse",
                                   limit=min(MAX_DF_COUNT, len(self)), output_fields=[],
                                   search_params={"metric_type": "BM25"})
        return len(found[0])

    def search(self, query: str, vector: np.ndarray | None, k: int, mode: str,
               dense_weight: float | None = None) -> list[Scored]:
        """As the embedded store searches: BM25 over words, and for a query with Chinese in it also over characters,
        each a Milvus full-text search; with the query's vector, the dense search too; several of them fused by
        Milvus's RRF ranker in one hybrid search (always: `dense_weight` is not used, Milvus's weighted ranker
        rescales scores its own way)."""
        if not len(self) or (vector is None and mode == "dense"):
            return []
        pool = min(len(self), max(50, 10 * k))
        fields = _CHUNK_FIELDS + ["dense"]
        if mode == "dense":
            found = self._dense(vector, k, fields)
            return [Scored(_chunk(hit), hit["distance"], hit["distance"]) for hit in found]
        from pymilvus import AnnSearchRequest, RRFRanker

        requests = []
        if mode == "fused" and vector is not None:
            requests.append(AnnSearchRequest(data=[vector[0].tolist()], anns_field="dense",
                                             param={"metric_type": "IP"}, limit=pool))
        for field, text in (("sparse", normalized(query)),  # as the rows' `indexed` text was made
                            ("sparse_characters", " ".join(character_terms(query)) if HAN.search(query) else "")):
            if text:
                requests.append(AnnSearchRequest(data=[text], anns_field=field, param={"metric_type": "BM25"},
                                                 limit=pool))
        if not requests:
            return []
        if len(requests) == 1:
            request = requests[0]
            found = self.client.search(self.collection, data=request.data, anns_field=request.anns_field, limit=k,
                                       output_fields=fields, search_params=request.param)[0]
            if request.anns_field == "dense":  # a fused search of a query without a single term
                return [Scored(_chunk(hit), hit["distance"], hit["distance"]) for hit in found]
            # (Milvus Lite reports BM25 as a negative distance, a server as a positive score)
            return [Scored(_chunk(hit), abs(hit["distance"]), None, abs(hit["distance"])) for hit in found]
        found = self.client.hybrid_search(self.collection, requests, RRFRanker(RRF_K), limit=k, output_fields=fields)[0]
        return [Scored(_chunk(hit), hit["distance"],
                       float(np.dot(vector[0], hit["entity"]["dense"])) if vector is not None else None)
                for hit in found]

    def _dense(self, vector: np.ndarray, limit: int, fields: list[str]) -> list[dict]:
        return self.client.search(self.collection, data=[vector[0].tolist()], anns_field="dense", limit=limit,
                                  output_fields=fields, search_params={"metric_type": "IP"})[0]

    def stats(self) -> dict:
        return {"index": self.location, "store": "milvus", "sources": len(self.sources), "chunks": len(self),
                "embedder": self.embedder_name, "chunk_languages": chunk_languages(self.sources),
                "config": asdict(self.config)}

    # ----- changing --------------------------------------------------------------------------------------
    def add(self, paths: list[Path], embedder: Embedder, progress: bool = True,
            on_progress: Callable[[float, str], None] | None = None) -> Report:
        """Index new and changed files under `paths`; a bad file is reported in the result and skipped."""
        if len(self) and not self.replaces and embedder.name != self.embedder_name:
            raise IndexError_(f"the collection '{self.collection}' was built with the embedder "
                              f"'{self.embedder_name}', not '{embedder.name}'; rebuild it with `python -m knowledge "
                              "build`")
        self.embedder_name = embedder.name
        known = {} if self.replaces else self.sources
        def stored(source: str) -> dict[str, np.ndarray]:  # chunk id → vector of a file the collection holds
            if source not in known:
                return {}
            return {row["chunk_id"]: np.asarray(row["dense"], np.float32) for row in self.client.query(
                self.collection, filter=f"source == {_quoted(source)}", output_fields=["chunk_id", "dense"])}

        with FileEmbedding(embedder, progress, stored) as embedding:  # files are embedded as the next are read
            report, new_chunks, new_sources = read_files(paths, self.config, known, progress, on_progress,
                                                         embedding.add)
            by_id = embedding.vectors(on_progress)
        if new_chunks:
            fresh = [c for chunks in new_chunks.values() for c in chunks]
            vectors = np.stack([by_id[c.id] for c in fresh])
            self._create(vectors.shape[1], drop=self.replaces)
            self.replaces = False
            rows = [_row(c, v, new_sources[c.source]["sha256"]) for c, v in zip(fresh, vectors, strict=True)]
            for start in range(0, len(rows), 512):
                self.client.insert(self.collection, rows[start:start + 512])
            if len(rows) >= FLUSH_AFTER:
                self.client.flush(self.collection)
            for source, meta in new_sources.items():  # the earlier version of a changed file, now the new one is in
                self.client.delete(self.collection, filter=f"source == {_quoted(source)} and "
                                                           f"sha256 != {_quoted(meta['sha256'])}")
                chunks = new_chunks[source]
                meta |= {"chunks": len(chunks), "languages": language_counts(chunks)}
            self.client.upsert(self._sources_collection, [{"source": s, "meta": m, "v": [0.0, 0.0]}
                                                          for s, m in new_sources.items()])
            self._touch()
        report.chunks = len(self)
        return report

    def remove(self, sources: list[str]) -> list[str]:
        """Delete the chunks of `sources`; returns those that were there."""
        present = [s for s in sources if s in self.sources]
        if present:
            self.client.delete(self.collection, filter=f"source in [{', '.join(map(_quoted, present))}]")
            self.client.delete(self._sources_collection, ids=present)
            self._touch()
        return present

    def drop(self) -> None:
        """Delete both collections (a scratch knowledge base, after an evaluation)."""
        for name in (self.collection, self._sources_collection):
            if self.client.has_collection(name):
                self.client.drop_collection(name)
        self._sources, self._vocabulary = None, None

    def _create(self, dimension: int, drop: bool) -> None:
        """Create both collections if they do not exist (after dropping them for a `build`)."""
        from pymilvus import DataType, Function, FunctionType

        if drop:
            self.drop()
        if not self.client.has_collection(self.collection):
            schema = self.client.create_schema(auto_id=True)
            schema.add_field("pk", DataType.INT64, is_primary=True)
            for name, length in (("chunk_id", 64), ("source", 2048), ("sha256", 64), ("heading", 4096),
                                 ("language", 16), ("text", 65535)):
                schema.add_field(name, DataType.VARCHAR, max_length=length)
            schema.add_field("page", DataType.INT64)
            schema.add_field("indexed", DataType.VARCHAR, max_length=65535, enable_analyzer=True,
                             analyzer_params=ANALYZER)
            schema.add_field("characters", DataType.VARCHAR, max_length=65535, enable_analyzer=True,
                             analyzer_params=ANALYZER)
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_field("sparse_characters", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dimension)
            for source, target in (("indexed", "sparse"), ("characters", "sparse_characters")):
                schema.add_function(Function(name=f"bm25_{source}", function_type=FunctionType.BM25,
                                             input_field_names=[source], output_field_names=[target]))
            index = self.client.prepare_index_params()
            for field in ("sparse", "sparse_characters"):
                index.add_index(field, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            index.add_index("dense", index_type="AUTOINDEX", metric_type="IP")
            self.client.create_collection(self.collection, schema=schema, index_params=index,
                                          consistency_level="Strong")
        if not self.client.has_collection(self._sources_collection):
            schema = self.client.create_schema(auto_id=False)
            schema.add_field("source", DataType.VARCHAR, is_primary=True, max_length=2048)
            schema.add_field("meta", DataType.JSON)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus wants a vector field in every collection
            index = self.client.prepare_index_params()
            index.add_index("v", index_type="AUTOINDEX", metric_type="IP")
            self.client.create_collection(self._sources_collection, schema=schema, index_params=index,
                                          consistency_level="Strong")
        settings = {"embedder": self.embedder_name, "dimension": dimension, "config": asdict(self.config)}
        self.client.upsert(self._sources_collection, [{"source": SETTINGS, "meta": settings, "v": [0.0, 0.0]}])


def _row(chunk: Chunk, vector: np.ndarray, sha256: str) -> dict:
    return {"chunk_id": chunk.id, "source": chunk.source, "sha256": sha256, "heading": chunk.heading[:1000],
            "language": chunk.language, "text": chunk.text, "page": chunk.page or 0,
            "indexed": normalized(chunk.indexed_text), "characters": " ".join(character_terms(chunk.indexed_text)),
            "dense": vector.tolist()}


def _chunk(hit: dict) -> Chunk:
    entity = hit["entity"]
    return Chunk(entity["chunk_id"], entity["source"], entity["text"], entity["heading"], entity["page"] or None,
                 entity["language"])

