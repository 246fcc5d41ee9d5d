"""One conversation turn: language → prompt → generation, with timings. The CLI and the web app both use it.

    assistant = Assistant(Engine.load(None), ChatConfig())
    turn = assistant.turn(history, "What is the capital of France?")
    for piece in turn.stream():
        print(piece, end="")
    turn.answer()   # Answer(text=..., sources=[], language="en", timings={...})

`history` holds earlier turns as plain {"role", "content"} messages (what the user saw); the system prompt and
the language instruction are added here, so they never pile up in the history.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from chatbot.chat_format import Message, message_text
from chatbot.config import ChatConfig
from chatbot.engine import Engine, GenerationOptions
from chatbot.language import detect_language
from chatbot.prompts import user_turn


@dataclass
class Answer:
    text: str
    language: str
    sources: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # first_token_s, total_s

    def to_dict(self) -> dict:
        """The JSON shape shared by `python -m chatbot ask --json` and the app's /chat API."""
        return {"answer": self.text, "sources": self.sources, "language": self.language, "timings": self.timings}


def conversation_language(history: Sequence[Message], text: str) -> str:
    """The language of `text`; a message too short to tell keeps the language of the last user message."""
    previous = "en"
    for message in reversed(history):
        if message["role"] == "user":
            previous = detect_language(message_text(message["content"]), default="en")
            break
    return detect_language(text, default=previous)


class Turn:
    """One answer in the making: `stream()` yields its text; afterwards `answer()` has text and timings."""

    def __init__(self, engine: Engine, messages: list[Message], options: GenerationOptions, language: str):
        self.engine, self.messages, self.options, self.language = engine, messages, options, language
        self.stop = threading.Event()
        self.pieces: list[str] = []
        self.timings: dict[str, float] = {}

    def stream(self) -> Iterator[str]:
        start = time.perf_counter()
        for piece in self.engine.stream(self.messages, self.options, stop=self.stop):
            self.timings.setdefault("first_token_s", round(time.perf_counter() - start, 3))
            self.pieces.append(piece)
            yield piece
        self.timings["total_s"] = round(time.perf_counter() - start, 3)

    def answer(self) -> Answer:
        return Answer(text="".join(self.pieces).strip(), language=self.language, timings=dict(self.timings))


class Assistant:
    def __init__(self, engine: Engine, config: ChatConfig):
        self.engine, self.config = engine, config

    @property
    def options(self) -> GenerationOptions:
        c = self.config
        return GenerationOptions(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                 seed=c.seed)

    def turn(self, history: Sequence[Message], question: str) -> Turn:
        question = question.strip()
        if not question:
            raise ValueError("The question is empty.")
        language = conversation_language(history, question)
        messages = [{"role": "system", "content": self.config.system_prompt}]
        messages += [{"role": m["role"], "content": message_text(m["content"])} for m in history
                     if m["role"] in ("user", "assistant")]
        messages.append({"role": "user", "content": user_turn(question, language)})
        return Turn(self.engine, messages, self.options, language)

    def ask(self, question: str, history: Sequence[Message] = ()) -> Answer:
        """The whole answer at once (for scripts and tests)."""
        turn = self.turn(history, question)
        for _ in turn.stream():
            pass
        return turn.answer()
