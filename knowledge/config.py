"""Settings of a knowledge base: how documents are chunked, embedded and indexed.

`KnowledgeConfig` fields are the CLI flags of `python -m knowledge` one-to-one (through `common.cli`). They all
shape the index, so they are saved with it and reused when it is opened again; settings of a search
(`dense_languages`) belong to `knowledge.retriever.Retriever` instead.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from knowledge.embedder import BACKENDS

# all-MiniLM-L6-v2 (the English half of the default, bilingual) was trained on English: on Chinese queries its
# ranking is close to noise (hit@3 0.35 against BM25's 0.965 on the evaluation set), so only English queries use it
# alone; multilingual-e5-small and bilingual vote in every language. "auto" takes the embedder's own `languages`.
# A setting of the search (`knowledge.retriever.Retriever`), not of the index.
DENSE_LANGUAGES = "auto"


@dataclass
class KnowledgeConfig:
    embedding_model: str | None = field(
        default_factory=lambda: os.environ.get("CHATBOT_EMBEDDING_MODEL"),
        metadata={"help": "sentence-transformers model id or folder, multilingual-e5-small, or "
                          "all-MiniLM-L6-v2 (English only) (default: bilingual, the two embedded ones: MiniLM for "
                          "English, e5 for the rest; an index keeps the one it was built with; "
                          "env CHATBOT_EMBEDDING_MODEL)"})
    embedding_backend: str = field(
        default_factory=lambda: os.environ.get("CHATBOT_EMBEDDING_BACKEND", "auto"),
        metadata={"choices": BACKENDS,
                  "help": "what runs the embedder: auto (openvino on a CPU where it is installed, else torch), torch "
                          "(sentence-transformers), openvino (the same model converted once: the same vectors, "
                          "1.5-1.8x faster on a CPU) or onnx (quantised to int8 for onnxruntime: other vectors, see "
                          "README), saved with the index: an onnx index's queries use onnx too, the others give the "
                          "same vectors and run on this machine's choice (env CHATBOT_EMBEDDING_BACKEND)"})
    # MiniLM's WordPiece window is 256 tokens: 160 of our units (a word or a CJK character) fit in prose, and
    # knowledge.chunking also keeps a chunk of symbol-heavy text or code within it.
    chunk_tokens: int = field(default=160, metadata={"help": "largest chunk, in words / CJK characters"})
    chunk_overlap: int = field(default=30, metadata={"help": "tokens of trailing sentences repeated in the next chunk"})
    # Exact search over 20k 384-d vectors takes a few ms; beyond that HNSW keeps queries fast.
    approximate_after: int = field(default=20000, metadata={"help": "use an HNSW index from this many chunks on"})
    max_file_mb: float = field(default=50.0, metadata={"help": "skip files larger than this"})
    # Chunks found by their best sentence as well as by their average: fused MRR 0.913 -> 0.947 on the bundled
    # questions and higher on every unseen corpus, for about 4x the vectors (README, "Sentence vectors").
    sentence_vectors: bool = field(default=True, metadata={
        "help": "also embed each sentence of a chunk, so that a question matching one sentence finds its chunk "
                "(slower to fill, more memory; the embedded store only)"})

    def __post_init__(self) -> None:
        if self.chunk_tokens < 16:
            raise ValueError(f"chunk_tokens must be at least 16, got {self.chunk_tokens}")
        if not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise ValueError(f"chunk_overlap must be in [0, chunk_tokens), got {self.chunk_overlap}")
        if self.embedding_backend not in BACKENDS:
            raise ValueError(f"embedding_backend must be one of {', '.join(BACKENDS)}, got {self.embedding_backend!r}")
        if self.max_file_mb <= 0:
            raise ValueError(f"max_file_mb must be positive, got {self.max_file_mb}")

    @classmethod
    def saved(cls, values: dict[str, Any]) -> KnowledgeConfig:
        """The settings saved in an index's manifest; keys of settings that no longer shape an index (indexes
        written before `dense_languages` moved to the retriever have it) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})
