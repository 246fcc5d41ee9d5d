"""Two ways to make several rankings of the same rows one.

- Reciprocal-rank fusion (Cormack et al., 2009): summing 1 / (k + rank) over the rankings each row appears in.
  Ranks, not scores, are fused, so rankings whose scores live on different scales (cosine, BM25) combine without
  calibration; but a row that only one ranking finds, however far ahead of the rest, loses to rows both rank
  middling (a dense rank-1 hit that BM25 misses falls below rank 10).
- Score fusion: each ranking's scores rescaled to [0, 1] over its own candidates (min-max) and summed with
  weights; a row a ranking did not return scores its minimum there (0). A clear lead in one ranking survives.

Reciprocal-rank fusion is used by `knowledge.lexical` (BM25 over words with BM25 over characters) and
`knowledge.retriever` (dense with lexical); score fusion by `knowledge.retriever` for the query languages where
it measured better (`knowledge.retriever.SCORE_FUSION`). Tested in tests/test_retriever.py.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

RRF_K = 60  # the usual constant: ranks 1 and 2 differ little, so no single ranking dominates by itself
# Score fusion rescales each ranking over this many of its best rows, however many hits were asked for, so that a
# search for 3 hits and one for 10 rank alike (the stores fetch at least 50 candidates from each retriever).
SCORE_DEPTH = 50


def reciprocal_rank_fusion(rankings: Iterable[Sequence[Hashable]], k: float = RRF_K,
                           weights: Sequence[float] | None = None) -> dict[Hashable, float]:
    """Row → fused score, best first; each ranking lists rows best first, and counts `weights[i]` times (1 each
    by default: benchmarks/corpora.py measures other weights and constants)."""
    fused: dict[Hashable, float] = {}
    for i, ranking in enumerate(rankings):
        weight = 1.0 if weights is None else weights[i]
        for rank, row in enumerate(ranking, 1):
            fused[row] = fused.get(row, 0.0) + weight / (k + rank)
    return dict(sorted(fused.items(), key=lambda item: -item[1]))


def score_fusion(scored: Sequence[Mapping[Hashable, float]], weights: Sequence[float],
                 depth: int = SCORE_DEPTH) -> dict[Hashable, float]:
    """Row → fused score, best first: the sum over `scored` (each row → score, higher is better) of `weights[i]`
    times the row's score rescaled to [0, 1] among that ranking's best `depth` rows (0 below them, where the
    ranking lacks the row, or where it has one score only)."""
    fused: dict[Hashable, float] = {}
    for weight, scores in zip(weights, scored, strict=True):
        best = sorted(scores.values(), reverse=True)[:depth]
        low, high = (best[-1], best[0]) if best else (0.0, 0.0)
        for row, value in scores.items():
            share = max(0.0, (value - low) / (high - low)) if high > low else 0.0
            fused[row] = fused.get(row, 0.0) + weight * share
    return dict(sorted(fused.items(), key=lambda item: -item[1]))
