"""The `transformers` backend: PyTorch `generate`, for GPUs and for parity with training.

    engine = TransformersEngine.load(None)          # the embedded default model
    for piece in engine.stream([{"role": "user", "content": "Hi"}]):
        print(piece, end="")

Generation runs in a worker thread feeding a TextIteratorStreamer; closing the stream early (a stop button,
Ctrl-C) sets an event that a StoppingCriteria checks after every token, so the thread ends promptly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

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
from chatbot.engine import FairLock, GenerationOptions, LoopCheck, Usage, fit, time_limit
from chatbot.models import ModelProfile, load_model, model_profile


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> bool:
        return self.event.is_set()


class StopOnLoop(StoppingCriteria):
    """`LoopCheck` as a StoppingCriteria: reads the ids added since the last call, after the prompt."""

    def __init__(self, prompt_length: int, size: int = 8):
        self.prompt_length, self.check = prompt_length, LoopCheck(size)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> bool:
        return self.check.add(input_ids[0, self.prompt_length + len(self.check.generated):].tolist())


class TransformersEngine:
    """The `transformers` backend: the model in PyTorch, `generate` in a worker thread."""

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
        # One generation at a time, in arrival order (a small CPU has no room for two, and a fast tokenizer must not
        # be used from two threads at once); requests that need no generation (refusals, quotes) never wait for it.
        self.lock = FairLock()
        self.backend = f"transformers {model.device.type} {str(model.dtype).removeprefix('torch.')}"

    @classmethod
    def load(cls, model: str | None = None, device: str | None = None, context_tokens: int = 2048
             ) -> TransformersEngine:
        loaded, tokenizer, name = load_model(model, device)
        return cls(loaded, tokenizer, name, context_tokens, model_profile(name, model))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(render_prompt(self.tokenizer, messages))

    def fit(self, messages: Sequence[Message], max_new_tokens: int) -> list[Message]:
        return fit(self, messages, max_new_tokens)

    def stream(self, messages: Sequence[Message], options: GenerationOptions | None = None,
               stop: threading.Event | None = None, usage: Usage | None = None) -> Iterator[str]:
        """Yield the reply to `messages` piece by piece; ends at end-of-turn, max_new_tokens or `stop`. When the
        stream ends, `usage` (if given) holds the prompt's and the reply's token counts."""
        options = options or GenerationOptions()
        stop = stop or threading.Event()
        with self.lock, time_limit(options, stop):
            yield from self._stream(messages, options, stop, usage)

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
            min_new_tokens=options.min_new_tokens or None,
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
