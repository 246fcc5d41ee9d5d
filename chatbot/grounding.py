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
from common.language import HAN
from knowledge.chunking import join_sentences, split_sentences
from knowledge.lexical import tokenize
from knowledge.retriever import Hit, Retriever

Screen = Callable[[list[str]], list[bool]]  # sentences → which address the assistant (a learned injection filter)

_LEADING = re.compile(r"^\s*(and|but|also|what about|how about)\b|^\s*(那|那么|还有|而且?|另外|此外)", re.IGNORECASE)
# "What is dropout and why does it help?" names its subject before the pronoun; "How does it work?" does not.
_NAMES_SUBJECT = re.compile(r"^\s*(what|who|which|how|why|when|where)\s+(is|are|was|were|does|do|did)\s+"
                            r"(?!(it|its|it's|they|them|their|these|those|this|that|the)\b)\w", re.IGNORECASE)
_PRONOUN = re.compile(r"\b(it|its|it's|they|them|their|these|those|the former|the latter)\b"
                      r"|它|这种|这个|那个|上述|前者|后者", re.IGNORECASE)
INJECTION_REMOVED = "(An instruction addressed to the assistant was removed from this passage.)"
# Instructions planted in documents (prompt injection): a sentence that addresses an AI reading the page, or that
# tries to override the assistant's instructions. A sentence that only *quotes* such an instruction to explain it
# ('a line such as "ignore your previous instructions"') is judged without its quotations.
_AI = r"(ai|a\.i\.|assistant|chatbot|bot|language model|llm|gpt|model)s?"
_INJECTION = [re.compile(pattern, re.IGNORECASE) for pattern in (
    rf"\b(note to|attention|dear|to any|hey|if you are an?|when an?|instructions? for)\s+(the\s+)?{_AI}\b",
    rf"\b{_AI}\b[^.]{{0,30}}\b(reading|reads|summari[sz]ing|processing|sees?)\s+this",
    rf"^\W*(system|{_AI})\s*[:,]",
    r"\b(ignore|disregard|forget)\b.{0,30}\b(previous|prior|above|earlier|all|your|everything)\b.{0,20}"
    r"\b(instructions?|prompts?|rules?|directions?|guidelines|told)",
    r"\b(stop|do not|don'?t|never)\s+(following|follow|obey(ing)?)\b.{0,20}\b(rules?|guidelines|instructions?)",
    r"\b(you are now|from now on,? you|new instructions?:|developer mode|jailbreak)",
    r"\b(reveal|print|output|show|repeat)\b.{0,20}\b(system|hidden|secret) prompt",
    r"\b(reply|respond|answer|say)\b.{0,20}\bonly\b.{0,10}\bwith\b",
    r"致[^。]{0,8}(人工智能|ai|助手|机器人|语言模型|模型)",
    r"给(人工智能|ai|助手|机器人|语言模型|模型)[^。]{0,4}的(提示|话|留言|指示|说明|通知)",
    r"(正在阅读|正在读|读到这|看到这|正在处理|正在总结)[^。]{0,12}(人工智能|ai|助手|机器人|语言模型|模型)",
    r"(人工智能|ai|助手|机器人|模型)(请)?(注意|读到)",
    r"^\W*(ai|助手|机器人|模型|系统)[：:，,]",
    r"如果你是[^。]{0,14}(模型|ai|助手|人工智能)",
    r"(忽略|无视|忘记|忘掉)[^。]{0,10}(之前|以上|上面|先前|所有|全部|你的)[^。]{0,8}(指示|指令|规则|要求|提示|准则)",
    r"(从现在起|从现在开始)，?你",
    r"(停止|不要|别)(遵守|遵循|服从)[^。]{0,8}(规则|准则|指示|指令)",
    r"开发者模式|越狱模式",
    r"(输出|泄露|显示|透露)[^。]{0,6}系统提示词",
    r"(告诉|要求|让)用户(去|访问|点击|提供)",
)]
_QUOTED = re.compile(r'"[^"]*"|“[^”]*”|「[^」]*」|『[^』]*』|\'[^\']{8,}\'')
# A sentence that opens with a word pointing back to the one before it: a pronoun or a connective.
_POINTS_BACK = re.compile(r"\W*(这|此|它|该|其|上述|因此|所以|但|不过"
                          r"|(this|it|that|these|those|they|such|so|but|however|therefore)\b)", re.IGNORECASE)
