"""Where a message is answered from: the documents, or the model's own knowledge (general chat).

    route = decide(question, hits, retriever.lexical)        # Route("documents") or Route("chat", reason)
    python -m chatbot.evaluate                                # the confusion table, with key-fact recall and safety

The knowledge base answers only when three measured signals agree; otherwise the model answers by itself and the
reply says so. An everyday request answered with quotes of an unrelated passage is the worst outcome, and a
document question answered by the model (labelled as such) is a mild one, so every signal leans to chat:
- a request for a task rather than for facts ("Write a haiku", "Translate ...", "17 * 23", "讲一个笑话", "翻译成英文")
  goes to the model unless it names the documents ("summarise the RAG document", "根据文档");
- the best passage must be relevant (`min_relevance`, the relevance `knowledge.retriever` computes), and where the
  embedder read the question, close in meaning as well as in words: `Router`, a logistic regression on the best
  passage's relevance and its dense closeness (`Hit.meaning`), fitted by `python -m chatbot.routing_fit` on the
  bundled knowledge base's document questions against everyday and safety requests (README, "How a message is
  routed"). The relevance alone is the larger of the two, and a request that shares words with a passage ("How
  do I read a CSV file with pandas?" on the bundled documents) reached it on words alone;
- the question's own vocabulary must be the documents' vocabulary: when words the documents never use carry at
  least `max_unknown` of the question's IDF weight ("How many legs does a spider have?"), it is not about them
  unless its best passage is clearly relevant (`TRUSTED_RELEVANCE`) or the knowledge base is too small for its
  vocabulary to mean much (`MIN_VOCABULARY`).
On the evaluation sets (README, "How a message is routed") the thresholds were chosen from the measured
distributions: document questions have at most 0.42 (Chinese) and 0.62 (English) of their weight in unknown
words, everyday requests that reach the relevance threshold 0.38 to 0.85; so the limit is per language
(`MAX_UNKNOWN`): 0.5 for Chinese, 0.65 for English (0.5 for both until 2026-12-07, which sent three English
document questions of 61 to the model).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from common.language import detect_language
from knowledge.lexical import Vocabulary, tokenize, words
from knowledge.retriever import Hit

# The share of a question's IDF weight in unknown words from which it is not about the documents, by the question's
# language (others: the strictest). English paraphrases use words a small corpus lacks ("launch the chatbot",
# "switch to a bigger model": 0.62 and 0.51); the English requests it stops that reach the router score 0.67-0.83.
MAX_UNKNOWN = {"en": 0.65, "zh": 0.5}
# A passage this relevant is trusted whatever other words the question uses: in a small knowledge base most words
# are unknown to it. (On the evaluation sets every everyday request stopped by unknown words scored below 0.5.)
TRUSTED_RELEVANCE = 0.5
# ... and in a knowledge base of a few documents most everyday words are unknown to it, so the vocabulary only
# speaks once it is broad: from this many passages on (the bundled corpus has 168).
MIN_VOCABULARY = 100

_TASK = re.compile(
    r"^\s*(please\s+)?(write|compose|draft|translate|summari[sz]e|paraphrase|rewrite|suggest|recommend|convert|"
    r"calculate|compute|tell me a (joke|story|fun fact)|give me (a|an|one|two|three|some|\d+)\b|make up|"
    r"can you (write|recommend|suggest|translate)|how do you say)\b"
    r"|\b(translate|translation)\b.{0,40}\b(into|to|in)\b|\bjoke\b|\b(haiku|limerick|poem|sonnet)\b"
    r"|\d\s*[-+*/×÷x^]\s*\d|\bsquare root of \d|\b\d+(\.\d+)?\s*%\s*of\b"
    r"|翻译成|译成|笑话|(小|一首)?诗|祝福|名言|起个名|等于多少|[\d零一二三四五六七八九十百千万两]+\s*(乘以|除以|加上|减去)|"
    r"[\d零一二三四五六七八九十百千万两]+的百分之|多少(米|公里|千克|天)",
    re.IGNORECASE)
# A Chinese request that opens with a task verb ("写一首诗", "帮我写封信", "算算还有多少天"): its first word, as jieba
# segments it, is the verb, alone, doubled or with a measure word. Matching characters instead took questions that
# open with 编译器 (compiler), 编辑 (edit) or 写后端接口时 ("when writing a back end") for tasks.
_LEAD_IN_ZH = re.compile(r"^\s*(请|麻烦你?)?(帮我|给我|替我|帮忙)?")
_TASK_VERB_ZH = re.compile(r"^(写|编|起|翻译|讲|推荐|计算|算|总结|概括|改写|润色|起草)(写|编|讲|算)?"
                           r"(个|封|段|篇|份|条|首|句|则|张|一下|一个|一首|一篇|一段|一封|一份|一条|出|成|一|点)?$")
# ... unless that verb opens a clause of time or sequence: "写代码时括号一多…有没有办法…" (when writing code),
# "写完代码以后怎么提交？" (after writing): a question about the moment, not an order to write.
_SUBORDINATE_ZH = {"时", "时候", "以后", "之后", "之前", "完"}
_NAMES_DOCUMENTS = re.compile(r"\b(documents?|docs|knowledge base|according to|in the (file|guide|notes))\b"
                              r"|文档|知识库|资料|根据", re.IGNORECASE)


ROUTER_FILE = Path(__file__).resolve().parent / "heads" / "router.json"  # written by python -m chatbot.routing_fit


@dataclass(frozen=True)
class Router:
    """Whether the best passages are close enough to a question, in meaning and words, for the documents to answer:
    P = sigmoid(meaning × closeness + words × relevance + bias) ≥ threshold (fitted: `chatbot.routing_fit`)."""

    meaning: float
    words: float
    bias: float
    threshold: float

    def probability(self, closeness: float, relevance: float) -> float:
        return 1 / (1 + math.exp(-(self.meaning * closeness + self.words * relevance + self.bias)))

    def answers(self, closeness: float, relevance: float) -> bool:
        return self.probability(closeness, relevance) >= self.threshold

    @classmethod
    def read(cls, path: Path = ROUTER_FILE) -> Router | None:
        """The fitted router, or None where the file is absent (then relevance alone decides, as before)."""
        if not path.exists():
            return None
        fitted = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{name: float(fitted[name]) for name in ("meaning", "words", "bias", "threshold")})

    def write(self, path: Path = ROUTER_FILE, **record) -> None:
        path.write_text(json.dumps(asdict(self) | record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


ROUTER = Router.read()


@dataclass(frozen=True)
class Route:
    kind: str  # "documents" or "chat"
    reason: str = ""  # why not the documents: "task", "irrelevant", "unknown words"


def is_task(question: str) -> bool:
    """A request to do something (write, translate, calculate ...) rather than a question about facts."""
    return (bool(_TASK.search(question)) or _opens_with_task_verb(question)) and not _NAMES_DOCUMENTS.search(question)


def _opens_with_task_verb(question: str) -> bool:
    clause = words(re.split(r"[，,。？?！!；;]", _LEAD_IN_ZH.sub("", question[:40]), maxsplit=1)[0])
    return bool(clause and _TASK_VERB_ZH.match(clause[0])) and not _SUBORDINATE_ZH.intersection(clause[1:4])


def unknown_share(question: str, lexical: Vocabulary) -> float:
    """The share of the question's IDF weight carried by words that no indexed passage contains."""
    terms = set(tokenize(question))
    total = sum(lexical.idf(t) for t in terms)
    if not total:
        return 0.0
    return sum(lexical.idf(t) for t in terms if not lexical.df(t)) / total


def decide(question: str, hits: list[Hit], lexical: Vocabulary, min_relevance: float,
           max_unknown: float | None = None, router: Router | None = ROUTER) -> Route:
    """`hits` are the retrieved passages (for a follow-up, searched with the previous question), in any order:
    `chatbot.grounding.ground` puts passages in the user's language first. `router` (None: relevance alone) judges
    where the embedder read the question."""
    if is_task(question):
        return Route("chat", "task")
    best = max((h.relevance for h in hits), default=0.0)
    if best < min_relevance:
        return Route("chat", "irrelevant")
    closeness = [h.meaning for h in hits if h.meaning is not None]
    if router is not None and closeness and not router.answers(max(closeness), best):
        return Route("chat", "irrelevant")
    if max_unknown is None:
        max_unknown = MAX_UNKNOWN.get(detect_language(question), min(MAX_UNKNOWN.values()))
    if best < TRUSTED_RELEVANCE and lexical.size >= MIN_VOCABULARY and unknown_share(question, lexical) >= max_unknown:
        return Route("chat", "unknown words")
    return Route("documents")
