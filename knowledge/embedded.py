"""The embedded knowledge base on disk, in segments, written crash-safely (a `knowledge.store.Store`).

    kb = KnowledgeBase.open(Path("my-index"))
    report = kb.add([Path("docs/")], embedder)       # new and changed files in, unchanged ones skipped
    kb.remove(["old.md"])
    kb.search("什么是LoRA？", None, k=3, mode="lexical")

Layout: `INDEX/CURRENT` names the live manifest `INDEX/gen-*.json`, which lists the live segments
(`knowledge.segment`, immutable folders `INDEX/seg-*/`) and, per segment, the sources deleted from it, with the
settings the index was built with. An add writes its files' chunks as a new segment (in a staging folder named after
the writing process, outside the lock), then, under the folder's lock, takes the latest manifest, marks the earlier
versions of its files deleted, merges small segments (`_merged`), writes a new manifest and replaces CURRENT
atomically; a remove only writes a manifest. A process killed at any moment leaves the last committed manifest and
its segments; what no manifest names any more, and staging folders of dead processes, are deleted by the next write
(one that cannot be deleted is reported on stderr). Readers take the lock shared while they open a manifest, and a
search works on one committed state (`_State`) from start to end.

Tested in tests/test_store.py.
"""

from __future__ import annotations

import bisect
import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from knowledge.chunking import Chunk
from knowledge.config import KnowledgeConfig
from knowledge.embedder import DEFAULT_EMBEDDER, EMBEDDED_NAME, Embedder
from knowledge.fusion import reciprocal_rank_fusion, score_fusion
from knowledge.lexical import LexicalIndex, Postings
from knowledge.segment import Segment
from knowledge.store import FileEmbedding, IndexError_, Report, Scored, chunk_languages, read_files

FORMAT_VERSION = 2  # 1: one folder per generation, rewritten whole by every write
MERGE_RATIO = 2  # the newest segments are merged while the one before them is at most this many times larger


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


