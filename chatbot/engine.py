"""The generation engine: messages in, a stream of text pieces out. It knows nothing about the UI.

`Engine` is the interface the turn pipeline, the app and the CLI use; three backends implement it:

- `transformers` (chatbot.hf_engine): PyTorch `generate`, for GPUs and for parity with training;
- `onnx` (chatbot.onnx_engine): the model compiled once with onnxruntime-genai (int8 by default), the CPU
  default: about 6-9x faster decoding on a small CPU, and several sessions decoded in one batch;
- `openai` (chatbot.openai_engine): any OpenAI-compatible server (vLLM, TGI, llama.cpp's server, Ollama, or
  another instance of this app), through the `openai` client.

    engine = load_engine(None)                        # the default model on the best local backend
    for piece in engine.stream([{"role": "user", "content": "Hi"}]):
        print(piece, end="")

Every backend ends a reply at end-of-turn, `max_new_tokens`, the `stop` event (a Stop button, Ctrl-C), the time
limit, or a loop (`LoopCheck`), and fills in `Usage` when the stream ends.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from chatbot.chat_format import Message
from chatbot.models import ModelProfile

BACKENDS = ("auto", "transformers", "onnx", "openai")
OPENAI_PREFIX = "openai:"


class PromptTooLongError(ValueError):
    """The system prompt plus the current message alone exceed the context budget."""


@dataclass
class Usage:
    """Token counts of one generation, filled in by `Engine.stream` when it ends (as the OpenAI API reports)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated ids, the end-of-turn token included when one was generated
    # Passages the server cited, when the `openai` backend talks to another instance of this app (its `sources`)
    sources: list[dict] = field(default_factory=list)


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    time_limit: float | None = None  # seconds of generation, counted once this request has the engine
    min_new_tokens: int = 0  # benchmarks only: generate at least this many tokens, end-of-turn or not


class Engine(Protocol):
    """What every backend offers. `count_tokens` counts the prompt as the model will see it (a backend without a
    local tokenizer estimates, and says so in its docstring); `context_tokens` is the prompt + reply budget;
    `backend` says what runs the model, for people ("onnx int4", "transformers cpu float32", "openai URL")."""
    name: str
    backend: str
    profile: ModelProfile
    context_tokens: int

    def count_tokens(self, messages: Sequence[Message]) -> int: ...

    def stream(self, messages: Sequence[Message], options: GenerationOptions | None = None,
               stop: threading.Event | None = None, usage: Usage | None = None) -> Iterator[str]: ...


def trim_history(messages: Sequence[Message], count_tokens: Callable[[Sequence[Message]], int],
                 budget: int) -> list[Message]:
    """Drop the oldest turns until the prompt fits `budget` tokens.

    The leading system message and the last message (the current question) always stay; a user message
    goes together with the assistant reply that follows it.
    """
    system = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    rest = list(messages[len(system):])
    while len(rest) > 1 and count_tokens(system + rest) > budget:
        pair = rest[0]["role"] == "user" and len(rest) > 2 and rest[1]["role"] == "assistant"
        rest = rest[2 if pair else 1:]
    used = count_tokens(system + rest)
    if used > budget:
        raise PromptTooLongError(f"The message is too long: the prompt needs {used} tokens but only {budget} "
                                 "fit in the context budget. Shorten it or raise --context-tokens.")
    return system + rest


def fit(engine: Engine, messages: Sequence[Message], max_new_tokens: int) -> list[Message]:
    """`messages` trimmed so that prompt + reply fit the engine's context budget."""
    return trim_history(messages, engine.count_tokens, engine.context_tokens - max_new_tokens)


@contextmanager
def time_limit(options: GenerationOptions, stop: threading.Event) -> Iterator[None]:
    """Sets `stop` after `options.time_limit` seconds; entered when the request gets the engine, so that waiting
    behind other requests does not count."""
    timer = threading.Timer(options.time_limit, stop.set) if options.time_limit else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer:
            timer.cancel()


