"""One conversation turn: language → intent → retrieval → prompt → generation → citations. The CLI and the
web app both drive it.

    assistant = Assistant(load_engine(None), ChatConfig(), retriever)      # retriever=None: plain chat
    turn = assistant.turn(history, "What does LoRA train?")
    for piece in turn.stream():
        print(piece, end="")
    turn.answer()   # Answer(text="... [1]", sources=[{...}], language="en", mode="extractive", timings={...})

How a turn is answered (`Answer.mode`):
- "refused": a harmful request (see chatbot.safety); a fixed reply in the user's language.
- "help": a harmless request for a crisis or support line (the help-lines head, chatbot.safety_heads); the numbers
  written into the app (chatbot.prompts.HELP_LINES), in the user's language.
- "chat": small talk, or any message when there is no knowledge base: the model answers from itself.
- "chat" also when a knowledge base is open but does not cover the question, or the message asks for a task
  (chatbot.routing): the model's own answer after a line that says it is not from the documents.
- "not_covered": the same, with --on-not-covered decline: a fixed reply, nothing invented.
- "grounded": the model answers from the passages; its citations are checked and completed.
- "extractive": the most relevant sentences quoted with citations, when the model cannot write the user's
  language (its ModelProfile), or when a grounded answer turned out to cite nothing.

`history` holds earlier turns as plain {"role", "content"} messages (what the user saw); the system prompt,
passages and language instruction are added here, so they never pile up in the history.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chatbot import safety_heads
from chatbot.chat_format import Message, message_text
from chatbot.config import ChatConfig
from chatbot.engine import Engine, GenerationOptions, Usage
from chatbot.grounding import Grounding, cite, cited_numbers, extractive_answer, ground, term_overlap
from chatbot.intent import classify
from chatbot.prompts import (
    BAD_HISTORY,
    CANNOT_WRITE,
    EMPTY_MESSAGE,
    HELP_LINES,
    NOT_COVERED,
    NOT_FOUND,
    NOT_IN_DOCUMENTS,
    OWN_ANSWER,
    REFUSAL,
    SELF_HARM,
    SMALL_TALK,
    TOO_LONG,
    localized,
    user_turn,
)
from chatbot.routing import decide
from chatbot.safety import SafetyGuard
from common.language import detect_language, language_name
from knowledge.retriever import Retriever


class InputError(ValueError):
    """A request refused before any work is done on it; the message is in the user's language."""


def check_input(history: object, question: object, config: ChatConfig) -> None:
    """Refuse, cheaply and before any segmentation or tokenisation, a message or history that is not what a chat
    request holds, or is longer than the configured bounds."""
    sample = question[:200] if isinstance(question, str) else ""
    language = detect_language(sample) if sample.strip() else "en"
    if not isinstance(question, str) or not question.strip():
        raise InputError(localized(EMPTY_MESSAGE, language))
    if len(question) > config.max_input_chars:
        raise InputError(localized(TOO_LONG, language).format(length=len(question), limit=config.max_input_chars))

    def bad(what: str) -> InputError:
        return InputError(localized(BAD_HISTORY, language).format(what=what))

    if not isinstance(history, list | tuple):
        raise bad(f"got {type(history).__name__}, not a list")
    if len(history) > config.max_history_messages:
        raise bad(f"{len(history)} messages, at most {config.max_history_messages}")
    for number, message in enumerate(history, 1):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
            raise bad(f"message {number} is not a {{role, content}} object with role user or assistant")
        content = message.get("content")
        if not isinstance(content, str | list | dict | type(None)):
            raise bad(f"the content of message {number} is not text")
        if len(message_text(content)) > config.max_input_chars:
            raise bad(f"message {number} is longer than {config.max_input_chars:,} characters")


@dataclass
class Answer:
    text: str
    language: str
    mode: str = "chat"
    sources: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # first_token_s, total_s
    query: str | None = None  # what was searched in the knowledge base
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens: the model's work
    model: str | None = None  # the model that wrote it; None for quotes and fixed replies

    def to_dict(self) -> dict:
        """The JSON shape shared by `python -m chatbot ask --json` and the app's /chat API."""
        return {"answer": self.text, "sources": self.sources, "language": self.language, "mode": self.mode,
                "timings": self.timings, "query": self.query, "usage": self.usage, "answered_by": self.model}


