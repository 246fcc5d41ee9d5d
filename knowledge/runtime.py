"""The runtimes an embedder runs on (`knowledge.embedder` picks one): a sentence-transformers encoder exported once
to ONNX (its matrix products quantised to int8, run with onnxruntime: `OnnxRunner`) or converted for OpenVINO
(`OpenVinoRunner`; `openvino_model` and `infer_all` serve multilingual-e5-small's layers too), both running batches
of similar lengths with mean pooling; `resolved_backend` says which one `auto` means on this machine,
`native_bf16` whether the CPU has bfloat16 instructions. Converted models are kept under models_dir()/embedders/.

Tested through the embedders that run on them, with the real models (slow): tests/test_retriever.py checks the onnx
int8 vectors against torch's and the OpenVINO ones against torch's, and that importing openvino through
`load_openvino` reports nothing to Intel; tests/test_store.py fills indexes with the default (OpenVINO on a CPU)."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from common.paths import built_beside, models_dir


def by_length(tokenizer, texts: list[str], max_length: int) -> tuple[dict, list[int], list[int]]:
    """`texts` tokenized (truncated, not padded), their numbers of tokens, and their order, most tokens first."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    return encoded, lengths, sorted(range(len(texts)), key=lambda i: -lengths[i])


def resolved_backend(backend: str, device: str) -> str:
    """`auto`: OpenVINO on a CPU where it is installed (1.5-1.8x torch's speed here, the same vectors), else torch."""
    if backend != "auto":
        return backend
    if device != "cpu":
        return "torch"
    try:
        load_openvino()
    except ImportError:
        return "torch"
    return "openvino"


def load_openvino():
    """The `openvino` module, imported without its usage reports: importing it sends an event to Intel unless a
    consent file in the home folder says no. With its telemetry package hidden, it falls back to its own no-op
    stub, and nothing is written to the home folder or sent."""
    sys.modules.setdefault("openvino_telemetry", None)  # None: `import openvino_telemetry` raises ImportError
    import openvino

    return openvino


def native_bf16() -> bool:
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class _Runner:
    """What the converted backends share: the tokenizer (under a lock: a fast tokenizer must not be used from two
    threads at once), batches of 8 texts, longest first, so that little padding is computed, and mean pooling."""

    BATCH = 8

    def __init__(self, tokenizer, inputs: list[str], max_length: int, dimension: int):
        self.tokenizer, self.inputs, self.max_length, self.dimension = tokenizer, inputs, max_length, dimension
        self.lock = threading.Lock()

    def batches(self, texts: list[str], progress: bool) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
        """(rows of `texts`, the model's inputs) batch by batch, with a progress bar. Texts are tokenized first and
        batched by their number of tokens, so that padding adds 2-3% to the tokens computed instead of 12-14%
        when batched by characters (the three evaluation corpora)."""
        from tqdm import tqdm

        with self.lock:
            encoded, lengths, order = by_length(self.tokenizer, texts, self.max_length)
        for start in tqdm(range(0, len(texts), self.BATCH), desc="Embedding", unit="batch", disable=not progress):
            rows = order[start:start + self.BATCH]
            width = lengths[rows[0]]
            inputs = {key: np.full((len(rows), width), self.tokenizer.pad_token_id if key == "input_ids" else 0,
                                   np.int64) for key in self.inputs}
            for j, i in enumerate(rows):
                for key in self.inputs:
                    inputs[key][j, :lengths[i]] = encoded[key][i]
            yield rows, inputs

    @staticmethod
    def pooled(hidden: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Mean of the hidden states of the real tokens, L2-normalised."""
        mask = inputs["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


class OnnxRunner(_Runner):
    """A sentence-transformers model with mean pooling, exported once to ONNX with its matrix products quantised to
    int8 (per channel), run with onnxruntime: vectors at cosine 0.99 to torch's (README, "Faster filling")."""

    def __init__(self, path: Path, *args):
        import onnxruntime

        super().__init__(*args)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @classmethod
    def export(cls, model, name: str) -> OnnxRunner:
        path, inputs = _exported(model, name, "onnx int8", "model.onnx", _export)
        return cls(path, model[0].tokenizer, inputs, model.max_seq_length, model.get_embedding_dimension())

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dimension), np.float32)
        for rows, inputs in self.batches(texts, progress):
            vectors[rows] = self.pooled(self.session.run(None, inputs)[0], inputs)
        return vectors


