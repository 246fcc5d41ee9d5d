"""Reciprocal-rank fusion (Cormack et al., 2009): several rankings of the same rows become one, by summing
1 / (k + rank) over the rankings each row appears in. Ranks, not scores, are fused, so rankings whose scores
live on different scales (cosine, BM25) combine without calibration.

Used by `knowledge.lexical` (BM25 over words with BM25 over characters) and `knowledge.retriever` (dense with
lexical). Tested in tests/test_retriever.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

RRF_K = 60  # the usual constant: ranks 1 and 2 differ little, so no single ranking dominates by itself


def reciprocal_rank_fusion(rankings: Iterable[Sequence[int]], k: int = RRF_K) -> dict[int, float]:
    """Row → fused score, best first; each ranking lists rows best first."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, row in enumerate(ranking, 1):
            fused[row] = fused.get(row, 0.0) + 1.0 / (k + rank)
    return dict(sorted(fused.items(), key=lambda item: -item[1]))