_CITATION = re.compile(r"\[(\d{1,2})\]")
# A "sentence" with nothing to say: punctuation, or a list's number or letter with it ("3.", "(b)", "•", "-").
_NO_CONTENT = re.compile(r"[\W_]*(\d{1,3}|[A-Za-z]|[一二三四五六七八九十]{1,3})?[\W_]*")
# Sentence choice leans to the best-ranked passage (retrieval already weighed it against the others) and a little to
# the sentence that opens a passage, which usually states its topic. Chosen on the key-fact recall of
# `python -m chatbot.evaluate` (en 0.71 -> 0.74, zh 0.56 -> 0.60; the same questions, so an optimistic figure).
PASSAGE_PRIOR = 0.6  # added to a sentence's score divided by its passage's number: 0.6 for [1], 0.3 for [2] ...
LEAD_PRIOR = 0.1  # added to the first sentence of each passage
REPEAT_PENALTY = 0.5  # taken from a sentence the previous answer already quoted


@dataclass
class Grounding:
    query: str  # what was searched
    passages: list[Passage]
    hits: list[Hit]  # hits[i] is passages[i]


def is_follow_up(question: str) -> bool:
    """A question that leans on the conversation: a leading "and / what about / 那", no content words, or a pronoun
    that refers back because the question names nothing before it. "What is dropout and why does it help?" names
    dropout before "it", so it is a new question; "How can I prevent it?" and "它怎么引用来源？" are follow-ups."""
    if _LEADING.search(question) or not tokenize(question):
        return True
    pronoun = _PRONOUN.search(question)
    if not pronoun:
        return False
    if HAN.match(pronoun.group(0)):  # 它 / 这种 ...: a new question names its topic before the pronoun
        return not tokenize(question[:pronoun.start()])
    return not _NAMES_SUBJECT.match(question)


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
           threshold: float, k: int, instructions: Screen | None = None) -> Grounding:
    """The passages for `question`; `instructions` is the learned injection filter, added to the patterns."""
    query = retrieval_query(history, question)
    hits = select_passages(retriever.search(query, k=3 * k, language=language), language, threshold, k)
    passages = [Passage(i, h.chunk.label, defuse(h.chunk.text, instructions)) for i, h in enumerate(hits, 1)]
    return Grounding(query, passages, hits)


def looks_like_injection(sentence: str) -> bool:
    """Whether a sentence from a document tries to instruct the assistant rather than inform the reader. Quoted
    text is left out when the sentence says something of its own around it; a sentence that is all quotation is
    judged whole."""
    own = _QUOTED.sub(" ", sentence)
    judged = own if len(tokenize(own)) >= 3 else sentence
    return any(pattern.search(judged) for pattern in _INJECTION)


def defuse(text: str, instructions: Screen | None = None) -> str:
    """The passage without sentences that try to instruct the assistant (prompt injection): those the patterns
    find, and those `instructions` (the learned filter, chatbot.safety_heads.Learned.instructions) flags. The model
    never reads them, and an extractive answer can never quote them. The sources panel still shows the original."""
    sentences = split_sentences(text)
    learned = instructions(sentences) if instructions is not None else [False] * len(sentences)
    kept = [s for s, flagged in zip(sentences, learned, strict=True) if not flagged and not looks_like_injection(s)]
    if len(kept) == len(sentences):
        return text
    # The note is a paragraph of its own: joined to a sentence that ends without punctuation (a heading, a line of a
    # table) it became part of that sentence, and an extractive answer quoted it in the middle of a Chinese one.
    return "\n\n".join([join_sentences(kept)] * bool(kept) + [INJECTION_REMOVED])


def _support(terms: set[str], passage_terms: set[str]) -> float:
    """Share of a sentence's terms that a passage contains."""
    return len(terms & passage_terms) / len(terms) if terms else 0.0