class OpenVinoRunner(_Runner):
    """A sentence-transformers model with mean pooling, converted once for OpenVINO (weights kept float32) and run
    in bfloat16 on a CPU with bfloat16 instructions, else in float32. Its vectors are torch's (cosine 0.9999), and
    it builds 1.5-1.8x faster than torch here (README, "Faster filling"); two batches run at a time."""

    def __init__(self, path: Path, *args, bf16: bool):
        openvino = load_openvino()
        super().__init__(*args)
        self.compiled = openvino.Core().compile_model(str(path), "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "PERFORMANCE_HINT": "THROUGHPUT"})
        self.jobs = self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")

    @classmethod
    def export(cls, model, name: str, bf16: bool) -> OpenVinoRunner:
        path, inputs = _exported(model, name, "openvino", "model.xml", _convert_openvino)
        return cls(path, model[0].tokenizer, inputs, model.max_seq_length, model.get_embedding_dimension(),
                   bf16=bf16)

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dimension), np.float32)
        infer_all(self.compiled, self.jobs, self.batches(texts, progress), len(texts) <= self.BATCH,
                  lambda rows, hidden, inputs: vectors.__setitem__(rows, self.pooled(hidden, inputs)))
        return vectors


def infer_all(compiled, jobs: int, batches: Iterable[tuple[list[int], dict[str, np.ndarray]]], alone: bool,
              done: Callable[[list[int], np.ndarray, dict[str, np.ndarray]], None]) -> None:
    """Run an OpenVINO model on each (rows, inputs) of `batches`, `jobs` of them at a time (`alone`: a query,
    one request with no queue to set up), and give `done(rows, output, inputs)` each output as it comes."""
    if alone:
        for rows, inputs in batches:
            done(rows, compiled.create_infer_request().infer(inputs)[0], inputs)
        return
    queue = load_openvino().AsyncInferQueue(compiled, jobs)
    queue.set_callback(lambda request, job: done(job[0], request.get_output_tensor(0).data, job[1]))
    for rows, inputs in batches:
        queue.start_async(inputs, (rows, inputs))  # waits while every job is busy
    queue.wait_all()


def openvino_model(folder: Path, write_onnx: Callable[[Path], None]) -> None:
    """Save the float32 ONNX model that `write_onnx(path)` writes as OpenVINO's own (folder/model.xml), weights
    float32. (Not with `openvino.convert_model`, which reports usage to Intel unless a consent file in the home
    folder says no.)"""
    openvino = load_openvino()
    write_onnx(folder / "float.onnx")
    openvino.save_model(openvino.Core().read_model(str(folder / "float.onnx")), str(folder / "model.xml"),
                        compress_to_fp16=False)
    (folder / "float.onnx").unlink()


def _exported(model, name: str, variant: str, marker: str, build: Callable[[object, object, list[str], Path], None]
              ) -> tuple[Path, list[str]]:
    """The file `marker` of `model` converted once by `build(transformer, tokenizer, inputs, folder)` into
    models_dir()/embedders/<name>-<variant>/, and the tokenizer outputs the converted model takes."""
    transformer, pooling = model[0], model[1] if len(model) > 1 else None
    if getattr(pooling, "pooling_mode", None) != "mean":  # sentence-transformers 6's Pooling
        raise ValueError(f"the {variant} embedding backend needs a mean-pooling model; {name} is not one")
    tokenizer = transformer.tokenizer
    inputs = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in tokenizer("x")]
    target = models_dir() / "embedders" / re.sub(r"[^A-Za-z0-9.-]+", "-", f"{name}-{variant}")
    path = target / marker
    if not path.is_file():
        print(f"Converting the embedder {name} for {variant} into {target} (once)...", file=sys.stderr, flush=True)
        with built_beside(target, marker) as folder:
            build(transformer.auto_model, tokenizer, inputs, folder)
    return path, inputs


def _export_onnx(model, tokenizer, inputs: list[str], path: Path) -> None:
    """`model`'s last hidden state as a float32 ONNX file (dynamic batch and length)."""
    import torch

    class Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            return self.inner(**dict(zip(inputs, tensors, strict=True))).last_hidden_state

    # Traced with padding in the sample, so that the attention mask is part of the graph.
    sample = tokenizer(["a short example", "another one, a little longer"], padding=True, return_tensors="pt")
    axes = {key: {0: "batch", 1: "length"} for key in [*inputs, "hidden"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(model.eval()), tuple(sample[key] for key in inputs), str(path),
                          input_names=inputs, output_names=["hidden"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)


def _export(model, tokenizer, inputs: list[str], folder: Path) -> None:
    """`model` as ONNX, then int8 per-channel weights for its matrix products (the attention's activation products
    stay float)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _export_onnx(model, tokenizer, inputs, folder / "float.onnx")
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process applies to image models
    try:
        quantize_dynamic(str(folder / "float.onnx"), str(folder / "model.onnx"), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        logging.getLogger().setLevel(quiet)
    (folder / "float.onnx").unlink()


def _convert_openvino(model, tokenizer, inputs: list[str], folder: Path) -> None:
    """`model` as ONNX, read by OpenVINO's runtime and saved as its own model (`openvino_model`)."""
    openvino_model(folder, lambda path: _export_onnx(model, tokenizer, inputs, path))
