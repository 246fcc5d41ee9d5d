"""The embedded knowledge base at scale: how one write, a search and opening cost as the index grows.

    python benchmarks/scale.py --chunks 20000,100000          # about 10 minutes on 2 cores
    python benchmarks/scale.py --chunks 1000000               # the issue's target size (long, ~10 GB of RAM)

The index is made of the bundled corpus's real chunks, repeated under new file names with a number woven into
each text (so BM25 sees a growing vocabulary), and synthetic normalised vectors clustered by source file (an
embedder would take hours to fill a million chunks; search costs depend on the count, not on the values). It is
committed once through the store's own write path. Then, per size, printed:

- open: `KnowledgeBase.open` plus building the retriever (the BM25 indexes are rebuilt in memory);
- add one small file and remove it again (real embedder), each a whole write;
- fused search p50/p95 over 50 queries (English and Chinese);
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
from knowledge.embedder import Embedder  # noqa: E402
from knowledge.lexical import tokenize  # noqa: E402
from knowledge.loaders import find_files, load_file  # noqa: E402
from knowledge.retriever import Retriever  # noqa: E402
from knowledge.store import BUNDLED_CORPUS, KnowledgeBase  # noqa: E402

QUERIES = ["What does LoRA train?", "How does early stopping work?", "困惑度是怎么计算的？", "什么是检索增强生成？",
           "Why divide attention scores by the square root of the key dimension?"]


def base_chunks() -> list[Chunk]:
    config = KnowledgeConfig()
    chunks: list[Chunk] = []
    for path, source in find_files([BUNDLED_CORPUS]):
        chunks += chunk_document(load_file(path, source), config.chunk_tokens, config.chunk_overlap)
    return chunks


def fill(folder: Path, count: int, embedder: Embedder) -> KnowledgeBase:
    """Commit `count` chunks (real text, synthetic vectors) as one generation through the store's write path."""
    base = base_chunks()
    base_tokens = [tokenize(c.indexed_text) for c in base]
    rng = np.random.default_rng(0)
    chunks, tokens = [], []
    sources: dict[str, dict] = {}
    for i in range(count):
        original = base[i % len(base)]
        copy = i // len(base)
        source = f"copy{copy:06d}/{original.source}"
        text = f"{original.text} (#{copy})"
        chunks.append(Chunk(chunk_id(source, text), source, text, original.heading, original.page,
                            original.language))
        tokens.append(base_tokens[i % len(base)] + [f"n{copy}"])
        meta = sources.setdefault(source, {"path": source, "sha256": "-", "chunks": 0, "added": "-"})
        meta["chunks"] += 1
    files = len(sources)
    dimension = embedder.dimension
    centres = rng.standard_normal((max(files, 1), dimension)).astype(np.float32)
    owner = {source: n for n, source in enumerate(sources)}
    vectors = centres[[owner[c.source] for c in chunks]] + 0.3 * rng.standard_normal((count, dimension),
                                                                                     dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    kb = KnowledgeBase.fresh(folder)
    kb.embedder_name = embedder.name
    with kb._locked():
        kb._write([], chunks, vectors.astype(np.float32), tokens, sources)
    return kb


def disk_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(count: int, embedder: Embedder, scratch: Path) -> dict:
    folder = scratch / f"index-{count}"
    start = time.perf_counter()
    fill(folder, count, embedder)
    filled = time.perf_counter() - start
    start = time.perf_counter()
    retriever = Retriever(KnowledgeBase.open(folder), embedder)
    opened = time.perf_counter() - start
    times = []
    for n in range(50):
        start = time.perf_counter()
        retriever.search(QUERIES[n % len(QUERIES)], k=5)
        times.append(time.perf_counter() - start)
    note = scratch / "note.md"
    note.write_text("# A new note\n\nThe Pemba cooperative grows cloves on Zanzibar.\n")
    start = time.perf_counter()
    retriever.kb.add([note], embedder, progress=False)
    retriever.refresh()
    added = time.perf_counter() - start
    start = time.perf_counter()
    retriever.kb.remove(["note.md"])
    retriever.refresh()
    removed = time.perf_counter() - start
    times.sort()
    result = {"chunks": count, "fill_s": filled, "open_s": opened, "add_s": added, "remove_s": removed,
              "search_p50_ms": 1000 * statistics.median(times), "search_p95_ms": 1000 * times[int(0.95 * 49)],
              "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "disk_mb": disk_size(folder) / 2**20}
    shutil.rmtree(folder)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", default="20000,100000", help="index sizes, comma-separated")
    args = parser.parse_args(argv)
    embedder = Embedder()
    print("| chunks | open | add one file | remove it | search p50 | search p95 | peak RSS | on disk |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="scale-") as scratch:
        for count in (int(n) for n in args.chunks.split(",")):
            r = measure(count, embedder, Path(scratch))
            print(f"| {count:,} | {r['open_s']:.1f} s | {r['add_s']:.1f} s | {r['remove_s']:.1f} s | "
                  f"{r['search_p50_ms']:.0f} ms | {r['search_p95_ms']:.0f} ms | {r['rss_mb']:.0f} MB | "
                  f"{r['disk_mb']:.0f} MB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
