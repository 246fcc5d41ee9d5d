"""The `openai` backend: a model served elsewhere behind an OpenAI-compatible API (vLLM, TGI, llama.cpp's server,
Ollama, or another instance of this app), called with the `openai` client.

    python app.py --model openai:http://gpu-box:8000/v1/Qwen/Qwen2.5-7B-Instruct
    python app.py --backend openai --base-url http://gpu-box:8000/v1 --model Qwen/Qwen2.5-7B-Instruct \\
        --api-key-env VLLM_API_KEY

The key is read from the environment variable --api-key-env names (OPENAI_API_KEY by default), never from a flag.
There is no local tokenizer: history trimming counts an estimate (`estimate_tokens`), and `Usage` holds the
server's own counts when it reports them (`stream_options.include_usage`).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Sequence

from chatbot.chat_format import Message, message_text
from chatbot.engine import OPENAI_PREFIX, GenerationOptions, Usage, fit, time_limit
from chatbot.models import ModelNotFoundError, ModelProfile, model_profile
from common.language import HAN


def estimate_tokens(messages: Sequence[Message]) -> int:
    """An upper-leaning estimate for a server whose tokenizer is not here: one token per Han character (BPE
    vocabularies of Chinese-capable models average a little under one), one per 3 other characters (English
    averages about 4), and 4 per message for the chat template's markers."""
    total = 0
    for message in messages:
        text = message_text(message["content"])
        han = len(HAN.findall(text))
        total += 4 + han + math.ceil((len(text) - han) / 3)
    return total


def split_model(model: str | None, base_url: str | None) -> tuple[str, str | None]:
    """(base URL, model name or None) from `--model openai:URL[/MODEL]` or from --base-url and --model. The model
    part is what follows the URL's `/v1` (model names may contain slashes)."""
    if model and model.startswith(OPENAI_PREFIX):
        url = model[len(OPENAI_PREFIX):]
        head, marker, tail = url.partition("/v1/")
        if marker:
            return head + "/v1", tail.strip("/") or None
        return url.rstrip("/"), None
    if not base_url:
        raise ModelNotFoundError("--backend openai needs a server: --base-url http://host:8000/v1 (or --model "
                                 "openai:http://host:8000/v1/MODEL).")
    return base_url.rstrip("/"), model


class OpenAIEngine:
    """The `openai` backend. Requests go straight to the server, which batches them as it does; this side keeps no
    lock, so several sessions are served at once."""

    def __init__(self, client, model: str, context_tokens: int = 2048, profile: ModelProfile | None = None):
        self.client, self.model = client, model
        self.name = model
        self.backend = f"openai {client.base_url}"
        self.profile = profile or ModelProfile()
        self.context_tokens = context_tokens

    @classmethod
    def connect(cls, model: str | None, base_url: str | None = None, api_key_env: str | None = None,
                context_tokens: int = 2048) -> OpenAIEngine:
        """Connect and check that the server answers and serves the model (its first model when none is named)."""
        import openai

        url, name = split_model(model, base_url)
        key = os.environ.get(api_key_env or "OPENAI_API_KEY") or "none"  # local servers often need no key
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=1, timeout=60)
        try:
            served = [entry.id for entry in client.models.list()]
        except openai.APIError as err:
            raise ModelNotFoundError(f"The OpenAI-compatible server at {url} did not answer /models ({err}). Start "
                                     "it, or check --base-url and the key in --api-key-env.") from err
        if name is None:
            if not served:
                raise ModelNotFoundError(f"The server at {url} serves no model.")
            name = served[0]
        elif served and name not in served:
            raise ModelNotFoundError(f"The server at {url} does not serve '{name}'; it serves: {', '.join(served)}.")
        return cls(client, name, context_tokens, model_profile(name))

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return estimate_tokens(messages)

    def stream(self, messages: Sequence[Message], options: GenerationOptions | None = None,
               stop: threading.Event | None = None, usage: Usage | None = None) -> Iterator[str]:
        options = options or GenerationOptions()
        stop = stop or threading.Event()
        usage = usage if usage is not None else Usage()
        fitted = fit(self, messages, options.max_new_tokens)
        usage.prompt_tokens = estimate_tokens(fitted)
        extra = {"min_tokens": options.min_new_tokens} if options.min_new_tokens else None  # vLLM's extension
        sampling = ({"temperature": options.temperature, "top_p": options.top_p} if options.temperature > 0
                    else {"temperature": 0.0})
        response = self.client.chat.completions.create(
            model=self.model, messages=[{"role": m["role"], "content": message_text(m["content"])} for m in fitted],
            max_tokens=options.max_new_tokens, seed=options.seed, stream=True,
            stream_options={"include_usage": True}, extra_body=extra, **sampling)
        pieces, reported = 0, False
        with time_limit(options, stop):
            try:
                for chunk in response:
                    if chunk.usage is not None:
                        reported = True
                        usage.prompt_tokens = chunk.usage.prompt_tokens
                        usage.completion_tokens = chunk.usage.completion_tokens
                    fields = chunk.model_extra or {}
                    if isinstance(fields.get("sources"), list):  # another instance of this app cites its documents
                        usage.sources = fields["sources"]
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            pieces += 1
                            yield choice.delta.content
                    if stop.is_set():
                        break
            finally:
                response.close()  # the server sees the connection close and stops generating
        if not reported:
            usage.completion_tokens = pieces  # a server that reports no usage: about a token a piece
