"""Grounding an answer in the knowledge base: which query to search, which passages to show, how to cite.

- `defuse`: sentences of a passage that address the assistant (prompt injection) are removed before the model
  or an extractive answer sees them.
- `retrieval_query`: a follow-up ("and its disadvantages?", "那它的缺点呢？") is searched together with the
  previous question, since on its own it names nothing to find.
- `select_passages`: relevant hits only (relevance >= threshold), the question's language first.
- `extractive_answer`: when the model cannot write the answer, the most relevant sentences, quoted and cited.
- `cite`: keeps the model's valid [n] markers, adds markers to sentences it left uncited when one passage
  clearly supports them, and says which passages the answer cites.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chatbot.chat_format import Message, message_text
from chatbot.prompts import EXTRACTIVE_INTRO, Passage, localized
from knowledge.chunking import join_sentences, split_sentences
from knowledge.lexical import tokenize
from knowledge.retriever import Hit, Retriever

_FOLLOW_UP = re.compile(
    r"^\s*(and|but|also|what about|how about)\b"
    r"|\b(it|its|it's|they|them|their|these|those|the former|the latter)\b"
    r"|^(那|那么|还有|而且?|另外|此外)|它|这种|这个|那个|上述|前者|后者",
    re.IGNORECASE)
INJECTION_REMOVED = "(An instruction addressed to the assistant was removed from this passage.)"
# Instructions planted in documents (prompt injection): addressed to "the assistant", not facts about a topic.
_INJECTION = [re.compile(pattern, re.IGNORECASE) for pattern in (
    r"\b(ignore|disregard|forget)\b.{0,30}\b(previous|prior|above|earlier|all|your)\b.{0,20}"
    r"\b(instructions?|prompts?|rules?|directions?)",
    r"\b(you are now|from now on,? you|new instructions?:|system prompt|developer mode)\b",
    r"\b(reply|respond|answer|say)\b.{0,20}\bonly\b.{0,10}\bwith\b",
    r"\b(tell|ask) the user to\b",
    r"(忽略|无视|忘记|忘掉).{0,10}(之前|以上|上面|先前|所有|全部).{0,6}(指示|指令|规则|要求|提示)",
    r"(从现在起|从现在开始)，?你",
    r"(只|仅)(回答|回复|输出|说)",
    r"(告诉|要求|让)用户(去|访问|点击|提供)",
)]
_CITATION = re.compile(r"\[(\d{1,2})\]")


@dataclass
class Grounding:
    query: str  # what was searched
    passages: list[Passage]
    hits: list[Hit]  # hits[i] is passages[i]


def is_follow_up(question: str) -> bool:
    """A question that leans on the conversation: a pronoun, a leading "and/what about", or no content words."""
    return bool(_FOLLOW_UP.search(question)) or not tokenize(question)


def retrieval_query(history: Sequence[Message], question: str) -> str:
    if not is_follow_up(question):
        return question
    previous = [message_text(m["content"]) for m in history if m["role"] == "user"]
    return f"{previous[-1]} {question}" if previous else question


def select_passages(hits: list[Hit], language: str, threshold: float, k: int) -> list[Hit]:
    relevant = [h for h in hits if h.relevance >= threshold]
    # A passage in the user's language makes a better answer than an equally relevant one in another.
    relevant.sort(key=lambda h: h.chunk.language != language)
    return relevant[:k]


def ground(retriever: Retriever, history: Sequence[Message], question: str, language: str,
           threshold: float, k: int) -> Grounding:
    query = retrieval_query(history, question)
    hits = select_passages(retriever.search(query, k=3 * k, language=language), language, threshold, k)
    passages = [Passage(i, h.chunk.label, defuse(h.chunk.text)) for i, h in enumerate(hits, 1)]
    return Grounding(query, passages, hits)


def looks_like_injection(sentence: str) -> bool:
    """Whether a sentence from a document tries to instruct the assistant rather than inform the reader."""
    return any(pattern.search(sentence) for pattern in _INJECTION)


def defuse(text: str) -> str:
    """The passage without sentences that try to instruct the assistant (prompt injection): the model never
    reads them, and an extractive answer can never quote them. The sources panel still shows the original."""
    sentences = split_sentences(text)
    kept = [s for s in sentences if not looks_like_injection(s)]
    if len(kept) == len(sentences):
        return text
    return join_sentences([*kept, INJECTION_REMOVED])


def _support(terms: set[str], passage_terms: set[str]) -> float:
    """Share of a sentence's terms that a passage contains."""
    return len(terms & passage_terms) / len(terms) if terms else 0.0


