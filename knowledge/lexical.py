"""Lexical retrieval: BM25 over words, with jieba segmenting Chinese.

English is lower-cased and split into words; runs of Chinese characters go through jieba's search mode
(which also emits the shorter words inside long ones: 检索增强生成 → 检索, 增强, 生成, 检索增强生成). Common
function words of both languages are dropped, so "什么是LoRA？" searches for "lora" alone.
"""

from __future__ import annotations

import logging
import re

import bm25s
import numpy as np

_RUN = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)|([A-Za-z0-9\u00c0-\u024f]+(?:[-_.'][A-Za-z0-9]+)*)")
STOPWORDS = frozenset("""
a an the and or but if then than so of to in on at by for with from into about as is are was were be been being
do does did doing have has had having i me my we our you your he she it its they them their this that these those
what which who whom whose when where why how can could should would will shall may might must not no yes
there here also just very more most some any each other such only own same too s t don doesn isn aren
please tell explain describe give show let us know mean means meaning
的 了 是 在 和 与 及 或 就 都 而 也 把 被 对 从 向 为 吗 呢 吧 啊 呀 么 什么 怎么 怎样 如何 为什么 哪 哪些 哪个
哪里 一个 一种 这个 那个 这 那 它 它们 我 我们 你 你们 他 她 有 没有 会 能 可以 要 请 请问 一下 告诉 解释 说说
介绍 是否 多少 几 之 其 上 中 下 等 个 吗？
""".split())


def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def tokenize(text: str) -> list[str]:
    """Index/query terms of `text`, in order, without stopwords."""
    jieba = None
    terms: list[str] = []
    for han, word in _RUN.findall(text):
        if han:
            jieba = jieba or _jieba()
            terms += [w for w in jieba.lcut_for_search(han) if w.strip()]
        else:
            terms += _latin_terms(word.lower())
    return [t for t in terms if t not in STOPWORDS]


def _latin_terms(word: str) -> list[str]:
    """A word's terms: "over-fitting" gives over, fitting and overfitting, so either spelling matches."""
    parts = [p for p in re.split(r"[-_.']", word) if p]
    if len(parts) > 1:
        parts.append("".join(parts))
    return [_stem(p) for p in parts]


def _stem(word: str) -> str:
    """Plural to singular, the one inflection that matters most for matching questions to passages."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


class LexicalIndex:
    """BM25 over pre-tokenised chunks; built in memory from the tokens stored with the index (fast)."""

    def __init__(self, token_lists: list[list[str]]):
        self.size = len(token_lists)
        self.bm25 = bm25s.BM25()
        if self.size:
            # An empty chunk would break bm25s; a placeholder token that no query produces keeps positions.
            self.bm25.index([tokens or ["\x00"] for tokens in token_lists], show_progress=False)
        document_frequency: dict[str, int] = {}
        for tokens in token_lists:
            for term in set(tokens):
                document_frequency[term] = document_frequency.get(term, 0) + 1
        self.document_frequency = document_frequency

    def idf(self, term: str) -> float:
        df = self.document_frequency.get(term, 0)
        return float(np.log(1 + (self.size - df + 0.5) / (df + 0.5)))

    def scores(self, query_terms: list[str]) -> np.ndarray:
        if not self.size or not query_terms:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.bm25.get_scores(query_terms), dtype=np.float32)

    def coverage(self, query_terms: list[str], chunk_terms: list[str]) -> float:
        """IDF-weighted share of the query's distinct terms found in the chunk: 1.0 = all of them.

        Unlike a BM25 score, it is comparable across queries, so it can decide "relevant or not"."""
        distinct = set(query_terms)
        total = sum(self.idf(t) for t in distinct)
        if not total:
            return 0.0
        present = set(chunk_terms)
        return sum(self.idf(t) for t in distinct if t in present) / total
