"""What a knowledge base is to the rest of the app, whichever store holds it: `Store`, the protocol the retriever,
the CLI and the app use; what a write reports (`Report`); reading files for a write (`read_files`, shared by both
stores); and which knowledge base a command means (`open_store`, `default_index`).

    kb = open_store(Path("my-index"))                         # the embedded store (`knowledge.embedded`)
    kb = open_store(None, milvus_uri="./kb.db")               # a Milvus collection (`knowledge.milvus`)
    report = kb.add([Path("docs/")], embedder)                # new and changed files in, unchanged ones skipped
    kb.remove(["old.md"])

The default knowledge base, the one the app, `python -m knowledge` and the regression dialogues use when no index
is named, is decided here (`default_index`): $CHATBOT_HOME/index, built from the bundled documents
(`BUNDLED_CORPUS`) the first time it is needed. Tested in tests/test_store.py and tests/test_milvus.py.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from tqdm import tqdm

from common.paths import index_dir
from knowledge.chunking import Chunk, chunk_document, sentence_units
from knowledge.config import KnowledgeConfig
from knowledge.embedder import Background, Embedder
from knowledge.lexical import Vocabulary
from knowledge.loaders import LoadError, check_size, find_files, load_file

if TYPE_CHECKING:
    from knowledge.embedded import KnowledgeBase

BUNDLED_CORPUS = Path(__file__).resolve().parent / "corpus"  # the bilingual documents the app starts with


class IndexError_(RuntimeError):
    """An index folder that cannot be used (missing, inconsistent, or built with other settings)."""


@dataclass
class Report:
    """What an add/build did, file by file."""
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    chunks: int = 0

    def lines(self) -> list[str]:
        out = [f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
               f"{len(self.removed)} removed, {len(self.skipped)} skipped; {self.chunks} chunks in the index"]
        out += [f"skipped {path}: {reason}" for path, reason in self.skipped]
        return out


def _file_digest(path: Path, max_bytes: int) -> str:
    """SHA-256 of a file read in blocks, after its size is checked (a huge file is refused unread)."""
    check_size(path, max_bytes)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def read_files(paths: list[Path], config: KnowledgeConfig, known: dict[str, dict], progress: bool = True,
               on_progress: Callable[[float, str], None] | None = None,
               on_file: Callable[[str, list[Chunk]], None] | None = None
               ) -> tuple[Report, dict[str, list[Chunk]], dict[str, dict]]:
    """The new and changed files under `paths` (`known`: the sources indexed now), read and chunked: (report,
    source → chunks, source → metadata). A file that cannot be read is reported and skipped; an unchanged one
    (same SHA-256) is not read beyond its hash. `on_file(source, chunks)` is called as each file is chunked, so
    that its chunks are embedded while the next files are read (`FileEmbedding.add`)."""
    report = Report()
    new_chunks: dict[str, list[Chunk]] = {}
    new_sources: dict[str, dict] = {}
    limit = int(config.max_file_mb * 2**20)
    files = find_files([Path(p).expanduser() for p in paths])
    for i, (path, source) in enumerate(tqdm(files, desc="Reading", unit="file", disable=not progress)):
        if on_progress:
            on_progress(0.5 * i / max(len(files), 1), f"reading {source}")
        try:
            digest = _file_digest(path, limit)
            if known.get(source, {}).get("sha256") == digest:
                report.unchanged.append(source)
                continue
            chunks = chunk_document(load_file(path, source, max_bytes=limit), config.chunk_tokens, config.chunk_overlap)
        except (LoadError, OSError) as err:
            report.skipped.append((str(path), str(err)))
            continue
        (report.updated if source in known else report.added).append(source)
        new_chunks[source] = chunks
        if on_file:
            on_file(source, chunks)
        new_sources[source] = {"path": str(path.resolve()), "sha256": digest,
                               "added": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return report, new_chunks, new_sources


class FileEmbedding:
    """The vectors of the chunks `read_files` reads, for both stores: each file's chunks are embedded in the
    background as the file is read (`knowledge.embedder.Background`), except the unchanged chunks of a changed file,
    which keep the vectors `stored(source)` returns (chunk id → vector) instead of being embedded again. With
    `stored_units` (chunk id → its sentence vectors in the store, for a store that keeps them), each chunk's
    sentences (`knowledge.chunking.sentence_units`) are embedded too, or kept likewise.

        with FileEmbedding(embedder, progress, stored) as embedding:
            report, new_chunks, new_sources = read_files(paths, config, known, progress, on_progress, embedding.add)
            vectors = embedding.vectors(on_progress)      # chunk id → vector
            units = embedding.units                       # chunk id → sentence vectors (with stored_units)
    """

    def __init__(self, embedder: Embedder, progress: bool, stored: Callable[[str], dict[str, np.ndarray]],
                 stored_units: Callable[[str], dict[str, np.ndarray]] | None = None):
        self.job, self.stored, self.stored_units = Background(embedder, progress), stored, stored_units
        self.reused: dict[str, np.ndarray] = {}
        self.units: dict[str, np.ndarray] = {}  # filled in by vectors(); the kept ones at once
        self.embedded: list[tuple[str, int]] = []  # (chunk id, texts) given to the embedder, in order: 1 for the
        # chunk itself, then (with stored_units) its sentences, under the id "units:" + the chunk id

    def __enter__(self) -> FileEmbedding:
        return self

    def __exit__(self, *exc) -> None:
        self.job.__exit__(*exc)

    def add(self, source: str, chunks: list[Chunk]) -> None:
        """`read_files`' `on_file`."""
        stored = self.stored(source)
        self.reused.update((c.id, stored[c.id]) for c in chunks if c.id in stored)
        fresh = [c for c in chunks if c.id not in self.reused]
        self.embedded += [(c.id, 1) for c in fresh]
        texts = [c.indexed_text for c in fresh]
        if self.stored_units is not None:
            kept = self.stored_units(source)
            for c in chunks:
                if c.id in kept and c.id in self.reused:
                    self.units[c.id] = kept[c.id]
                else:
                    sentences = sentence_units(c)
                    self.embedded.append(("units:" + c.id, len(sentences)))
                    texts += sentences
        self.job.add(texts)

    def close(self) -> None:
        """Every file has been added (`Background.close`)."""
        self.job.close()

    def vectors(self, on_progress: Callable[[float, str], None] | None = None) -> dict[str, np.ndarray]:
        """Chunk id → vector for every chunk added; waits for the embedding to finish."""
        embedded, first = self.job.vectors(on_progress), 0
        vectors = dict(self.reused)
        for key, count in self.embedded:
            if key.startswith("units:"):
                self.units[key[6:]] = embedded[first:first + count]
            else:
                vectors[key] = embedded[first]
            first += count
        return vectors