def extractive_answer(question: str, passages: Sequence[Passage], language: str, sentences: int = 2,
                      score: Callable[[str, list[str]], list[float]] | None = None, min_ratio: float = 0.6) -> str:
    """Up to `sentences` passage sentences that answer the question best, each quoted with its citation; a
    further sentence must rate at least `min_ratio` of the best one, so no off-topic filler is quoted.

    `score(question, sentences)` rates sentences (higher is better); by default, the share of question
    terms each contains."""
    score = score or term_overlap
    candidates = [(passage.number, position, sentence) for passage in passages
                  for position, sentence in enumerate(split_sentences(passage.text)) if sentence != INJECTION_REMOVED]
    ratings = score(question, [sentence for _, _, sentence in candidates]) if candidates else []
    # Ties go to the better passage and then to the earlier sentence, which usually defines the topic.
    ranked = sorted(zip(ratings, candidates, strict=True), key=lambda rc: (-rc[0], rc[1][0], rc[1][1]))
    best = ranked[0][0] if ranked else 0.0
    chosen = [candidate for rating, candidate in ranked[:sentences] if rating >= min_ratio * best]
    chosen.sort(key=lambda c: (c[0], c[1]))
    quote = "「{}」" if language == "zh" else "\"{}\""
    lines = [f"- {quote.format(sentence)} [{number}]" for number, _, sentence in chosen]
    return localized(EXTRACTIVE_INTRO, language) + "\n" + "\n".join(lines)


def term_overlap(question: str, sentences: list[str], weight: Callable[[str], float] = lambda t: 1.0
                 ) -> list[float]:
    """Weighted share of the question's terms found in each sentence."""
    query = set(tokenize(question))
    total = sum(weight(t) for t in query) or 1.0
    return [sum(weight(t) for t in query & set(tokenize(s))) / total for s in sentences]


def cite(answer: str, passages: Sequence[Passage], min_support: float = 0.5) -> tuple[str, list[int]]:
    """(answer with citations, cited passage numbers in order of first citation). Line breaks are kept."""
    numbers = {p.number for p in passages}
    answer = _CITATION.sub(lambda m: m.group(0) if int(m.group(1)) in numbers else "", answer)
    passage_terms = {p.number: set(tokenize(p.text)) for p in passages}  # segmented once, not per sentence
    lines = []
    for line in answer.split("\n"):
        sentences = split_sentences(line)
        lines.append(join_sentences([_cite_sentence(s, passage_terms, min_support) for s in sentences])
                     if sentences else line)
    text = "\n".join(lines).strip()
    return text, cited_numbers(text)


def cited_numbers(text: str) -> list[int]:
    """The passage numbers `text` cites as [n], each once, in order of first citation."""
    cited: list[int] = []
    for match in _CITATION.finditer(text):
        if int(match.group(1)) not in cited:
            cited.append(int(match.group(1)))
    return cited


def _cite_sentence(sentence: str, passage_terms: dict[int, set[str]], min_support: float) -> str:
    if _CITATION.search(sentence) or not passage_terms:
        return sentence
    terms = set(tokenize(sentence))
    best = max(passage_terms, key=lambda number: _support(terms, passage_terms[number]))
    return _add_marker(sentence, best) if _support(terms, passage_terms[best]) >= min_support else sentence


def _add_marker(sentence: str, number: int) -> str:
    """Put [n] before the sentence's final punctuation mark, as people write citations."""
    match = re.search(r"[.!?。！？]+[\"'”’」』)]*$", sentence)
    cut = match.start() if match else len(sentence)
    return f"{sentence[:cut].rstrip()} [{number}]{sentence[cut:]}"
