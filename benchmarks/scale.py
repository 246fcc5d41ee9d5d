"""The embedded knowledge base at scale: how one write, a search and opening cost as the index grows.

    python benchmarks/scale.py --chunks 20000,100000
    python benchmarks/scale.py --chunks 1000000               # the issue's target size
    python benchmarks/scale.py --chunks 20000 --milvus        # the same on a Milvus Lite collection

The index is made of the bundled corpus's real chunks, repeated under new file names with a number woven into
each text and a term of each copy's own in its postings (so BM25 sees a growing vocabulary), and synthetic
normalised vectors clustered by source file (an embedder would take hours to fill a million chunks; search costs
depend on the count, not on the values). It is committed as one segment through the store's own write path (an
HNSW graph past 20,000 chunks). Then, per size, printed:

- filled in: building and committing that segment;
- open: `KnowledgeBase.open` plus the retriever (postings and chunk text are memory-mapped);
- add one small file (real embedder), how long another process's copy takes to pick it up (`reload`), and removing
  it again; the benchmark checks that the note is found after the add and gone after the removal;
- fused search: the first search of each of the 5 queries after opening (the slowest of them: postings and chunk
  text are read from disk then), then p50/p95 over 50 more (English and Chinese), the query's embedding included;
- peak RSS of the process so far (it includes the smaller sizes run before) and the index's size on disk.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from knowledge.chunking import Chunk, chunk_document, chunk_id  # noqa: E402
from knowledge.config import KnowledgeConfig  # noqa: E402
from knowledge.embedded import KnowledgeBase  # noqa: E402
from knowledge.embedder import Embedder  # noqa: E402
from knowledge.lexical import Postings, character_terms, tokenize  # noqa: E402
from knowledge.loaders import find_files, load_file  # noqa: E402
from knowledge.retriever import Retriever  # noqa: E402
from knowledge.store import BUNDLED_CORPUS, open_store  # noqa: E402

QUERIES = ["What does LoRA train?", "How does early stopping work?", "困惑度是怎么计算的？", "什么是检索增强生成？",
           "Why divide attention scores by the square root of the key dimension?"]


def base_chunks() -> list[Chunk]:
    config = KnowledgeConfig()
    chunks: list[Chunk] = []
    for path, source in find_files([BUNDLED_CORPUS]):
        chunks += chunk_document(load_file(path, source), config.chunk_tokens, config.chunk_overlap)
    return chunks


def postings(base_terms: list[list[str]], count: int) -> Postings:
    """The postings of `count` rows that repeat the base rows' terms, each copy with one term of its own
    ("n<copy>"), built from arrays: tokenising a million rows one by one would take most of an hour."""
    base = Postings.build(base_terms)
    per_row = np.diff(base.indptr)
    base_terms_of = np.repeat(np.arange(len(per_row)), per_row)  # base term id of each (term, row) entry
    n = len(base.lengths)
    copies = -(-count // n)
    rows = (base.rows[None, :].astype(np.int64) + n * np.arange(copies)[:, None]).ravel()
    terms = np.tile(base_terms_of, copies)
    counts = np.tile(base.counts, copies)
    keep = rows < count
    own = np.arange(count)
    vocabulary = dict(base.vocabulary) | {f"n{c}": len(base.vocabulary) + c for c in range(copies)}
    return Postings.from_counts(vocabulary, np.concatenate([rows[keep], own]),
                                np.concatenate([terms[keep], len(base.vocabulary) + own // n]),
                                np.concatenate([counts[keep], np.ones(count, np.float32)]),
                                np.tile(base.lengths + 1, copies)[:count])


def corpus(count: int, embedder: Embedder) -> tuple[list[Chunk], np.ndarray, dict[str, dict], list[Chunk]]:
    """`count` chunks of real text under new file names, their synthetic vectors, their sources, and the base
    chunks they repeat."""
    base = base_chunks()
    rng = np.random.default_rng(0)
    chunks = []
    sources: dict[str, dict] = {}
    for i in range(count):
        original = base[i % len(base)]
        copy = i // len(base)
        source = f"copy{copy:06d}/{original.source}"
        chunks.append(Chunk(chunk_id(source, original.text + str(copy)), source, f"{original.text} (#{copy})",
                            original.heading, original.page, original.language))
        sources.setdefault(source, {"path": source, "sha256": "-", "added": "-"})
    owner = {source: n for n, source in enumerate(sources)}
    centres = rng.standard_normal((len(sources), embedder.dimension)).astype(np.float32)
    vectors = centres[[owner[c.source] for c in chunks]]
    vectors += 0.3 * rng.standard_normal(vectors.shape, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return chunks, vectors, sources, base


def fill(folder: Path, count: int, embedder: Embedder) -> None:
    """Commit `count` chunks (real text, synthetic vectors) as one segment through the store's write path."""
    chunks, vectors, sources, base = corpus(count, embedder)
    words = postings([tokenize(c.indexed_text) for c in base], count)
    characters = postings([character_terms(c.indexed_text) for c in base], count)
    kb = KnowledgeBase.fresh(folder)
    kb.embedder_name = embedder.name
    staged = kb._stage(chunks, vectors, sources, words, characters)
    with kb._locked():
        kb._commit([], kb._placed(staged))