def _alive(staging: str) -> bool:
    """Whether the process that is writing the staging folder `tmp-PID-...` still runs."""
    try:
        os.kill(int(staging.split("-")[1]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class _State:
    """One committed generation as searches see it: replaced whole by a write or a reload, never changed, so a
    search that took it never sees half of an update."""
    generation: str | None
    segments: tuple[Segment, ...]
    deleted: tuple[tuple[str, ...], ...]  # per segment, the sources deleted from it
    masks: tuple[np.ndarray | None, ...]
    bases: tuple[int, ...]  # where each segment's rows start when all are numbered together
    lexical: LexicalIndex
    sources: dict[str, dict]
    where: dict[str, int]  # live source → its segment's position

    @classmethod
    def of(cls, generation: str | None, entries: list[tuple[Segment, tuple[str, ...]]]) -> _State:
        segments = tuple(seg for seg, _ in entries)
        masks = tuple(seg.deleted_mask(list(deleted)) for seg, deleted in entries)
        bases = tuple(int(b) for b in np.cumsum([0] + [seg.size for seg in segments])[:-1])
        sources: dict[str, dict] = {}
        where: dict[str, int] = {}
        for i, (seg, deleted) in enumerate(entries):
            gone = set(deleted)
            for source, meta in seg.sources.items():
                if source not in gone:
                    sources[source], where[source] = meta, i
        lexical = LexicalIndex([seg.part(mask, base) for seg, mask, base in zip(segments, masks, bases, strict=True)])
        return cls(generation, segments, tuple(deleted for _, deleted in entries), masks, bases, lexical, sources,
                   where)

    @property
    def entries(self) -> list[tuple[Segment, tuple[str, ...]]]:
        return list(zip(self.segments, self.deleted, strict=True))

    def chunk(self, key: int) -> Chunk:
        i = bisect.bisect_right(self.bases, key) - 1
        return self.segments[i].chunk(key - self.bases[i])

    def dense(self, vector: np.ndarray, pool: int) -> dict[int, tuple[float, float]]:
        """Key → (score, cosine) of the `pool` best rows, best first (`Segment.search`)."""
        found = [(base + row, (score, cosine))
                 for seg, mask, base in zip(self.segments, self.masks, self.bases, strict=True)
                 for row, score, cosine in seg.search(vector, pool, mask)]
        return dict(sorted(found, key=lambda item: -item[1][0])[:pool])


def _live(segment: Segment, deleted: tuple[str, ...]) -> int:
    return segment.size - sum(segment.sources[s]["chunks"] for s in deleted)


class KnowledgeBase:
    def __init__(self, folder: Path, config: KnowledgeConfig, embedder_name: str):
        self.folder, self.config, self.embedder_name = folder, config, embedder_name
        self.state = _State.of(None, [])
        # A fresh knowledge base (`build`) replaces whatever the folder holds with its first write instead of
        # merging with it.
        self.replaces = False

    # ----- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path, config: KnowledgeConfig | None = None, create: bool = True) -> KnowledgeBase:
        """The live generation in `folder`; an empty knowledge base if there is none yet (and `create`)."""
        folder = Path(folder).expanduser()
        if not (folder / "CURRENT").is_file():
            if not create:
                raise IndexError_(f"{folder} holds no index; build one with `python -m knowledge build DOCS "
                                  f"--index {folder}`")
            return cls.fresh(folder, config, replaces=False)  # merges with whatever another process commits first
        kb = cls(folder, KnowledgeConfig(), EMBEDDED_NAME)
        if (folder / kb._committed()).is_dir():  # written by an earlier version: one folder per generation
            kb._upgrade()
        with _file_lock(folder, fcntl.LOCK_SH):  # no writer deletes what is being read
            kb._take_latest()
        if config is not None and config.embedding_model not in (None, kb.config.embedding_model):
            raise IndexError_(f"the index in {folder} was built with the embedder '{kb.embedder_name}', not "
                              f"'{config.embedding_model}'; rebuild it with `python -m knowledge build`")
        return kb

    @classmethod
    def fresh(cls, folder: Path, config: KnowledgeConfig | None = None, replaces: bool = True) -> KnowledgeBase:
        """An empty knowledge base whose first write replaces whatever index `folder` holds (`build`)."""
        config = config or KnowledgeConfig()
        kb = cls(Path(folder).expanduser(), config, config.embedding_model or DEFAULT_EMBEDDER)
        kb.replaces = replaces
        return kb

    def reload(self) -> bool:
        """Take the latest committed state if another process (or another KnowledgeBase on the same folder)
        changed it since this one was read or written; True if it did. Cheap when nothing changed (one small
        file is read), and in proportion to the change when something did (segments already open are kept)."""
        if self._committed() in (None, self.state.generation):
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
        if name is None or name == self.state.generation:
            return False
        opened = {seg.name: seg for seg in self.state.segments}
        try:
            manifest = json.loads((self.folder / name).read_text())
            entries = [(opened.get(e["name"]) or Segment.load(self.folder / e["name"]), tuple(e["deleted"]))
                       for e in manifest["segments"]]
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise IndexError_(f"the index in {self.folder} cannot be read ({err}); rebuild it") from err
        self.config, self.embedder_name = KnowledgeConfig.saved(manifest["config"]), manifest["embedder"]
        self.state = _State.of(name, entries)
        return True

    @property
    def location(self) -> str:
        return str(self.folder)

    @property
    def generation(self) -> str | None:
        return self.state.generation

    @property
    def sources(self) -> dict[str, dict]:
        return self.state.sources

    @property
    def lexical(self) -> LexicalIndex:
        return self.state.lexical

    def __len__(self) -> int:
        return self.state.lexical.size

    def chunks(self, source: str | None = None) -> list[Chunk]:
        """The live chunks (of `source`), in index order; for tests and small collections."""
        state = self.state
        return [chunk for name in ([source] if source else state.sources) if name in state.where
                for chunk in state.segments[state.where[name]].chunks(state.segments[state.where[name]].rows(name))]

    # ----- changing --------------------------------------------------------------------------------------
    def add(self, paths: list[Path], embedder: Embedder, progress: bool = True,
            on_progress: Callable[[float, str], None] | None = None) -> Report:
        """Index new and changed files under `paths`; a bad file is reported in the result and skipped. The new
        chunks become one new segment; the earlier versions of changed files are marked deleted."""
        self._check_embedder(embedder)
        state = self.state

        def stored(source: str, sentences: bool = False) -> dict[str, np.ndarray]:
            """Chunk id → vector (or its sentence vectors, where its segment keeps them) of a file this index holds."""
            segment = state.segments[state.where[source]] if source in state.where else None
            if segment is None or (sentences and segment.units is None):
                return {}
            rows = segment.rows(source)
            kept = segment.unit_vectors(rows) if sentences else segment.vectors(rows)
            return dict(zip((c.id for c in segment.chunks(rows)), kept, strict=True))

        with FileEmbedding(embedder, progress, stored,
                           partial(stored, sentences=True) if self.config.sentence_vectors else None) as embedding:
            report, new_chunks, new_sources = read_files(paths, self.config, state.sources, progress, on_progress,
                                                         embedding.add)
            embedding.close()
            chunks = [c for file_chunks in new_chunks.values() for c in file_chunks]
            postings = Segment.postings(chunks)  # while the last chunks are embedded
            vectors = embedding.vectors(on_progress)
        if chunks:
            # Embedding and writing the new segment need no lock; the merge with the latest committed state does.
            units = [embedding.units[c.id] for c in chunks] if self.config.sentence_vectors else None
            staged = self._stage(chunks, np.stack([vectors[c.id] for c in chunks]).astype(np.float32), new_sources,
                                 *postings, units)
            with self._locked():
                if not self.replaces:  # another process may have committed since this copy was read: no lost update
                    self._take_latest()
                latest = self.state if not self.replaces else _State.of(None, [])
                entries = [(seg, deleted + tuple(s for s in new_sources if s in seg.sources and s not in deleted))
                           for seg, deleted in latest.entries]  # (in proportion to the files, not the segment)
                self._commit(entries, self._placed(staged))
        report.chunks = len(self)
        return report

    def remove(self, sources: list[str]) -> list[str]:
        """Mark the chunks of `sources` deleted in the latest committed state; returns those that were there."""
        with self._locked():
            if not self.replaces:
                self._take_latest()
            present = [s for s in sources if s in self.sources]
            if present:
                entries = [(seg, deleted + tuple(s for s in present if s in seg.sources and s not in deleted))
                           for seg, deleted in self.state.entries]
                self._commit(entries)
        return present

    def compact(self) -> None:
        """Rewrite all segments as one, without the deleted rows (an HNSW graph is rebuilt: minutes at 1M rows)."""
        with self._locked():
            self._take_latest()
            entries = self.state.entries
            if len(entries) > 1 or any(deleted for _, deleted in entries):
                self._commit([], self._merge(entries))

    def _stage(self, chunks: list[Chunk], vectors: np.ndarray, sources: dict[str, dict], words: Postings,
               characters: Postings, units: list[np.ndarray] | None = None) -> Path:
        """Write a segment into a staging folder named after this process (so that another writer's clean-up
        leaves it alone while this process lives)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"seg-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        staging = self.folder / f"tmp-{os.getpid()}-{name}"
        Segment.write(staging, chunks, vectors, sources, self.config.approximate_after, words, characters, units)
        return staging

    def _placed(self, staging: Path) -> Segment:
        target = self.folder / staging.name.split("-", 2)[2]
        staging.rename(target)
        return Segment.load(target)

    def _merge(self, entries: list[tuple[Segment, tuple[str, ...]]]) -> Segment:
        """One new segment holding the live rows of `entries`: vectors and postings are copied, not recomputed."""
        chunks: list[Chunk] = []
        vectors, words, characters = [], [], []
        units: list[np.ndarray] = []  # the rows' sentence vectors (none for rows of a segment written without them)
        sources: dict[str, dict] = {}
        for segment, deleted in entries:
            kept: list[int] = []
            for source, meta in segment.sources.items():
                if source not in deleted:
                    kept += segment.rows(source)
                    sources[source] = {k: v for k, v in meta.items() if k not in ("rows", "chunks", "languages")}
            chunks += segment.chunks(kept)
            vectors.append(segment.vectors(kept))
            units += segment.unit_vectors(kept)
            words.append((segment.words, np.asarray(kept, np.int64)))
            characters.append((segment.characters, np.asarray(kept, np.int64)))
        dimension = next((v.shape[1] for v in vectors), 1)
        with_units = any(segment.units is not None for segment, _ in entries)
        return self._placed(self._stage(chunks, np.concatenate(vectors) if vectors else np.zeros((0, dimension)),
                                        sources, Postings.merge(words), Postings.merge(characters),
                                        units if with_units else None))

    def _merged(self, entries: list[tuple[Segment, tuple[str, ...]]]) -> list[tuple[Segment, tuple[str, ...]]]:
        """`entries` after merging, as a log-structured store merges: the newest segments are folded together while
        the one before them holds at most MERGE_RATIO times their live rows, so small writes leave few segments
        and each row is copied a logarithmic number of times; a segment that is mostly deleted is rewritten too.
        No merge grows past `approximate_after` rows, so a write never rebuilds an HNSW graph (`compact` does)."""
        cap = self.config.approximate_after
        live = [_live(seg, deleted) for seg, deleted in entries]
        n = 1
        while n < len(entries) and live[-n - 1] <= MERGE_RATIO * sum(live[-n:]) and sum(live[-n - 1:]) <= cap:
            n += 1
        group = set(range(len(entries) - n, len(entries))) if n > 1 else set()
        group |= {i for i, (seg, _) in enumerate(entries) if live[i] < seg.size / 2 and live[i] <= cap}
        if len(group) < 2 and not any(entries[i][1] for i in group):
            return entries
        merged = self._merge([entries[i] for i in sorted(group)])
        return [e for i, e in enumerate(entries) if i not in group] + [(merged, ())]

    def _commit(self, entries: list[tuple[Segment, tuple[str, ...]]], added: Segment | None = None) -> None:
        """Make `entries` (+ the new segment `added`) the live generation, atomically; the caller holds the lock."""
        entries = [(seg, deleted) for seg, deleted in entries if _live(seg, deleted)]
        entries = self._merged(entries + ([(added, ())] if added else []))
        dimension = next((seg.index.d for seg, _ in entries if seg.size), 0)
        manifest = {"format": FORMAT_VERSION, "embedder": self.embedder_name, "dimension": dimension,
                    "chunks": sum(_live(seg, deleted) for seg, deleted in entries), "config": asdict(self.config),
                    "segments": [{"name": seg.name, "deleted": list(deleted)} for seg, deleted in entries]}
        name = f"gen-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
        _fsync_write(self.folder / name, json.dumps(manifest, ensure_ascii=False, indent=1).encode())
        _fsync_write(self.folder / "CURRENT.tmp", name.encode())
        os.replace(self.folder / "CURRENT.tmp", self.folder / "CURRENT")  # the switch: atomic on POSIX
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.state, self.replaces = _State.of(name, entries), False
        self._collect_garbage(name, {seg.name for seg, _ in entries})

    def _collect_garbage(self, current: str, segments: set[str]) -> None:
        """Delete earlier manifests, segments no manifest names, and staging folders of processes that died."""
        for path in self.folder.iterdir():
            name = path.name
            if ((name.startswith("gen-") and name != current) or (name.startswith("seg-") and name not in segments)
                    or (name.startswith("tmp-") and not _alive(name))):
                try:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                except OSError as err:  # the new generation is live; the next write tries again
                    print(f"warning: could not delete {path}: {err}", file=sys.stderr)

    def _upgrade(self) -> None:
        """Rewrite an index of an earlier version (a folder per generation, every row in one file) as a segment."""
        with self._locked():
            old = self.folder / (self._committed() or "")
            if not old.is_dir():
                return  # another process upgraded it meanwhile
            manifest = json.loads((old / "manifest.json").read_text())
            rows = [json.loads(line) for line in (old / "chunks.jsonl").read_text().splitlines()]
            vectors = np.load(old / "vectors.npy")
            order = {source: i for i, source in enumerate(manifest["sources"])}
            rows_in_order = sorted(range(len(rows)), key=lambda r: order[rows[r]["source"]])
            tokens = [rows[r].pop("tokens") for r in rows_in_order]
            chunks = [Chunk(**rows[r]) for r in rows_in_order]
            self.config, self.embedder_name = KnowledgeConfig.saved(manifest["config"]), manifest["embedder"]
            sources = {s: {k: v for k, v in meta.items() if k != "chunks"} for s, meta in manifest["sources"].items()}
            staged = self._stage(chunks, vectors[rows_in_order], sources, *Segment.postings(chunks, tokens))
            self._commit([], self._placed(staged))

    def _locked(self):
        """One writer at a time (the app and the CLI may share an index), and no reader while it commits."""
        return _file_lock(self.folder, fcntl.LOCK_EX)

    def _check_embedder(self, embedder: Embedder) -> None:
        if len(self) and embedder.name != self.embedder_name:
            raise IndexError_(f"the index in {self.folder} was built with the embedder '{self.embedder_name}', "
                              f"not '{embedder.name}'; rebuild it with `python -m knowledge build`")
        self.embedder_name = embedder.name

    # ----- reading ---------------------------------------------------------------------------------------
    def search(self, query: str, vector: np.ndarray | None, k: int, mode: str,
               dense_weight: float | None = None) -> list[Scored]:
        """The best `k` chunks; "fused" by reciprocal rank, or with `dense_weight` by score (`knowledge.fusion`)."""
        state = self.state  # one generation for the whole search, whatever a write does meanwhile
        if not state.lexical.size:
            return []
        pool = min(state.lexical.size, max(50, 10 * k))  # candidates from each retriever before fusion
        dense = state.dense(vector, pool) if vector is not None else {}
        lexical = state.lexical.search(query, pool) if mode != "dense" else {}
        if mode == "dense":
            ranked = [(key, score) for key, (score, _) in dense.items()]
        elif mode == "lexical":
            ranked = list(lexical.items())
        elif dense_weight is not None and dense:
            ranked = list(score_fusion([{key: score for key, (score, _) in dense.items()}, lexical],
                                       (dense_weight, 1.0 - dense_weight)).items())
        else:  # (both searches return their rows best first)
            ranked = list(reciprocal_rank_fusion([list(dense), list(lexical)]).items())
        return [Scored(state.chunk(key), score, dense[key][1] if key in dense else None, lexical.get(key))
                for key, score in ranked[:k]]

    def stats(self) -> dict:
        state = self.state
        return {"index": str(self.folder), "sources": len(state.sources), "chunks": len(self),
                "embedder": self.embedder_name,
                "dimension": next((int(seg.index.d) for seg in state.segments if seg.size), 0),
                "segments": len(state.segments),
                "sentence_vectors": sum(seg.units.ntotal for seg in state.segments if seg.units is not None),
                "deleted_rows": sum(seg.size for seg in state.segments) - len(self),
                "faiss": sorted({type(seg.index).__name__ for seg in state.segments}),
                "chunk_languages": chunk_languages(state.sources), "config": asdict(self.config)}