def conversation_language(history: Sequence[Message], text: str) -> str:
    """The language of `text`; a message too short to tell keeps the language of the last user message."""
    previous = "en"
    for message in reversed(history):
        if message["role"] == "user":
            previous = detect_language(message_text(message["content"]), default="en")
            break
    return detect_language(text, default=previous)


class Turn:
    """One answer in the making: `stream()` yields its text; afterwards `answer()` holds the final text
    (citations completed), its sources and timings. `started` is when the turn began (perf_counter), so that
    timings include the language detection and retrieval done before the Turn existed."""

    def __init__(self, language: str, mode: str, produce: Callable[[threading.Event, Usage], Iterator[str]],
                 grounding: Grounding | None = None, finish: Callable[[str], tuple[str, str]] | None = None,
                 messages: list[Message] | None = None, started: float | None = None, model: str | None = None):
        self.language, self.mode, self.grounding = language, mode, grounding
        self.model = model  # the model that writes the answer; None for quotes and fixed replies
        self.messages = messages  # the prompt the model sees (or would see, for quoted and fixed answers)
        self._produce, self._finish = produce, finish
        self.stop = threading.Event()
        self.usage = Usage()  # the model's tokens; 0 for answers it did not write (quotes, fixed replies)
        self.pieces: list[str] = []
        self.started = time.perf_counter() if started is None else started
        self.timings: dict[str, float] = {}
        self._final: tuple[str, str] | None = None

    def stream(self) -> Iterator[str]:
        """The answer's text, piece by piece; timings count from the start of the turn, retrieval included."""
        for piece in self._produce(self.stop, self.usage):
            self.timings.setdefault("first_token_s", round(time.perf_counter() - self.started, 3))
            self.pieces.append(piece)
            yield piece
        self.timings["total_s"] = round(time.perf_counter() - self.started, 3)

    def answer(self) -> Answer:
        if self._final is None:
            text = "".join(self.pieces).strip()
            self._final = self._finish(text) if self._finish else (text, self.mode)
        text, mode = self._final
        # Without passages of its own, an answer written by another instance of this app (the `openai` backend)
        # carries the passages that instance cited, numbered as in its text.
        sources = [] if self.grounding is not None else list(self.usage.sources)
        if self.grounding is not None:
            cited = cited_numbers(text)
            for passage, hit in zip(self.grounding.passages, self.grounding.hits, strict=True):
                if passage.number in cited:
                    sources.append({"number": passage.number, "label": passage.label} | hit.to_dict())
        return Answer(text=text, language=self.language, mode=mode, sources=sources, timings=dict(self.timings),
                      model=self.model if mode in ("chat", "grounded") else None,
                      query=self.grounding.query if self.grounding else None,
                      usage={"prompt_tokens": self.usage.prompt_tokens,
                             "completion_tokens": self.usage.completion_tokens})


def _fixed(text: str) -> Callable[[threading.Event, Usage], Iterator[str]]:
    return lambda stop, usage: iter([text])


