"""Settings for one chat session: which model, how to generate, how much context to keep.

`ChatConfig` is the single source of truth; `common.cli.add_arguments` turns its fields into CLI flags one-to-one
(used by `python -m chatbot` and `app.py`). Paths and devices may also come from environment variables.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from chatbot.engine import BACKENDS, Engine, load_engine
from chatbot.models import BILINGUAL_NAME
from chatbot.onnx_engine import DEFAULT_PRECISION, PRECISIONS
from chatbot.prompts import DEFAULT_SYSTEM_PROMPT
from knowledge.config import DENSE_LANGUAGES

# With the default model: conversations in Chinese go to the bilingual model fine-tuned here (README, "A bilingual
# model"), which the side-by-side check found better in Chinese and the default better in English.
DEFAULT_LANGUAGE_MODELS = f"zh={BILINGUAL_NAME}"


@dataclass
class ChatConfig:
    model: str | None = field(
        default_factory=lambda: os.environ.get("CHATBOT_MODEL"),
        metadata={"help": "Hugging Face model id, local model folder, .gguf file, or openai:URL/MODEL for a model "
                          "behind an OpenAI-compatible server "
                          "(default: the embedded SmolLM2-135M-Instruct with the shipped sample LoRA adapter; "
                          "SmolLM2-135M-Instruct for the plain model; env CHATBOT_MODEL)"},
    )
    language_models: str = field(default_factory=lambda: os.environ.get("CHATBOT_LANGUAGE_MODELS", "auto"), metadata={
        "help": "models for conversations in given languages, 'LANG=MODEL[,LANG=MODEL]', on the same backend and "
                f"precision; 'auto' (the default): {DEFAULT_LANGUAGE_MODELS} while --model is the default, else "
                "none; 'none': --model answers every language (env CHATBOT_LANGUAGE_MODELS)"})
    backend: str = field(default_factory=lambda: os.environ.get("CHATBOT_BACKEND", "auto"), metadata={
        "choices": BACKENDS,
        "help": "how the model runs: auto (openai for an openai: model, transformers on a GPU, else onnx), "
                "transformers (PyTorch), onnx (compiled with onnxruntime-genai, fastest on a CPU) or openai "
                "(an OpenAI-compatible server; --base-url) (env CHATBOT_BACKEND)"})
    precision: str = field(default=DEFAULT_PRECISION, metadata={
        "choices": PRECISIONS, "help": f"weights of the onnx backend (default {DEFAULT_PRECISION}, see README)"})
    base_url: str | None = field(default_factory=lambda: os.environ.get("CHATBOT_BASE_URL"), metadata={
        "help": "URL of an OpenAI-compatible server for --backend openai, e.g. http://host:8000/v1; --model then "
                "names the served model (or is left out for its first model). Same as --model openai:URL/MODEL "
                "(env CHATBOT_BASE_URL)"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "environment variable holding the key for --backend openai (default OPENAI_API_KEY)"})
    embedding_model: str | None = field(
        default_factory=lambda: os.environ.get("CHATBOT_EMBEDDING_MODEL"),
        metadata={"help": "sentence-transformers model id or folder for retrieval, multilingual-e5-small, or "
                          "all-MiniLM-L6-v2 (English only) (default: bilingual, the two embedded ones: MiniLM for "
                          "English, e5 for the rest; an index keeps the one it was built with; "
                          "env CHATBOT_EMBEDDING_MODEL)"},
    )
    device: str | None = field(
        default_factory=lambda: os.environ.get("CHATBOT_DEVICE"),
        metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda when available; env CHATBOT_DEVICE)"},
    )
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "system prompt"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest reply, in tokens"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy and reproducible; >0 samples"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass, used when temperature > 0"})
    seed: int = field(default=0, metadata={"help": "random seed for sampling"})
    # 2048 rather than SmolLM2's 8192: a long prompt costs seconds of prefill on a 2-core CPU, and a
    # 135M model gains little from distant turns.
    context_tokens: int = field(default=2048, metadata={"help": "token budget for prompt + reply"})

    # 8,000 characters is several pages; a longer message cannot fit the context budget anyway, and refusing it
    # before any tokenisation keeps one visitor from holding the engine (a 100,000-character message took 135 s).
    max_input_chars: int = field(default=8000, metadata={
        "help": "longest message accepted, in characters (also the limit of each message in the history)"})
    max_history_messages: int = field(default=200, metadata={"help": "most earlier messages accepted with a request"})
    time_limit: float = field(default=120.0, metadata={
        "help": "seconds after which an answer is cut off, so that no request holds the engine longer"})

    index: str | None = field(default=None, metadata={
        "help": "knowledge base folder to answer from, with citations (python -m knowledge build ...); "
                "without it the bot chats from the model alone"})
    milvus_uri: str | None = field(default_factory=lambda: os.environ.get("CHATBOT_MILVUS_URI"), metadata={
        "help": "answer from a Milvus knowledge base instead of --index: a path ending in .db (Milvus Lite) or "
                "http://host:19530 (a server); filled from the bundled documents when empty (env CHATBOT_MILVUS_URI)"})
    milvus_collection: str = field(default="knowledge", metadata={"help": "the Milvus collection"})
    passages: int = field(default=3, metadata={"help": "passages placed in the prompt per question"})
    # Chosen with `python -m knowledge evaluate`: at 0.35, 96% of the evaluation questions find a passage and 93%
    # of the out-of-scope ones find none; 0.40 trades answered 92% for declined 97% (README, "Retrieval quality").
    min_relevance: float = field(default=0.35, metadata={
        "help": "0..1; passages below it count as not relevant, and without relevant ones the bot says the "
                "knowledge base does not cover the question"})
    safety_model: str | None = field(default=None, metadata={
        "help": "Hub id or folder of a guard classifier (text-classification, safe/unsafe labels) consulted besides "
                "the built-in bilingual safety patterns (chatbot.safety)"})
    safety_classifier: bool = field(default=True, metadata={
        "help": "judge messages and document sentences with the learned classifiers (multilingual-e5-small, tuned) as "
                "well as the patterns (README, 'Safety'); --no-safety-classifier for the patterns alone"})
    on_not_covered: str = field(default="answer", metadata={
        "choices": ("answer", "decline"),
        "help": "when the documents do not cover a question: 'answer' with the model's own words, labelled as not "
                "from the documents (the default), or 'decline' to answer only from documents"})
    dense_languages: str = field(default=DENSE_LANGUAGES, metadata={
        "help": "comma-separated question languages the embedder handles ('*' = all; default auto: the "
                "embedder's own: all for the default bilingual and multilingual-e5-small, en for all-MiniLM-L6-v2)"})

    def load_engine(self, model: str | None = None) -> Engine:
        return load_engine(model or self.model, self.backend, self.device, self.context_tokens, self.precision,
                           self.base_url, self.api_key_env)

    def routes(self) -> dict[str, str]:
        """Language → the model that answers conversations in it, from --language-models."""
        spec = self.language_models
        if spec == "auto":
            spec = "none" if self.model or self.backend == "openai" else DEFAULT_LANGUAGE_MODELS
        if spec == "none":
            return {}
        pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
        if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
            raise ValueError(f"language_models must be 'LANG=MODEL[,LANG=MODEL]', 'auto' or 'none', got {spec!r}")
        return {language.strip(): model.strip() for language, model in pairs}

    def load_language_engines(self) -> dict[str, Engine]:
        """The engines of --language-models. With 'auto', a model that cannot be had (its packages not installed,
        the Hub out of reach) is left out with a warning: the default model then answers, or says it cannot."""
        from chatbot.models import ModelNotFoundError

        engines = {}
        for language, model in self.routes().items():
            try:
                engines[language] = self.load_engine(model)
            except ModelNotFoundError as err:
                if self.language_models != "auto":
                    raise
                print(f"warning: {err}\nConversations in {language} are answered by the default model.",
                      file=sys.stderr)
        return engines

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_input_chars < 1 or self.max_history_messages < 0 or self.time_limit <= 0:
            raise ValueError("max_input_chars and time_limit must be positive, max_history_messages >= 0")
        if self.on_not_covered not in ("answer", "decline"):
            raise ValueError(f"on_not_covered must be 'answer' or 'decline', got {self.on_not_covered!r}")
        self.routes()  # a malformed --language-models fails here, before any model loads
        if self.passages < 1:
            raise ValueError(f"passages must be at least 1, got {self.passages}")
        if not 0 <= self.min_relevance <= 1:
            raise ValueError(f"min_relevance must be in [0, 1], got {self.min_relevance}")
        if self.context_tokens <= self.max_new_tokens:
            raise ValueError(f"context_tokens ({self.context_tokens}) must exceed max_new_tokens "
                             f"({self.max_new_tokens}) to leave room for the prompt")