def fill_milvus(uri: str, count: int, embedder: Embedder) -> None:
    """The same rows inserted into a Milvus collection (which segments the text and computes BM25 itself)."""
    from knowledge.chunking import language_counts
    from knowledge.milvus import MilvusStore, _row

    chunks, vectors, sources, _ = corpus(count, embedder)
    store = MilvusStore.fresh(uri)
    store.embedder_name = embedder.name
    store._create(embedder.dimension, drop=True)
    for start in range(0, count, 2000):
        store.client.insert(store.collection, [_row(c, v, "-") for c, v in zip(chunks[start:start + 2000],
                                                                               vectors[start:start + 2000],
                                                                               strict=True)])
    by_source: dict[str, list[Chunk]] = {}
    for chunk in chunks:
        by_source.setdefault(chunk.source, []).append(chunk)
    rows = [{"source": s, "meta": meta | {"chunks": len(by_source[s]), "languages": language_counts(by_source[s])},
             "v": [0.0, 0.0]} for s, meta in sources.items()]
    for start in range(0, len(rows), 2000):
        store.client.upsert(store._sources_collection, rows[start:start + 2000])
    for name in (store.collection, store._sources_collection):
        store.client.flush(name)  # sealed segments get their indexes (rows still in memory are scanned)


def disk_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(count: int, embedder: Embedder, scratch: Path, milvus: bool) -> dict:
    folder = scratch / f"index-{count}"
    uri = str(folder / "kb.db") if milvus else None
    start = time.perf_counter()
    if milvus:
        folder.mkdir()
        fill_milvus(uri, count, embedder)
    else:
        fill(folder, count, embedder)
    filled = time.perf_counter() - start
    start = time.perf_counter()
    retriever = Retriever(open_store(folder, uri), embedder)
    opened = time.perf_counter() - start
    cold = []
    for query in QUERIES:  # the first search of each query reads its postings and chunk text from disk (mmap)
        start = time.perf_counter()
        retriever.search(query, k=5)
        cold.append(time.perf_counter() - start)
    times = []
    for n in range(50):
        start = time.perf_counter()
        retriever.search(QUERIES[n % len(QUERIES)], k=5)
        times.append(time.perf_counter() - start)
    note = scratch / "note.md"
    note.write_text("# A new note\n\nThe Pemba cooperative grows cloves on Zanzibar.\n")
    other = open_store(folder, uri)  # another process's copy, e.g. the app while the CLI writes
    start = time.perf_counter()
    retriever.kb.add([note], embedder, progress=False)
    added = time.perf_counter() - start
    start = time.perf_counter()
    other.reload()
    seen = time.perf_counter() - start
    found = retriever.search("Pemba cooperative cloves", k=1)[0].chunk.source == "note.md"
    start = time.perf_counter()
    retriever.kb.remove(["note.md"])
    removed = time.perf_counter() - start
    gone = all(hit.chunk.source != "note.md" for hit in retriever.search("Pemba cooperative cloves", k=5))
    times.sort()
    result = {"chunks": count, "fill_s": filled, "open_s": opened, "add_s": added, "remove_s": removed,
              "seen_s": seen, "checked": found and gone,
              "search_p50_ms": 1000 * statistics.median(times), "search_p95_ms": 1000 * times[int(0.95 * 49)],
              "first_search_ms": 1000 * max(cold),
              "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "disk_mb": disk_size(folder) / 2**20}
    shutil.rmtree(folder)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", default="20000,100000", help="index sizes, comma-separated")
    parser.add_argument("--milvus", action="store_true", help="measure a Milvus Lite collection instead")
    args = parser.parse_args(argv)
    embedder = Embedder()
    print("| chunks | filled in | open | add one file | seen by another process | remove it | first searches (max) | "
          "search p50 | search p95 | peak RSS | on disk |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="scale-") as scratch:
        for count in (int(n) for n in args.chunks.split(",")):
            r = measure(count, embedder, Path(scratch), args.milvus)
            if not r["checked"]:
                raise SystemExit("the added note was not found, or the removed one still was")
            print(f"| {count:,} | {r['fill_s']:.0f} s | {r['open_s']:.1f} s | {r['add_s']:.2f} s | "
                  f"{r['seen_s']:.2f} s | {r['remove_s']:.2f} s | {r['first_search_ms']:.0f} ms | "
                  f"{r['search_p50_ms']:.0f} ms | {r['search_p95_ms']:.0f} ms | {r['rss_mb']:.0f} MB | "
                  f"{r['disk_mb']:.0f} MB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
