"""How fast a knowledge base fills: chunks per second building each evaluation corpus with each backend of
all-MiniLM-L6-v2 (the English half of the default embedder), one vector a chunk (`--no-sentence-vectors`: the
runtimes compared; the default also embeds each chunk's sentences, 1.8-2.9x slower, `benchmarks/corpora.py
--chunk-vectors-only`).

    python benchmarks/filling.py               # about nine minutes on 2 CPU cores
    python benchmarks/filling.py --repeat 5 --corpora bundled

Corpora: the bundled documents, Python's pydoc topics and the Chinese Rust by Example (where rustup installed it;
`knowledge.eval.external`). Each build is a whole `KnowledgeBase.add` into a new folder: reading, chunking,
embedding, BM25 postings, writing. Backends, alternated and each the median of --repeat builds: torch in float32
(the baseline, ratio 1.00x), torch in bfloat16 (on a CPU with bfloat16 instructions), openvino (the default on a
CPU) and onnx int8 (`--embedding-backend onnx`). One build of each corpus runs first and is not counted (jieba
loads its dictionary then). Two more figures show where the default's time goes: reading and chunking alone, and
embedding the same chunks alone (the build does both at once, `knowledge.embedder.Background`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from knowledge.config import KnowledgeConfig  # noqa: E402
from knowledge.embedded import KnowledgeBase  # noqa: E402
from knowledge.embedder import EMBEDDED_NAME, Embedder  # noqa: E402
from knowledge.eval.external import CORPORA  # noqa: E402
from knowledge.store import BUNDLED_CORPUS, read_files  # noqa: E402

Row = tuple[str, str, str]


def corpora(names: list[str], scratch: Path) -> dict[str, Path]:
    """The named corpora, written into `scratch` (`knowledge.eval.external`); one not installed here is skipped."""
    found = {}
    for name in names:
        try:
            found[name] = BUNDLED_CORPUS if name == "bundled" else CORPORA[name](scratch / name)
        except FileNotFoundError as err:
            print(f"skipped {name}: {err}", file=sys.stderr)
    return found


def embedders() -> dict[str, tuple[Embedder, bool]]:
    """label → (embedder, bf16 on or off for the torch one)."""
    torch_embedder = Embedder(EMBEDDED_NAME, backend="torch")
    variants = {"torch, float32": (torch_embedder, False)}
    if torch_embedder.bf16:
        variants["torch, bfloat16"] = (torch_embedder, True)
    variants["openvino (the default on a CPU)"] = (Embedder(EMBEDDED_NAME, backend="openvino"), False)
    variants["onnx int8 (`--embedding-backend onnx`)"] = (Embedder(EMBEDDED_NAME, backend="onnx"), False)
    return variants


def build_seconds(corpus: Path, embedder: Embedder) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        report = KnowledgeBase.open(Path(folder) / "index", KnowledgeConfig(sentence_vectors=False)).add(
            [corpus], embedder, progress=False)
        return time.perf_counter() - start, report.chunks


def corpus_rows(name: str, corpus: Path, variants: dict[str, tuple[Embedder, bool]], repeat: int) -> list[Row]:
    default = next(e for label, (e, _) in variants.items() if label.startswith("openvino"))
    build_seconds(corpus, default)  # not counted: jieba's dictionary, the first run of each code path
    seconds: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(repeat):
        for label, (embedder, bf16) in variants.items():
            if embedder.backend == "torch":  # one torch embedder serves both of its rows
                embedder.bf16 = bf16
            elapsed, chunks = build_seconds(corpus, embedder)
            seconds[label].append(elapsed)
    start = time.perf_counter()
    _, new_chunks, _ = read_files([corpus], KnowledgeConfig(), {}, progress=False)
    reading = time.perf_counter() - start
    texts = [c.indexed_text for file_chunks in new_chunks.values() for c in file_chunks]
    start = time.perf_counter()
    default.encode(texts)
    embedding = time.perf_counter() - start
    lengths = [len(ids) for ids in default.model.tokenizer(texts)["input_ids"]]
    window = default.model.max_seq_length
    tokens, cut = sum(min(n, window) for n in lengths), sum(n > window for n in lengths)

    base = chunks / statistics.median(seconds["torch, float32"])
    rows = []
    for label in variants:
        rate = chunks / statistics.median(seconds[label])
        note = f"{rate / base:.2f}x" + (f" ({chunks} chunks, {tokens / chunks:.0f} tokens each, {cut} longer than "
                                        f"the embedder's {window})" if label == "torch, float32" else "")
        rows.append((f"{name}: building, {label}", f"{rate:.0f} chunks/s", note))
    rows.append((f"{name}: reading and chunking alone", f"{reading:.2f} s", ""))
    rows.append((f"{name}: embedding alone, openvino", f"{embedding:.2f} s", f"{chunks / embedding:.0f} chunks/s, "
                                                                              f"{tokens / embedding:.0f} tokens/s"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="builds per figure (the median is printed)")
    parser.add_argument("--corpora", default="bundled,pydoc,rust-zh",
                        help=f"comma-separated: bundled, {', '.join(CORPORA)}")
    args = parser.parse_args(argv)
    unknown = set(args.corpora.split(",")) - {"bundled", *CORPORA}
    if unknown:
        parser.error(f"unknown corpora: {', '.join(sorted(unknown))}")
    variants = embedders()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, corpus in corpora(args.corpora.split(","), Path(scratch)).items():
            rows += corpus_rows(name, corpus, variants, args.repeat)
    print_table(rows)
    return 0


def print_table(rows: list[Row]) -> None:
    print("\n| measurement | value | ratio / note |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")


if __name__ == "__main__":
    sys.exit(main())
