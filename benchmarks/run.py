"""Performance on this machine: one command that prints the table.

    python benchmarks/run.py                 # about two minutes on 2 CPU cores
    python benchmarks/run.py --repeat 5

Figures are medians over --repeat runs, and each row that has a natural baseline prints its ratio to it,
measured in the same process right before (the machines are shared and noisy; ratios travel better than
seconds):
- generation: time to first token and tokens per second of the embedded model, streaming versus one
  blocking `generate()` call of the same length (the cost of streaming through a thread); both count generated
  token ids;
- retrieval: fused search versus BM25 alone over the bundled knowledge base, per query, with and without sentence
  vectors;
- answers: a whole extractive answer (retrieval + sentence choice) per question, English and Chinese;
- vector search: HNSW versus exact FAISS search over 50,000 clustered normalised vectors, with HNSW's recall;
- indexing: chunks per second when building the bundled corpus with each embedder backend (`benchmarks/filling.py`
  does it for every evaluation corpus).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.filling import corpus_rows, embedders, print_table  # noqa: E402
from chatbot.assistant import Assistant  # noqa: E402
from chatbot.chat_format import render_prompt  # noqa: E402
from chatbot.config import ChatConfig  # noqa: E402
from chatbot.engine import GenerationOptions, Usage  # noqa: E402
from chatbot.hf_engine import TransformersEngine as Engine  # noqa: E402
from knowledge.config import KnowledgeConfig  # noqa: E402
from knowledge.embedder import Embedder  # noqa: E402
from knowledge.retriever import Retriever  # noqa: E402
from knowledge.segment import build_faiss  # noqa: E402
from knowledge.store import BUNDLED_CORPUS, scratch_knowledge_base  # noqa: E402

QUESTIONS = ["What does LoRA train?", "How does early stopping work?", "困惑度是怎么计算的？", "什么是检索增强生成？"]
PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Explain in three sentences what a language model is."}]


def median_time(function: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generation_rows(engine: Engine, repeat: int) -> list[tuple[str, str, str]]:
    """Both rates count generated token ids (the engine's `Usage`, and generate()'s output), prefill included."""
    options = GenerationOptions(max_new_tokens=64)
    ids = render_prompt(engine.tokenizer, PROMPT)
    first, totals, counts = [], [], []
    for _ in range(repeat):
        usage = Usage()
        start = time.perf_counter()
        for piece_number, _piece in enumerate(engine.stream(PROMPT, options, usage=usage)):
            if piece_number == 0:
                first.append(time.perf_counter() - start)
        totals.append(time.perf_counter() - start)
        counts.append(usage.completion_tokens)

    rates = []
    for _ in range(repeat):  # the baseline: one blocking generate() of the same length, no streamer or thread
        start = time.perf_counter()
        with torch.inference_mode():
            out = engine.model.generate(torch.tensor([ids]), max_new_tokens=max(counts), min_new_tokens=max(counts),
                                        do_sample=False, pad_token_id=engine.eos_token_ids[0])
        rates.append((out.shape[1] - len(ids)) / (time.perf_counter() - start))
    speed = statistics.median(c / t for c, t in zip(counts, totals, strict=True))
    blocking = statistics.median(rates)
    return [("time to first token (streaming)", f"{statistics.median(first) * 1000:.0f} ms", ""),
            ("tokens per second, blocking generate()", f"{blocking:.1f}", "1.00x"),
            ("tokens per second, streaming engine", f"{speed:.1f}", f"{speed / blocking:.2f}x")]


def retrieval_rows(retriever: Retriever, assistant: Assistant, repeat: int, chunks_only: Retriever
                   ) -> list[tuple[str, str, str]]:
    def search(mode: str, searcher: Retriever = retriever) -> Callable[[], None]:
        return lambda: [searcher.search(q, k=5, mode=mode) for q in QUESTIONS]

    lexical = median_time(search("lexical"), repeat) / len(QUESTIONS)
    fused = median_time(search("fused"), repeat) / len(QUESTIONS)
    plain = median_time(search("fused", chunks_only), repeat) / len(QUESTIONS)
    rows = [("BM25 search, per query", f"{lexical * 1000:.1f} ms", "1.00x"),
            ("fused search, chunk vectors only, per query", f"{plain * 1000:.1f} ms", f"{plain / lexical:.2f}x"),
            ("fused search (with sentence vectors), per query", f"{fused * 1000:.1f} ms", f"{fused / lexical:.2f}x")]
    for language, question in (("en", QUESTIONS[0]), ("zh", QUESTIONS[2])):
        seconds = median_time(lambda q=question: assistant.ask(q), repeat)
        rows.append((f"extractive answer ({language}), retrieval included", f"{seconds * 1000:.0f} ms", ""))
    return rows


def normalised(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def vector_rows(repeat: int) -> list[tuple[str, str, str]]:
    # Sentence embeddings cluster by topic: 1,000 topics of 50 passages each (cosine ~0.8 to their topic), and
    # queries near a topic; uniform random vectors would be a worst case that real collections never are.
    rng = np.random.default_rng(0)
    topics = normalised(rng.standard_normal((1000, 384)))
    vectors = normalised(np.repeat(topics, 50, axis=0) + 0.04 * rng.standard_normal((50_000, 384)))
    queries = normalised(topics[rng.integers(0, 1000, 200)] + 0.04 * rng.standard_normal((200, 384)))
    exact, approximate = build_faiss(vectors, approximate_after=10**9), build_faiss(vectors, approximate_after=0)
    exact_s = median_time(lambda: exact.search(queries, 5), repeat) / len(queries)
    approximate_s = median_time(lambda: approximate.search(queries, 5), repeat) / len(queries)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact.search(queries, 5)[1],
                                                               approximate.search(queries, 5)[1], strict=True)])
    return [("exact FAISS search, 50k vectors, per query", f"{exact_s * 1000:.2f} ms", "1.00x"),
            ("HNSW search, 50k vectors, per query", f"{approximate_s * 1000:.3f} ms",
             f"{approximate_s / exact_s:.2f}x (recall@5 {recall:.3f})")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is printed)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    engine = Engine.load(None)
    embedder = Embedder()
    with (scratch_knowledge_base([BUNDLED_CORPUS], embedder) as kb,
          scratch_knowledge_base([BUNDLED_CORPUS], embedder, KnowledgeConfig(sentence_vectors=False)) as plain):
        retriever = Retriever(kb, embedder)
        assistant = Assistant(engine, ChatConfig(), retriever)
        rows = generation_rows(engine, args.repeat) + retrieval_rows(retriever, assistant, args.repeat,
                                                                     Retriever(plain, embedder))
    rows += vector_rows(args.repeat) + corpus_rows("bundled", BUNDLED_CORPUS, embedders(), args.repeat)
    print(f"\n{torch.get_num_threads()} CPU threads, torch {torch.__version__}, model {engine.name}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
