"""The generation engine: messages in, a stream of text pieces out. It knows nothing about the UI.

    engine = Engine.load(None)                      # the embedded default model
    for piece in engine.stream([{"role": "user", "content": "Hi"}]):
        print(piece, end="")

Generation runs in a worker thread feeding a TextIteratorStreamer; closing the stream early (a stop button,
Ctrl-C) sets an event that a StoppingCriteria checks after every token, so the thread ends promptly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    set_seed,
)

from chatbot.chat_format import Message, render_prompt
from chatbot.models import ModelProfile, load_model, model_profile


class PromptTooLongError(ValueError):
    """The system prompt plus the current message alone exceed the context budget."""


@dataclass
class Usage:
    """Token counts of one generation, filled in by `Engine.stream` when it ends (as the OpenAI API reports)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated ids, the end-of-turn token included when one was generated


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    time_limit: float | None = None  # seconds of generation, counted once this request has the engine


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


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> bool:
        return self.event.is_set()


class StopOnLoop(StoppingCriteria):
    """Ends a reply caught in a loop: the last `size` generated tokens already occurred twice before in it,
    without overlapping them.

    Greedy decoding of a small model sometimes repeats one sentence until max_new_tokens ("I'm glad to have you
    as a math tutor. I'm glad to have you as a math tutor. ..."); this saves those seconds. Each call reads only
    the tokens added since the last one and counts the n-grams that have left the tail in a dictionary, so the
    cost per token stays constant however long the reply grows."""

    def __init__(self, prompt_length: int, size: int = 8):
        self.prompt_length, self.size = prompt_length, size
        self.generated: list[int] = []
        self.counted = 0  # n-grams counted so far: those starting at 0 .. counted - 1
        self.counts: dict[tuple[int, ...], int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> bool:
        self.generated += input_ids[0, self.prompt_length + len(self.generated):].tolist()
        generated, size = self.generated, self.size
        # An earlier occurrence must end before the tail starts: n-grams starting at most len - 2 * size.
        while self.counted <= len(generated) - 2 * size:
            gram = tuple(generated[self.counted:self.counted + size])
            self.counts[gram] = self.counts.get(gram, 0) + 1
            self.counted += 1
        if len(generated) < 3 * size:
            return False
        return self.counts.get(tuple(generated[-size:]), 0) >= 2


class Engine:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "model",
                 context_tokens: int = 2048, profile: ModelProfile | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.profile = profile or ModelProfile()
        limit = getattr(model.config, "max_position_embeddings", None) or context_tokens
        self.context_tokens = min(context_tokens, limit)
        # End of turn: whatever the tokenizer and the generation config call EOS (ChatML's <|im_end|>
        # for SmolLM2); asking them avoids hard-coding any model's special tokens.
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_token_ids = sorted(i for i in eos if i is not None)
        # One generation at a time (a small CPU has no room for two, and a fast tokenizer must not be used from
        # two threads at once); requests that need no generation (refusals, quotes, errors) never wait for it.
        self.lock = threading.Lock()

    @classmethod
    def load(cls, model: str | None = None, device: str | None = None, context_tokens: int = 2048) -> Engine:
        loaded, tokenizer, name = load_model(model, device)
        return cls(loaded, tokenizer, name, context_tokens, model_profile(name, model))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(render_prompt(self.tokenizer, messages))

    def fit(self, messages: Sequence[Message], max_new_tokens: int) -> list[Message]:
        """`messages` trimmed so that prompt + reply fit the context budget."""
        return trim_history(messages, self.count_tokens, self.context_tokens - max_new_tokens)

    def stream(self, messages: Sequence[Message], options: GenerationOptions | None = None,
               stop: threading.Event | None = None, usage: Usage | None = None) -> Iterator[str]:
        """Yield the reply to `messages` piece by piece; ends at end-of-turn, max_new_tokens or `stop`. When the
        stream ends, `usage` (if given) holds the prompt's and the reply's token counts."""
        options = options or GenerationOptions()
        stop = stop or threading.Event()
        with self.lock:
            # The time limit starts when the engine is ours, not while waiting for another request's answer.
            timer = threading.Timer(options.time_limit, stop.set) if options.time_limit else None
            if timer:
                timer.daemon = True
                timer.start()
            try:
                yield from self._stream(messages, options, stop, usage)
            finally:
                if timer:
                    timer.cancel()

    def _stream(self, messages: Sequence[Message], options: GenerationOptions, stop: threading.Event,
                usage: Usage | None) -> Iterator[str]:
        ids = render_prompt(self.tokenizer, self.fit(messages, options.max_new_tokens))
        usage = usage if usage is not None else Usage()
        usage.prompt_tokens = len(ids)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            input_ids=torch.tensor([ids], device=self.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
            max_new_tokens=options.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id or self.eos_token_ids[0],
            stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop), StopOnLoop(len(ids))]),
            streamer=streamer,
        )
        if options.temperature > 0:
            set_seed(options.seed)
            kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        failure: list[BaseException] = []
        thread = threading.Thread(target=self._generate, args=(kwargs, streamer, failure, usage), daemon=True)
        thread.start()
        try:
            for text in streamer:
                if text:
                    yield text
        finally:
            stop.set()
            thread.join()
        if failure:
            raise failure[0]

    def _generate(self, kwargs: dict, streamer: TextIteratorStreamer, failure: list[BaseException],
                  usage: Usage) -> None:
        try:
            with torch.inference_mode():
                output = self.model.generate(**kwargs)
            usage.completion_tokens = output.shape[1] - usage.prompt_tokens
        except BaseException as err:  # surfaced in the consumer's thread by stream()
            failure.append(err)
            streamer.end()
