"""benchmarks/corpora.py counts the questions whose answer is among either retriever's first candidates (the ceiling
of any fusion or reranking of those candidates) and pools false declines per language over the corpora."""

from __future__ import annotations

from benchmarks.corpora import declines_by_language, reach, reach_table


def question(dense: list[bool], lexical: list[bool], fused: int | None) -> dict:
    """A question's kept candidates, as `measure` keeps them: [chunk id, answers it, score] per ranking."""
    return {"language": "zh", "ranks": {"dense": None, "lexical": None, "fused": fused},
            "candidates": {"dense": [[f"d{i}", ok, 1.0 - i / 100] for i, ok in enumerate(dense)],
                           "lexical": [[f"l{i}", ok, 9.0 - i / 10] for i, ok in enumerate(lexical)]}}


def test_an_answer_counts_within_the_depth_of_either_ranking_only():
    rows = [question([True] + [False] * 59, [False] * 60, 1),  # dense first
            question([False] * 60, [False] * 5 + [True] + [False] * 54, 6),  # BM25 sixth
            question([False] * 40 + [True] + [False] * 19, [False] * 60, None),  # dense 41st
            question([False] * 60, [False] * 60, None)]  # nowhere
    assert [reach(rows, depth) for depth in (1, 3, 10, 50)] == [1, 1, 2, 3]


def test_the_table_has_a_row_per_corpus_and_language_with_the_fused_hit_at_3():
    rows = [question([True], [False], 1), question([False], [False] * 9 + [True], 10)]
    lines = reach_table({("vim-zh", "bilingual"): {"questions": rows}})
    assert lines[2] == "| vim-zh | zh | 2 | bilingual | 0.500 | 1 / 2 / 2 |"


def test_false_declines_are_pooled_per_language_with_every_corpus_above_the_goal_named():
    def asked(language: str, declined: int, total: int) -> list[dict]:
        return [{"language": language, "declined": i < declined} for i in range(total)]

    results = {("bundled", "bilingual"): {"questions": asked("en", 1, 61) + asked("zh", 3, 57)},
               ("man-zh", "bilingual"): {"questions": asked("zh", 2, 38)},  # the same share as bundled zh
               ("vim-zh", "bilingual"): {"questions": asked("zh", 2, 40)},  # 5.0%: within the goal
               ("cargo", "bilingual"): {"questions": asked("en", 0, 40)},
               ("cargo", "all-MiniLM-L6-v2"): {"questions": asked("en", 0, 40)}}
    assert declines_by_language(results)[2:] == [
        "| bilingual | en | 1/101 (1.0%) | – |",
        "| bilingual | zh | 7/135 (5.2%) | bundled 3/57 (5.3%), man-zh 2/38 (5.3%) |",
        "| all-MiniLM-L6-v2 | en | 0/40 (0.0%) | – |"]