def extractive_answer(question: str, passages: Sequence[Passage], language: str, sentences: int = 3,
                      score: Callable[[str, list[str]], list[float]] | None = None, min_ratio: float = 0.6,
                      quoted_before: str = "", ranks: Sequence[int] | None = None) -> str:
    """Up to `sentences` passage sentences, each quoted with its citation: the one that answers the question best
    (with the sentence before it when it opens by pointing back to it: "这可以…", "It …"), the sentence after it in
    its passage, and the next best elsewhere if it rates at least `min_ratio` of the best
    (so no off-topic filler is quoted).

    The sentence that matches a question best often only names its topic, and the one after it says the rest: "It
    is fast and deterministic, meaning the same prompt always gives the same output" follows "Greedy decoding always
    picks the single most probable token". Quoting it carried the key fact in 183 of the bundled set's 236 answers
    (118 questions, two embedders) instead of 153 with the two best sentences, and in 178 instead of 164 on the
    corpora the project did not write, none of them fewer (`python benchmarks/corpora.py`, README "Multilingual
    retrieval").

    `score(question, sentences)` rates sentences (higher is better); by default, the share of question
    terms each contains. A sentence already in `quoted_before` (the previous answer) loses REPEAT_PENALTY, so a
    follow-up gets the next best sentence unless the old one is still clearly the answer. `ranks[i]` is the rank of
    passages[i] for the prior that favours the better passage (default: its number); passages the search scored
    the same share a rank, as two that fusion ranked first and second in opposite orders do."""
    score = score or term_overlap
    candidates, read_as, seen = [], [], set()
    for passage in passages:
        previous = ""
        for position, sentence in enumerate(quotable_sentences(passage.text)):
            # Overlapping passages repeat their edges: a sentence is quoted once, from the first passage holding it.
            if sentence not in seen:
                seen.add(sentence)
                candidates.append((passage.number, position, sentence))
                # A sentence that points back ("It terminates the nearest enclosing loop", "它会打印一条错误消息")
                # is about what the one before it names, and is rated with it.
                read_as.append(f"{previous} {sentence}" if previous and _POINTS_BACK.match(sentence) else sentence)
            previous = sentence
    if not candidates:
        return localized(EXTRACTIVE_INTRO, language) + "\n"
    ratings = score(question, read_as)
    rank = {passage.number: passage.number if ranks is None else ranks[i] for i, passage in enumerate(passages)}
    ratings = [r + PASSAGE_PRIOR / rank[number] + (LEAD_PRIOR if position == 0 else 0.0)
               - (REPEAT_PENALTY if quoted_before and sentence in quoted_before else 0.0)
               for r, (number, position, sentence) in zip(ratings, candidates, strict=True)]
    # Ties go to the better passage and then to the earlier sentence, which usually defines the topic.
    ranked = sorted(zip(ratings, candidates, strict=True), key=lambda rc: (-rc[0], rc[1][0], rc[1][1]))
    best_rating, best = ranked[0]
    chosen = [best]
    # A sentence that opens by pointing back ("这可以强制一个用户下次登录时更改密码", "It is also ...") says what it
    # says about the sentence before it, which goes with it.
    preceding = next((c for c in candidates if c[0] == best[0] and c[1] == best[1] - 1), None)
    if preceding and _POINTS_BACK.match(best[2]):
        chosen.append(preceding)
    following = next((c for c in candidates if c[0] == best[0] and c[1] == best[1] + 1), None)
    if following and len(chosen) < sentences:
        chosen.append(following)
    # The runner-up: the best sentence not quoted already (the one after the best often rates second).
    rating, runner_up = next((rc for rc in ranked[1:] if rc[1] not in chosen), (0.0, None))
    if runner_up and rating >= min_ratio * best_rating and len(chosen) < sentences:
        chosen.append(runner_up)
    chosen.sort(key=lambda c: (c[0], c[1]))
    quote = "「{}」" if language == "zh" else "\"{}\""
    lines = [f"- {quote.format(sentence)} [{number}]" for number, _, sentence in chosen]
    return localized(EXTRACTIVE_INTRO, language) + "\n" + "\n".join(lines)


def quotable_sentences(text: str) -> list[str]:
    """The sentences of a passage that an answer may quote. A list's number or letter that the splitter cut off
    ("3." before "按 n 键…", a lone "." or "-") says nothing by itself and was quoted as a sentence of its own
    ("「3.」 [1]"); it goes back in front of the sentence it numbers, or is left out at the end of a passage. The
    note that replaced a removed instruction is not quoted."""
    sentences, pending = [], ""
    for sentence in split_sentences(text):
        if sentence == INJECTION_REMOVED:
            continue
        if _NO_CONTENT.fullmatch(sentence):
            pending = f"{pending} {sentence}".strip()
            continue
        sentences.append(f"{pending} {sentence}" if pending else sentence)
        pending = ""
    return sentences


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