@dataclass(frozen=True)
class Scored:
    """A chunk a search found: the score of the mode searched and, where those searches ran, its cosine and BM25."""
    chunk: Chunk
    score: float
    dense: float | None = None
    lexical: float | None = None


class Store(Protocol):
    """What `knowledge.retriever.Retriever`, the CLI and the app need of a knowledge base: the embedded one
    (`KnowledgeBase`, here) or a Milvus collection (`knowledge.milvus.MilvusStore`)."""
    config: KnowledgeConfig
    embedder_name: str

    @property
    def location(self) -> str: ...
    @property
    def sources(self) -> dict[str, dict]: ...
    @property
    def lexical(self) -> Vocabulary: ...
    def __len__(self) -> int: ...
    def add(self, paths: list[Path], embedder: Embedder, progress: bool = True,
            on_progress: Callable[[float, str], None] | None = None) -> Report: ...
    def remove(self, sources: list[str]) -> list[str]: ...
    def reload(self) -> bool: ...
    def search(self, query: str, vector: np.ndarray | None, k: int, mode: str,
               dense_weight: float | None = None) -> list[Scored]:
        """The best `k` chunks; `vector` (the query's embedding) is None when the embedder gets no vote. "fused"
        is reciprocal-rank fusion, or with `dense_weight` a weighted sum of rescaled scores where the store can."""
    def stats(self) -> dict: ...


def chunk_languages(sources: dict[str, dict]) -> dict[str, int]:
    """How many chunks of `sources` (their metadata, as a store keeps it) are in each language."""
    counts: dict[str, int] = {}
    for meta in sources.values():
        for language, count in meta["languages"].items():
            counts[language] = counts.get(language, 0) + count
    return counts


def open_store(folder: Path | None, milvus_uri: str | None = None, collection: str = "knowledge",
               config: KnowledgeConfig | None = None, create: bool = True, fresh: bool = False) -> Store:
    """The knowledge base a command or the app names: the Milvus collection `collection` at `milvus_uri` when one is
    given, else the embedded one in `folder` (the app's default when None). `fresh`: an empty one whose first write
    replaces what is there (`build`)."""
    if milvus_uri:
        from knowledge.milvus import MilvusStore

        if fresh:
            return MilvusStore.fresh(milvus_uri, collection, config)
        return MilvusStore.open(milvus_uri, collection, config, create)
    from knowledge.embedded import KnowledgeBase

    folder = Path(folder or index_dir()).expanduser()
    return KnowledgeBase.fresh(folder, config) if fresh else KnowledgeBase.open(folder, config, create)