class Assistant:
    def __init__(self, engine: Engine, config: ChatConfig, retriever: Retriever | None = None,
                 engines: Mapping[str, Engine] | None = None):
        """`engine` answers every language but those `engines` (language → engine) take (--language-models)."""
        self.engine, self.config, self.retriever = engine, config, retriever
        self.engines = dict(engines or {})
        # The patterns, the learned classifier over multilingual-e5-small (loaded once per process), and a guard
        # model when --safety-model names one.
        learned = safety_heads.load_learned() if config.safety_classifier else None
        self.guard = SafetyGuard(config.safety_model, learned=learned)
        if self.guard.model_error:
            print(f"warning: {self.guard.model_error}", file=sys.stderr)

    @classmethod
    def load(cls, config: ChatConfig) -> Assistant:
        """Load the model and, when `config.index` is set, the knowledge base and its embedder (once)."""
        engine = config.load_engine()
        engines = config.load_language_engines()
        retriever = (Retriever.open(Path(config.index) if config.index else None, config.embedding_model,
                                    config.dense_languages, config.milvus_uri, config.milvus_collection)
                     if config.index or config.milvus_uri else None)
        return cls(engine, config, retriever, engines)

    def engine_for(self, language: str) -> Engine:
        return self.engines.get(language, self.engine)

    @property
    def models(self) -> dict[str, str]:
        """Who answers: "*" → the model for every other language, and language → its own model."""
        return {"*": self.engine.name} | {language: e.name for language, e in self.engines.items()}

    def describe(self) -> str:
        """The models and backends, for people: "`A` (onnx int8); Simplified Chinese (简体中文): `B` (onnx int8)"."""
        parts = [f"`{self.engine.name}` ({self.engine.backend})"]
        parts += [f"{language_name(language)}: `{e.name}` ({e.backend})" for language, e in self.engines.items()]
        return "; ".join(parts)

    def variant(self, **changes) -> Assistant:
        """The same assistant (engine, knowledge base, guard) with some ChatConfig fields changed, for one request
        (an API call's max_tokens, temperature or system prompt); ValueError for a value the config refuses."""
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, **changes)
        return other

    @property
    def options(self) -> GenerationOptions:
        c = self.config
        return GenerationOptions(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                 seed=c.seed, time_limit=c.time_limit)

    def _generate(self, messages: list[Message], engine: Engine) -> Callable[[threading.Event, Usage], Iterator[str]]:
        # No request holds the engine longer than time_limit: the answer so far is kept, generation ends.
        return lambda stop, usage: engine.stream(messages, self.options, stop=stop, usage=usage)

    def _messages(self, history: Sequence[Message], current: str) -> list[Message]:
        messages = [{"role": "system", "content": self.config.system_prompt}]
        messages += [{"role": m["role"], "content": message_text(m["content"])} for m in history
                     if m["role"] in ("user", "assistant")]
        return messages + [{"role": "user", "content": current}]

    def turn(self, history: Sequence[Message], question: str) -> Turn:
        """The answer to `question` after `history`; InputError (in the user's language) for a request that is
        empty, too long or malformed, before any work is done on it."""
        started = time.perf_counter()
        check_input(history, question, self.config)
        question = question.strip()
        language = conversation_language(history, question)
        engine = self.engine_for(language)
        intent = classify(question, self.guard)
        # `plain` is the prompt without passages; fixed replies carry it too, so that a liked answer can become
        # training data in exactly the format the model is served with.
        plain = self._messages(history, user_turn(question, language))
        if intent in ("harmful", "self_harm"):
            reply = localized(REFUSAL if intent == "harmful" else SELF_HARM, language)
            return Turn(language, "refused", _fixed(reply), messages=plain, started=started)
        if intent == "help_lines":  # the numbers written into the app, not the model's guess at them
            return Turn(language, "help", _fixed(localized(HELP_LINES, language)), messages=plain, started=started)
        if intent == "small_talk" or self.retriever is None:
            if not engine.profile.writes(language, grounded=False):
                # The same note on every surface (page, /chat, /v1, CLI), rather than the model's garbled words.
                note = SMALL_TALK if intent == "small_talk" else CANNOT_WRITE
                return Turn(language, "chat", _fixed(localized(note, language)), messages=plain, started=started)
            return Turn(language, "chat", self._generate(plain, engine), messages=plain, started=started,
                        model=engine.name)
        screen = self.guard.learned.instructions if self.guard.learned else None
        grounding = ground(self.retriever, history, question, language, self.config.min_relevance,
                           self.config.passages, screen)
        route = decide(question, grounding.hits, self.retriever.lexical, self.config.min_relevance)
        if route.reason == "irrelevant" and grounding.query != question:
            # A follow-up is searched with the previous question; where that finds nothing close enough ("那怎么保护
            # 我自己的隐私？" after a refused request), the question alone may name its own topic.
            alone = ground(self.retriever, [], question, language, self.config.min_relevance, self.config.passages,
                           screen)
            if (other := decide(question, alone.hits, self.retriever.lexical, self.config.min_relevance)).kind \
                    == "documents":
                grounding, route = alone, other
        if route.kind == "chat" and self.config.on_not_covered == "decline":
            return Turn(language, "not_covered", _fixed(localized(NOT_COVERED, language)), grounding,
                        messages=plain, started=started)
        if route.kind == "chat":
            return self._own_answer(history, question, language, OWN_ANSWER if route.reason == "task" else NOT_FOUND,
                                    started, engine)
        grounding, messages = self._fitting(grounding, history, question, language, engine)

        previous = next((message_text(m["content"]) for m in reversed(history) if m["role"] == "assistant"), "")

        def quotes() -> str:
            scores = [hit.score for hit in grounding.hits]
            return extractive_answer(question, grounding.passages, language, quoted_before=previous,
                                     score=self._sentence_scorer(language, grounding.query),
                                     ranks=[1 + sum(other > own for other in scores) for own in scores])

        if not engine.profile.writes(language, grounded=True):
            return Turn(language, "extractive", _fixed(quotes()), grounding, messages=messages, started=started)

        def finish(text: str) -> tuple[str, str]:
            cited_text, cited = cite(text, grounding.passages)
            # An answer that cites nothing is not grounded in the passages: quote them instead (chosen only
            # then, so that a generated answer's first token does not wait for the sentence embeddings).
            return (cited_text, "grounded") if cited else (quotes(), "extractive")

        return Turn(language, "grounded", self._generate(messages, engine), grounding, finish, messages, started,
                    model=engine.name)

    def _fitting(self, grounding: Grounding, history: Sequence[Message], question: str, language: str,
                 engine: Engine) -> tuple[Grounding, list[Message]]:
        """`grounding` keeping as many of its best passages as fit the engine's context budget beside the system
        prompt and the question (older turns give way first: the engine drops them), and the messages that show
        them. A small context, or long passages, cost the last passages rather than the answer."""
        budget = engine.context_tokens - self.options.max_new_tokens
        while True:
            current = user_turn(question, language, grounding.passages)
            alone = [{"role": "system", "content": self.config.system_prompt}, {"role": "user", "content": current}]
            if len(grounding.passages) <= 1 or engine.count_tokens(alone) <= budget:
                return grounding, self._messages(history, current)
            kept = len(grounding.passages) - 1
            grounding = dataclasses.replace(grounding, passages=grounding.passages[:kept], hits=grounding.hits[:kept])

    def _own_answer(self, history: Sequence[Message], question: str, language: str, label: dict[str, str],
                    started: float, engine: Engine) -> Turn:
        """The model's own answer while a knowledge base is open, after a line saying it is not from the documents.
        In a language the model cannot write (its profile), nothing it wrote would help: the reply says so and how
        to get an answer, rather than show its garbled words or unrelated quotes."""
        messages = self._messages(history, user_turn(question, language))
        head = localized(label, language)
        if not engine.profile.writes(language, grounded=False):
            text = localized(CANNOT_WRITE, language)
            if label is NOT_FOUND:
                text = f"{localized(NOT_IN_DOCUMENTS, language)}\n{text}"
            return Turn(language, "chat", _fixed(text), messages=messages, started=started)
        generate = self._generate(messages, engine)

        def produce(stop: threading.Event, usage: Usage) -> Iterator[str]:
            yield head + "\n\n"
            yield from generate(stop, usage)

        return Turn(language, "chat", produce, messages=messages, started=started, model=engine.name)

    def _sentence_scorer(self, language: str, query: str) -> Callable[[str, list[str]], list[float]]:
        """How well sentences answer a question: IDF-weighted term overlap, plus the embedder's cosine
        similarity in the languages it knows (it finds "trains two small matrices" for "What does LoRA train?").
        For a follow-up, the question itself counts double the searched `query` (which adds the previous
        question): after "什么是LoRA？", "那它的秩怎么选？" is about the rank, not the definition."""
        retriever = self.retriever

        def similarity(text: str, sentences: list[str]) -> list[float]:
            overlap = term_overlap(text, sentences, retriever.lexical.idf)
            if not retriever.uses_dense(language):
                return overlap
            cosines = retriever.embedder.encode(sentences) @ retriever.embedder.queries([text])[0]
            own = detect_language(text)  # the language the embedder read `text` in (BilingualEmbedder's half)
            return [o + retriever.similarity(float(c), own) for o, c in zip(overlap, cosines, strict=True)]

        def score(question: str, sentences: list[str]) -> list[float]:
            own = similarity(question, sentences)
            if query == question:
                return own
            return [o + 0.5 * c for o, c in zip(own, similarity(query, sentences), strict=True)]

        return score

    def ask(self, question: str, history: Sequence[Message] = ()) -> Answer:
        """The whole answer at once (for scripts and tests)."""
        turn = self.turn(history, question)
        for _ in turn.stream():
            pass
        return turn.answer()