class FairLock:
    """A lock that is handed to its waiters in the order they asked for it (threading.Lock lets any waiter win,
    so one session could wait behind many that came later)."""

    def __init__(self):
        self._guard = threading.Lock()
        self._waiting: deque[threading.Event] = deque()
        self._held = False

    def __enter__(self) -> FairLock:
        with self._guard:
            if not self._held:
                self._held = True
                return self
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait()  # release() handed the lock to us
        return self

    def __exit__(self, *exc) -> None:
        with self._guard:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._held = False


class LoopCheck:
    """Ends a reply caught in a loop: the last `size` generated tokens already occurred twice before in it,
    without overlapping them.

    Greedy decoding of a small model sometimes repeats one sentence until max_new_tokens ("I'm glad to have you
    as a math tutor. I'm glad to have you as a math tutor. ..."); this saves those seconds. `add` takes the
    tokens generated since the last call and counts the n-grams that have left the tail in a dictionary, so the
    cost per token stays constant however long the reply grows."""

    def __init__(self, size: int = 8):
        self.size = size
        self.generated: list[int] = []
        self.counted = 0  # n-grams counted so far: those starting at 0 .. counted - 1
        self.counts: dict[tuple[int, ...], int] = {}

    def add(self, tokens: Sequence[int]) -> bool:
        """Record newly generated tokens; True when the reply now loops."""
        self.generated += tokens
        generated, size = self.generated, self.size
        # An earlier occurrence must end before the tail starts: n-grams starting at most len - 2 * size.
        while self.counted <= len(generated) - 2 * size:
            gram = tuple(generated[self.counted:self.counted + size])
            self.counts[gram] = self.counts.get(gram, 0) + 1
            self.counted += 1
        if len(generated) < 3 * size:
            return False
        return self.counts.get(tuple(generated[-size:]), 0) >= 2


def pick_backend(backend: str, model: str | None, device: str | None) -> str:
    """`auto`: `openai` for an `openai:` model; `transformers` on a GPU (or a named non-CPU device, or a ZeroGPU
    Space, whose GPU is attached per request), where PyTorch is fast and bf16 works; the compiled `onnx` backend
    on a CPU when onnxruntime-genai is installed."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend != "auto":
        return backend
    if model and model.startswith(OPENAI_PREFIX):
        return "openai"
    if (device and not device.startswith("cpu")) or os.environ.get("SPACES_ZERO_GPU"):
        return "transformers"
    if device is None:
        import torch

        if torch.cuda.is_available():
            return "transformers"
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "transformers"
    return "onnx"


def load_engine(model: str | None = None, backend: str = "auto", device: str | None = None,
                context_tokens: int = 2048, precision: str | None = None, base_url: str | None = None,
                api_key_env: str | None = None) -> Engine:
    """The engine for --model `model` on --backend `backend` (see `pick_backend`). Raises
    chatbot.models.ModelNotFoundError, with what to do, when the model or the server cannot be had."""
    chosen = pick_backend(backend, model, device)
    if chosen == "openai":
        from chatbot.openai_engine import OpenAIEngine

        return OpenAIEngine.connect(model, base_url, api_key_env, context_tokens)
    if chosen == "onnx":
        from chatbot.models import ModelNotFoundError
        from chatbot.onnx_engine import DEFAULT_PRECISION, OnnxEngine

        try:
            return OnnxEngine.load(model, precision or DEFAULT_PRECISION, context_tokens)
        except ModelNotFoundError as err:
            if backend != "auto":
                raise
            # A model the compiler or the runtime cannot take (some architectures, head sizes not a multiple of
            # 16) is still served, by PyTorch.
            print(f"warning: {err}\nServing it with --backend transformers instead.", file=sys.stderr)
    from chatbot.hf_engine import TransformersEngine

    return TransformersEngine.load(model, device, context_tokens)