def default_collection(milvus_uri: str, collection: str, embedding_model: str | None = None,
                       embedder: Embedder | None = None) -> None:
    """Fill the Milvus collection with the bundled documents if it does not exist yet (the app's first start). One
    that an earlier version filled with all-MiniLM-L6-v2 is filled again once with today's embedder while it holds
    the bundled documents and nothing else; one the user changed is kept as it is, with a note (as `default_index`)."""
    from knowledge.embedder import DEFAULT_EMBEDDER

    store = open_store(None, milvus_uri, collection)
    wanted = embedder.name if embedder is not None else embedding_model or DEFAULT_EMBEDDER
    if store.sources:
        if not _built_by_old_default(store.embedder_name, store.config, wanted):
            return
        if set(store.sources) != bundled_sources():
            print(f"note: the knowledge base {store.location} was built {_MINILM}; `python -m knowledge build DOCS "
                  f"--milvus-uri {milvus_uri}` rebuilds it with {wanted}.", file=sys.stderr, flush=True)
            return
        print(f"Refilling {store.location} with {wanted} (it was built {_MINILM}; once)...", file=sys.stderr,
              flush=True)
        store = open_store(None, milvus_uri, collection, fresh=True)  # replaced with its first write, not before
    else:
        print(f"Filling {store.location} from the bundled documents (first use only)...", file=sys.stderr, flush=True)
    for line in store.add([BUNDLED_CORPUS], embedder or Embedder(embedding_model), progress=False).lines():
        print(line, file=sys.stderr)


_MINILM = "with all-MiniLM-L6-v2, which reads English only, so Chinese questions are matched by their words alone"


def _built_by_old_default(embedder_name: str, config: KnowledgeConfig, wanted: str) -> bool:
    """Whether a knowledge base was built with all-MiniLM-L6-v2 as an earlier version's default (MiniLM named by the
    user, e.g. --embedding-model all-MiniLM-L6-v2, is a choice that stands)."""
    from knowledge.embedder import EMBEDDED_NAME

    return embedder_name == EMBEDDED_NAME and not config.embedding_model and wanted != EMBEDDED_NAME


def default_index(folder: Path | None = None, embedder: Embedder | None = None,
                  embedding_model: str | None = None) -> Path:
    """The default knowledge base's folder (`folder`, else $CHATBOT_HOME/index), built from the bundled
    documents the first time, with `embedder` (else one loaded from `embedding_model`); later calls only return
    it, with whatever was added or removed since. One that an earlier version built with all-MiniLM-L6-v2, or
    without sentence vectors, is rebuilt once with today's embedder and settings while it holds the bundled
    documents and nothing else (nothing is lost: Chinese questions then find passages by meaning, and a question
    that paraphrases one sentence finds its passage); one the user changed is kept as it is, with a note."""
    from knowledge.embedded import KnowledgeBase
    from knowledge.embedder import DEFAULT_EMBEDDER

    folder = Path(folder or index_dir()).expanduser()
    if (folder / "CURRENT").is_file():
        kb = KnowledgeBase.open(folder)
        wanted = embedder.name if embedder is not None else embedding_model or DEFAULT_EMBEDDER
        minilm = _built_by_old_default(kb.embedder_name, kb.config, wanted)
        unsentenced = kb.config.sentence_vectors and any(segment.units is None for segment in kb.state.segments)
        if not (minilm or unsentenced):
            return folder
        why = _MINILM if minilm else ("without sentence vectors, so a question that paraphrases one sentence of a "
                                      "long passage may miss it")
        if set(kb.sources) != bundled_sources():
            print(f"note: the knowledge base in {folder} was built {why}; `python -m knowledge build DOCS --index "
                  f"{folder}` rebuilds it with {wanted}.", file=sys.stderr, flush=True)
            return folder
        print(f"Rebuilding the default knowledge base in {folder} with {wanted} (it was built {why}; once)...",
              file=sys.stderr, flush=True)
        store = KnowledgeBase.fresh(folder)  # replaces the old index with its first write, not before
    else:
        print(f"Building the default knowledge base in {folder} from the bundled documents (first use only)...",
              file=sys.stderr, flush=True)
        store = KnowledgeBase.open(folder)
    report = store.add([BUNDLED_CORPUS], embedder or Embedder(embedding_model), progress=False)
    for line in report.lines():
        print(line, file=sys.stderr)
    return folder


def bundled_sources() -> set[str]:
    """The names the bundled documents have in a knowledge base (their paths under BUNDLED_CORPUS)."""
    return {path.relative_to(BUNDLED_CORPUS).as_posix() for path in BUNDLED_CORPUS.rglob("*") if path.is_file()}


@contextmanager
def scratch_knowledge_base(paths: list[Path], embedder: Embedder, config: KnowledgeConfig | None = None
                           ) -> Iterator[KnowledgeBase]:
    """A throwaway knowledge base of `paths` in a temporary folder, deleted afterwards (evaluations, benchmarks)."""
    from knowledge.embedded import KnowledgeBase

    with tempfile.TemporaryDirectory(prefix="knowledge-") as folder:
        kb = KnowledgeBase.open(Path(folder), config)
        kb.add(paths, embedder, progress=False)
        yield kb
