"""Retrieval quality on the project's bilingual question set: hit@1, hit@3 and MRR per mode and language,
and how well the relevance threshold separates answerable questions from ones the documents do not cover.

    python -m knowledge evaluate                          # builds the default corpus into a temporary index
    python -m knowledge evaluate --index DIR --questions FILE --out-of-scope FILE

A question counts as found at rank r when the r-th hit comes from the expected source (or one of the expected
sources) and contains the expected key phrase (so the right file with the wrong passage does not count).
`knowledge/eval/external.py` writes corpora the project did not write (Python's pydoc topics) for the same
command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from knowledge.retriever import MODES, Retriever

PACKAGE = Path(__file__).resolve().parent
QUESTIONS = PACKAGE / "eval" / "questions.jsonl"
OUT_OF_SCOPE = PACKAGE / "eval" / "out_of_scope.jsonl"


@dataclass
class Scores:
    hit1: float
    hit3: float
    mrr: float
    n: int


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def first_rank(retriever: Retriever, question: dict, mode: str, k: int = 10) -> int | None:
    hits = retriever.search(question["question"], k=k, mode=mode, language=question.get("language"))
    return next((rank for rank, hit in enumerate(hits, 1) if matches(question, hit.chunk)), None)


def matches(question: dict, chunk) -> bool:
    """Whether `chunk` answers `question`: its expected source ("source" may list several files where a corpus
    repeats a passage, as pydoc's topics do) and its key phrase."""
    sources = question["source"] if isinstance(question["source"], list) else [question["source"]]
    return chunk.source in sources and question["key_phrase"] in chunk.indexed_text


def score(ranks: list[int | None]) -> Scores:
    n = len(ranks)
    return Scores(hit1=sum(r == 1 for r in ranks) / n, hit3=sum(r is not None and r <= 3 for r in ranks) / n,
                  mrr=sum(1 / r for r in ranks if r) / n, n=n)


def retrieval_table(retriever: Retriever, questions: list[dict]) -> dict[tuple[str, str], Scores]:
    """(mode, language) → scores, with language "all" for the whole set. "fused-equal" is the baseline that
    lets the embedder vote in every language, to show what fusing by language gains."""
    table = {}
    for mode in (*MODES, "fused-equal"):
        searcher = retriever.with_dense_languages("*") if mode == "fused-equal" else retriever
        ranks = {q["question"]: first_rank(searcher, q, mode.split("-")[0]) for q in questions}
        for language in sorted({q["language"] for q in questions}) + ["all"]:
            chosen = [ranks[q["question"]] for q in questions if language in ("all", q["language"])]
            table[(mode, language)] = score(chosen)
    return table


def threshold_table(retriever: Retriever, questions: list[dict], outside: list[dict],
                    thresholds: tuple[float, ...]) -> list[dict]:
    """For each threshold: the share of answerable questions kept and of out-of-scope ones rejected."""
    def top_relevance(q: dict) -> float:
        hits = retriever.search(q["question"], k=5, language=q.get("language"))
        return max((h.relevance for h in hits), default=0.0)

    inside = [top_relevance(q) for q in questions]
    beyond = [top_relevance(q) for q in outside]
    return [{"threshold": t, "answered": sum(r >= t for r in inside) / len(inside),
             "rejected": sum(r < t for r in beyond) / max(len(beyond), 1)} for t in thresholds]


def markdown(table: dict[tuple[str, str], Scores]) -> str:
    lines = ["| retrieval | language | questions | hit@1 | hit@3 | MRR |", "|---|---|---|---|---|---|"]
    for (mode, language), s in table.items():
        lines.append(f"| {mode} | {language} | {s.n} | {s.hit1:.3f} | {s.hit3:.3f} | {s.mrr:.3f} |")
    return "\n".join(lines)
