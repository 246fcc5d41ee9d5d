"""A knowledge base on disk: chunks, their vectors, a FAISS index and the list of sources, written crash-safely.

    kb = KnowledgeBase.open(Path("my-index"))
    report = kb.add([Path("docs/")], embedder)       # new and changed files in, unchanged ones skipped
    kb.remove(["old.md"])

Layout: `INDEX/CURRENT` names the live generation folder `INDEX/gen-*/`, which holds `chunks.jsonl` (chunk
metadata and BM25 terms), `vectors.npy`, `dense.faiss` and `manifest.json` (settings and sources). Every write
builds a complete new generation beside the live one and then replaces CURRENT atomically, so a process killed
at any moment leaves either the old or the new index, never a mixture; old generations are deleted after (one
that cannot be deleted is reported on stderr, and deleted by the next write).

The default knowledge base, the one the app, `python -m knowledge` and the regression dialogues use when no index
is named, is decided here (`default_index`): $CHATBOT_HOME/index, built from the bundled documents
(`BUNDLED_CORPUS`) the first time it is needed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from common.paths import index_dir
from knowledge.chunking import Chunk, chunk_document
from knowledge.config import KnowledgeConfig
from knowledge.embedder import EMBEDDED_NAME, Embedder
from knowledge.lexical import tokenize
from knowledge.loaders import LoadError, check_size, find_files, load_file

FORMAT_VERSION = 1
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


@contextmanager
def _file_lock(folder: Path, kind: int) -> Iterator[None]:
    """flock on `folder/.lock`: LOCK_EX for a writer, LOCK_SH for a reader of a committed generation."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "a")  # noqa: SIM115 (closed below)
    except OSError:
        if kind == fcntl.LOCK_EX:
            raise
        yield  # a read-only index: nobody writes to it, there is nothing to wait for
        return
    with lock:
        fcntl.flock(lock, kind)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def build_faiss(vectors: np.ndarray, approximate_after: int) -> faiss.Index:
    """Exact inner-product search for small collections, HNSW for large ones."""
    dimension = vectors.shape[1]
    if len(vectors) >= approximate_after:
        index = faiss.IndexHNSWFlat(dimension, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128  # recall@5 1.000 at 0.19x exact's time on 50k clustered vectors (benchmarks/)
    else:
        index = faiss.IndexFlatIP(dimension)
    if len(vectors):
        index.add(vectors)
    return index


class KnowledgeBase:
    def __init__(self, folder: Path, config: KnowledgeConfig, chunks: list[Chunk], tokens: list[list[str]],
                 vectors: np.ndarray, index: faiss.Index, sources: dict[str, dict], embedder_name: str,
                 generation: str | None = None):
        self.folder, self.config = folder, config
        self.chunks, self.tokens, self.vectors, self.index = chunks, tokens, vectors, index
        self.sources, self.embedder_name = sources, embedder_name
        # The committed generation this copy holds; None for a fresh one (`build`), whose first write replaces
        # whatever is there instead of merging with it.
        self.generation = generation
        self.replaces = False

    # ----- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path, config: KnowledgeConfig | None = None, create: bool = True) -> KnowledgeBase:
        """The live generation in `folder`; an empty knowledge base if there is none yet (and `create`)."""
        folder = Path(folder).expanduser()
        current = folder / "CURRENT"
        if not current.is_file():
            if not create:
                raise IndexError_(f"{folder} holds no index; build one with `python -m knowledge build DOCS "
                                  f"--index {folder}`")
            return cls.fresh(folder, config, replaces=False)  # merges with whatever another process commits first
        with _file_lock(folder, fcntl.LOCK_SH):  # no writer deletes the generation while it is read
            kb = cls(folder, *cls._read(folder, current.read_text().strip()))
        if config is not None and config.embedding_model not in (None, kb.config.embedding_model):
            raise IndexError_(f"the index in {folder} was built with the embedder '{kb.embedder_name}', not "
                              f"'{config.embedding_model}'; rebuild it with `python -m knowledge build`")
        return kb

    @staticmethod
    def _read(folder: Path, name: str) -> tuple:
        """The constructor's arguments after `folder`, from the committed generation `name`."""
        generation = folder / name
        try:
            manifest = json.loads((generation / "manifest.json").read_text())
            rows = [json.loads(line) for line in (generation / "chunks.jsonl").read_text().splitlines()]
            vectors = np.load(generation / "vectors.npy")
            index = faiss.read_index(str(generation / "dense.faiss"))
        except (OSError, ValueError, RuntimeError) as err:
            raise IndexError_(f"the index in {folder} cannot be read ({err}); rebuild it") from err
        if not (len(rows) == len(vectors) == index.ntotal == manifest["chunks"]):
            raise IndexError_(f"the index in {folder} is inconsistent: {len(rows)} chunks, {len(vectors)} vectors, "
                              f"{index.ntotal} in FAISS; rebuild it")
        tokens = [row.pop("tokens") for row in rows]
        chunks = [Chunk(**row) for row in rows]
        return (KnowledgeConfig.saved(manifest["config"]), chunks, tokens, vectors, index, manifest["sources"],
                manifest["embedder"], name)

    @classmethod
    def fresh(cls, folder: Path, config: KnowledgeConfig | None = None, replaces: bool = True) -> KnowledgeBase:
        """An empty knowledge base whose first write replaces whatever index `folder` holds (`build`)."""
        config = config or KnowledgeConfig()
        kb = cls(Path(folder).expanduser(), config, [], [], np.zeros((0, 0), np.float32), faiss.IndexFlatIP(1),
                 {}, config.embedding_model or EMBEDDED_NAME)
        kb.replaces = replaces
        return kb

    def reload(self) -> bool:
        """Take the latest committed state if another process (or another KnowledgeBase on the same folder)
        changed it since this one was read or written; True if it did. Cheap when nothing changed: one small
        file is read."""
        if not (self.folder / "CURRENT").is_file() or self._committed() == self.generation:
            return False
        with _file_lock(self.folder, fcntl.LOCK_SH):
            return self._take_latest()

    def _committed(self) -> str | None:
        try:
            return (self.folder / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None

    def _take_latest(self) -> bool:
        """Load the committed generation if it is not the one held (the caller holds the folder's lock)."""
        name = self._committed()
        if name is None or name == self.generation:
            return False
        (self.config, self.chunks, self.tokens, self.vectors, self.index, self.sources, self.embedder_name,
         self.generation) = self._read(self.folder, name)
        return True

    def __len__(self) -> int:
        return len(self.chunks)

    # ----- changing --------------------------------------------------------------------------------------
    def add(self, paths: list[Path], embedder: Embedder, progress: bool = True,
            on_progress: Callable[[float, str], None] | None = None) -> Report:
        """Index new and changed files under `paths`; a bad file is reported in the result and skipped."""
        self._check_embedder(embedder)
        report = Report()
        files = find_files([Path(p).expanduser() for p in paths])
        new_chunks: dict[str, list[Chunk]] = {}
        new_sources: dict[str, dict] = {}
        for i, (path, source) in enumerate(tqdm(files, desc="Reading", unit="file", disable=not progress)):
            if on_progress:
                on_progress(0.5 * i / max(len(files), 1), f"reading {source}")
            try:
                digest = _file_digest(path, int(self.config.max_file_mb * 2**20))
                if self.sources.get(source, {}).get("sha256") == digest:
                    report.unchanged.append(source)
                    continue
                document = load_file(path, source, max_bytes=int(self.config.max_file_mb * 2**20))
                chunks = chunk_document(document, self.config.chunk_tokens, self.config.chunk_overlap)
            except (LoadError, OSError) as err:
                report.skipped.append((str(path), str(err)))
                continue
            (report.updated if source in self.sources else report.added).append(source)
            new_chunks[source] = chunks
            new_sources[source] = {"path": str(path.resolve()), "sha256": digest, "chunks": len(chunks),
                                   "added": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if new_chunks:
            # Embedding, the slow part, needs no lock; the merge with the latest committed state does (below).
            fresh, vectors, tokens = self._embed(new_chunks, embedder, progress, on_progress)
            with self._locked():
                if not self.replaces:  # another process may have committed since this copy was read: no lost update
                    self._take_latest()
                keep = [i for i, c in enumerate(self.chunks) if c.source not in new_chunks]
                self._write(keep, fresh, vectors, tokens, self.sources | new_sources)
        report.chunks = len(self.chunks)
        return report

    def remove(self, sources: list[str]) -> list[str]:
        """Drop the chunks of `sources` from the latest committed state; returns those that were there."""
        with self._locked():
            if not self.replaces:
                self._take_latest()
            present = [s for s in sources if s in self.sources]
            if present:
                keep = [i for i, c in enumerate(self.chunks) if c.source not in present]
                remaining = {s: meta for s, meta in self.sources.items() if s not in present}
                self._write(keep, [], np.zeros((0, self.vectors.shape[1]), np.float32), [], remaining)
        return present

    def _embed(self, new_chunks: dict[str, list[Chunk]], embedder: Embedder, progress: bool,
               on_progress: Callable[[float, str], None] | None) -> tuple:
        """(chunks, their vectors, their BM25 terms) of the new and changed files."""
        reusable = {c.id: i for i, c in enumerate(self.chunks)}  # unchanged chunks of a changed file
        fresh = [c for chunks in new_chunks.values() for c in chunks]
        to_embed = [c for c in fresh if c.id not in reusable]
        if on_progress:
            on_progress(0.5, f"embedding {len(to_embed)} chunks")
        embedded = embedder.encode([c.indexed_text for c in to_embed], progress=progress)
        by_id = {c.id: v for c, v in zip(to_embed, embedded, strict=True)}
        vectors = np.stack([by_id[c.id] if c.id in by_id else self.vectors[reusable[c.id]] for c in fresh]) \
            if fresh else np.zeros((0, embedder.dimension), np.float32)
        tokens = [tokenize(c.indexed_text) for c in fresh]
        return fresh, vectors, tokens

    def _write(self, keep: list[int], fresh: list[Chunk], fresh_vectors: np.ndarray, fresh_tokens: list[list[str]],
               sources: dict[str, dict]) -> None:
        """Make (kept rows + new chunks) the new live generation, atomically; the caller holds the lock."""
        chunks = [self.chunks[i] for i in keep] + fresh
        tokens = [self.tokens[i] for i in keep] + fresh_tokens
        dimension = fresh_vectors.shape[1] if len(fresh_vectors) else self.vectors.shape[1]
        old = self.vectors[keep] if keep else np.zeros((0, dimension), np.float32)
        vectors = np.concatenate([old, fresh_vectors]).astype(np.float32) if dimension else old
        index = self._extended(keep, fresh_vectors) or (build_faiss(vectors, self.config.approximate_after)
                                                           if dimension else faiss.IndexFlatIP(1))
        manifest = {"format": FORMAT_VERSION, "embedder": self.embedder_name, "dimension": int(dimension),
                    "chunks": len(chunks), "config": asdict(self.config), "sources": sources}
        name = self._commit_generation(chunks, tokens, vectors, index, manifest)
        self.chunks, self.tokens, self.vectors, self.index, self.sources = chunks, tokens, vectors, index, sources
        self.generation, self.replaces = name, False

    def _extended(self, keep: list[int], fresh_vectors: np.ndarray) -> faiss.Index | None:
        """When a write only appends (every row kept, in order) to an HNSW index, a copy of the live graph with the
        new vectors added: the same kind of index a rebuild would give, without rebuilding what is there (2.5 s
        of a 4 s write at 20,000 chunks). None when the index must be rebuilt."""
        appends = len(keep) == len(self.chunks) and keep == list(range(len(keep)))
        if not (appends and len(keep) and isinstance(self.index, faiss.IndexHNSWFlat)):
            return None
        index = faiss.clone_index(self.index)  # the live one keeps serving searches until the switch
        index.hnsw.efSearch = self.index.hnsw.efSearch
        if len(fresh_vectors):
            index.add(np.ascontiguousarray(fresh_vectors, dtype=np.float32))
        return index

    def _commit_generation(self, chunks, tokens, vectors, index, manifest) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"gen-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        staging = self.folder / f"tmp-{name}"
        staging.mkdir()
        rows = "".join(json.dumps(c.to_dict() | {"tokens": t}, ensure_ascii=False) + "\n"
                       for c, t in zip(chunks, tokens, strict=True))
        _fsync_write(staging / "chunks.jsonl", rows.encode())
        with open(staging / "vectors.npy", "wb") as f:
            np.save(f, vectors)
            f.flush()
            os.fsync(f.fileno())
        faiss.write_index(index, str(staging / "dense.faiss"))
        _fsync_write(staging / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1).encode())
        staging.rename(self.folder / name)
        _fsync_write(self.folder / "CURRENT.tmp", name.encode())
        os.replace(self.folder / "CURRENT.tmp", self.folder / "CURRENT")  # the switch: atomic on POSIX
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        for stale in self.folder.iterdir():  # earlier generations and leftovers of interrupted writes
            if stale.is_dir() and stale.name != name and stale.name.startswith(("gen-", "tmp-gen-")):
                try:
                    shutil.rmtree(stale)
                except OSError as err:  # the new generation is live; the next write tries again
                    print(f"warning: could not delete the old index generation {stale}: {err}", file=sys.stderr)
        return name

    def _locked(self):
        """One writer at a time (the app and the CLI may share an index), and no reader while it commits."""
        return _file_lock(self.folder, fcntl.LOCK_EX)

    def _check_embedder(self, embedder: Embedder) -> None:
        if self.chunks and embedder.name != self.embedder_name:
            raise IndexError_(f"the index in {self.folder} was built with the embedder '{self.embedder_name}', "
                              f"not '{embedder.name}'; rebuild it with `python -m knowledge build`")
        self.embedder_name = embedder.name

    # ----- reading ---------------------------------------------------------------------------------------
    def stats(self) -> dict:
        languages: dict[str, int] = {}
        for chunk in self.chunks:
            languages[chunk.language] = languages.get(chunk.language, 0) + 1
        return {"index": str(self.folder), "sources": len(self.sources), "chunks": len(self.chunks),
                "embedder": self.embedder_name, "dimension": int(self.vectors.shape[1]) if len(self.chunks) else 0,
                "faiss": type(self.index).__name__, "chunk_languages": languages,
                "config": asdict(self.config)}


def default_index(folder: Path | None = None, embedder: Embedder | None = None,
                  embedding_model: str | None = None) -> Path:
    """The default knowledge base's folder (`folder`, else $CHATBOT_HOME/index), built from the bundled
    documents the first time, with `embedder` (else one loaded from `embedding_model`); later calls only return
    it, with whatever was added or removed since."""
    folder = Path(folder or index_dir()).expanduser()
    if not (folder / "CURRENT").is_file():
        print(f"Building the default knowledge base in {folder} from the bundled documents (first use only)...",
              file=sys.stderr, flush=True)
        report = KnowledgeBase.open(folder).add([BUNDLED_CORPUS], embedder or Embedder(embedding_model),
                                                progress=False)
        for line in report.lines():
            print(line, file=sys.stderr)
    return folder


@contextmanager
def scratch_knowledge_base(paths: list[Path], embedder: Embedder) -> Iterator[KnowledgeBase]:
    """A throwaway knowledge base of `paths` in a temporary folder, deleted afterwards (evaluations, benchmarks)."""
    with tempfile.TemporaryDirectory(prefix="knowledge-") as folder:
        kb = KnowledgeBase.open(Path(folder))
        kb.add(paths, embedder, progress=False)
        yield kb
