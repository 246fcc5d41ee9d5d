"""Reciprocal-rank fusion (Cormack et al., 2009): several rankings of the same rows become one, by summing
1 / (k + rank) over the rankings each row appears in. Ranks, not scores, are fused, so rankings whose scores
live on different scales (cosine, BM25) combine without calibration.

Used by `knowledge.lexical` (BM25 over words with BM25 over characters) and `knowledge.retriever` (dense with
lexical). Tested in tests/test_retriever.py.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

RRF_K = 60  # the usual constant: ranks 1 and 2 differ little, so no single ranking dominates by itself


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
