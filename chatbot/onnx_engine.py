"""The `onnx` backend: the model compiled with onnxruntime-genai, the default on a CPU.

    engine = OnnxEngine.load(None)          # the default model, compiled once into models_dir()/onnx/
    for piece in engine.stream([{"role": "user", "content": "Hi"}]):
        print(piece, end="")

The first load of a model converts it: the transformers checkpoint (a LoRA adapter merged first, a GGUF file
dequantised, as chatbot.models loads them) is saved to a scratch folder and onnxruntime-genai's model builder
writes the ONNX graph at the chosen precision (int8 by default, see README "Serving") into
`models_dir()/onnx/<model>-<precision>-<digest>/`, written beside and renamed, so a crash leaves nothing half
made. Later loads take about a second.

One scheduler thread drives onnxruntime-genai's continuous-batching `og.Engine`: sessions that ask at the same
time are decoded together in one batch (up to the engine's batch size; later ones wait in arrival order), each
reply streams to its own queue, and a session's stop event cancels only its own request.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chatbot.chat_format import Message, render_prompt
from chatbot.engine import GenerationOptions, LoopCheck, Usage, fit
from chatbot.models import (
    DEFAULT_NAME,
    ModelNotFoundError,
    ModelProfile,
    ensure_room,
    load_model,
    model_profile,
    resolve_model,
    weight_bytes,
)
from common.paths import built_beside, models_dir

PRECISIONS = ("int4", "int4-kq", "int8", "fp32")
# What the model builder is told for each precision: int4-kq is int4 with the k-quant algorithm, and the LM head
# and the most quantisation-sensitive layers (llama.cpp's mixed strategy) in int8.
BUILDER_OPTIONS = {"int4": ["-p", "int4"], "int4-kq": ["-p", "int4", "--extra_options", "algo_config=k_quant_mixed"],
                   "int8": ["-p", "int8"], "fp32": ["-p", "fp32"]}
# The fastest precision that loses at most one answer against fp32 in each language on the factual check
# (benchmarks/quality.py, README "Serving"): int8 (English 32/40, fp32 31/40); int4 lost 7 and int4-kq 2.
DEFAULT_PRECISION = "int8"
CONFIG_FILE = "genai_config.json"
_DONE = object()


def cpu_threads() -> int:
    """The cores this process may use (CHATBOT_THREADS overrides)."""
    if os.environ.get("CHATBOT_THREADS"):
        return max(1, int(os.environ["CHATBOT_THREADS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The files of a model or adapter folder that change what is compiled: weights, configs, tokenizer, chat template (not
# a model card, metrics, plots, or chatbot_model.json, which only says how the model is served).
COMPILED_FROM = ("*.safetensors", "*.bin", "*.gguf", "*.model", "*config.json", "tokenizer*.json",
                 "special_tokens_map.json", "*.jinja")


# Files up to this size are identified by their bytes, so a fresh clone or a copy of a shipped adapter finds the model
# compiled before; a larger one (a full checkpoint: hashing 1 GB takes ~3 s at every start) by its size and time.
HASHED_UP_TO = 64 << 20
# A compiled copy of the same model and precision not used for this long is removed when another is compiled: old
# versions of a retrained adapter would otherwise pile up at ~0.3-1 GB each. Not sooner, so that a process that has
# just been handed an older copy can still load it.
STALE_AFTER_S = 600


def _file_identity(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > HASHED_UP_TO:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fingerprint(source: str) -> str:
    """What identifies the weights behind --model: for a folder, the files in it that the compiled model is made
    from (their contents; see HASHED_UP_TO), wherever the folder is; otherwise the resolved source itself."""
    folder = Path(source)
    if not folder.is_dir():
        return hashlib.sha256(source.encode()).hexdigest()[:12]
    parts = [f"{p.relative_to(folder)}:{_file_identity(p)}"
             for p in sorted(folder.rglob("*")) if p.is_file() and any(p.match(g) for g in COMPILED_FROM)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def compiled_folder(spec: str | None, precision: str) -> Path:
    source = resolve_model(spec)
    name = (DEFAULT_NAME if not spec else Path(spec.rstrip("/")).name).replace("+", "-")
    return models_dir() / "onnx" / f"{name}-{precision}-{_fingerprint(source)}"


def _mark_used(target: Path) -> None:
    try:
        os.utime(target / CONFIG_FILE)
    except OSError:  # a read-only models folder: nothing is pruned there either
        pass


def prune_stale(target: Path, now: float | None = None) -> list[Path]:
    """Remove the other compiled copies of `target`'s model and precision (same name, another fingerprint) that
    were last used more than STALE_AFTER_S ago; returns what was removed."""
    stem = target.name.rsplit("-", 1)[0] + "-"
    now = time.time() if now is None else now
    removed = []
    for other in target.parent.glob(stem + "*"):
        config = other / CONFIG_FILE
        if (other == target or not re.fullmatch("[0-9a-f]{12}", other.name[len(stem):]) or not config.is_file()
                or now - config.stat().st_mtime < STALE_AFTER_S):
            continue
        shutil.rmtree(other, ignore_errors=True)
        removed.append(other)
    return removed


def compile_model(spec: str | None, precision: str = DEFAULT_PRECISION) -> Path:
    """The onnxruntime-genai folder for --model `spec` at `precision`, converted on first use (about 20 s for the
    default model on 2 cores)."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    target = compiled_folder(spec, precision)
    if (target / CONFIG_FILE).is_file():
        _mark_used(target)
        return target
    model, tokenizer, name = load_model(spec, device="cpu")
    # The merged float32 checkpoint, the builder's output (as large at fp32) and its cache, at once.
    ensure_room(target.parent, weight_bytes(model) * 5 // 2, f"compile {name} for onnxruntime-genai ({precision})")
    print(f"Compiling {name} for onnxruntime-genai ({precision}) into {target} (once; about 20 s)...",
          file=sys.stderr, flush=True)
    # The merged checkpoint and the builder's cache are scratch; only the builder's output becomes `target`.
    with built_beside(target, CONFIG_FILE) as out, tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        work = Path(scratch)
        model.save_pretrained(work / "merged")
        tokenizer.save_pretrained(work / "merged")
        del model
        command = [sys.executable, "-m", "chatbot.onnx_engine", "-i", str(work / "merged"),
                   "-o", str(out), *BUILDER_OPTIONS[precision], "-e", "cpu", "-c", str(work / "cache")]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not (out / CONFIG_FILE).is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise ModelNotFoundError(f"Could not compile '{name}' for onnxruntime-genai ({precision}): {tail}\n"
                                     "Use --backend transformers to serve it without compiling.")
    prune_stale(target)
    return target


def run_builder() -> None:
    """onnxruntime-genai's model builder (`python -m chatbot.onnx_engine BUILDER-ARGS`), with transformers 5's Gemma 3
    configuration put the way the builder (0.18) reads it: transformers nests the rotary settings per layer type
    (`rope_parameters` = {"full_attention": {...}, "sliding_attention": {...}}), the builder expects one flat
    `rope_parameters` (the global layers') and `rope_local_base_freq` for the sliding-window layers. Editing
    config.json cannot do it (transformers drops the key it does not know), so the loaded config is patched."""
    import runpy

    import transformers

    load = transformers.AutoConfig.from_pretrained

    def flat_rope(*args, **kwargs):
        config = load(*args, **kwargs)
        rope = getattr(config, "rope_parameters", None) or {}
        if "sliding_attention" in rope and "full_attention" in rope:
            config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
            config.rope_parameters = dict(rope["full_attention"])
        return config

    transformers.AutoConfig.from_pretrained = flat_rope
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


class _Decoder:
    """Token ids to text pieces as transformers' TextIteratorStreamer cuts them, so every backend streams the
    same text: a piece waits while its last character is an incomplete UTF-8 sequence, and the ids decoded
    together start again after each new line."""

    def __init__(self, decode):
        self.decode, self.ids, self.shown = decode, [], 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\n"):
            piece, self.ids, self.shown = text[self.shown:], [], 0
            return piece
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[self.shown:], len(text)
        return piece

    def flush(self) -> str:
        piece = self.decode(self.ids)[self.shown:]
        self.ids, self.shown = [], 0
        return piece


@dataclass
class _Request:
    ids: list[int]
    options: GenerationOptions
    stop: threading.Event
    usage: Usage
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    loop: LoopCheck = field(default_factory=LoopCheck)
    handle: object = None  # the og.Request, once admitted
    turn_id: int = 0
    decoder: _Decoder | None = None
    timer: threading.Timer | None = None
    cancelled: bool = False


class OnnxEngine:
    """The `onnx` backend (see the module's docstring). Prompts are rendered with the model's own chat template
    through its transformers tokenizer, exactly as the other backends and fine-tuning render them."""

    def __init__(self, folder: Path, name: str, context_tokens: int = 2048, profile: ModelProfile | None = None,
                 precision: str = ""):
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        self.og, self.folder, self.name = og, folder, name
        self.backend = f"onnx {precision}".strip()
        self.profile = profile or ModelProfile()
        config = og.Config(str(folder))
        # onnxruntime picked one thread on this 2-core machine; with all of them, prefill takes half the time and
        # decoding is 1.4x faster (README, "Serving").
        threads = {"intra_op_num_threads": cpu_threads()}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        self.model = og.Model(config)
        self.og_tokenizer = og.Tokenizer(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        limit = json.loads((folder / CONFIG_FILE).read_text())["model"].get("context_length") or context_tokens
        self.context_tokens = min(context_tokens, limit)  # the model's positions, as the other backends do
        # Gemma 3's sliding-window attention fails in onnxruntime-genai when a request's session is shorter than
        # the window: such requests get the window's length.
        window = json.loads((folder / CONFIG_FILE).read_text())["model"]["decoder"].get("sliding_window") or {}
        self.min_session_tokens = int(window.get("window_size") or 0)
        self.eos_token_ids = {i for i in (self.tokenizer.eos_token_id, *self.og_tokenizer.eos_token_ids)
                              if i is not None}
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer must not be used from two threads at once
        self.waiting: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self.closed = False
        started: queue.SimpleQueue = queue.SimpleQueue()
        # og.Engine may only be used from the thread that created it: the scheduler thread owns it.
        self.thread = threading.Thread(target=self._schedule, args=(started,), name="onnx-engine", daemon=True)
        self.thread.start()
        if isinstance(failure := started.get(), BaseException):
            raise ModelNotFoundError(f"onnxruntime-genai cannot run {folder}: {failure}")
        try:  # one token, so that a model the runtime cannot execute is found out now, not by the first visitor
            for _ in self.stream([{"role": "user", "content": "Hi"}], GenerationOptions(max_new_tokens=1)):
                pass
        except RuntimeError as err:
            self.close()
            raise ModelNotFoundError(f"onnxruntime-genai cannot run {name} ({folder}): {err}") from err

    @classmethod
    def load(cls, model: str | None = None, precision: str = DEFAULT_PRECISION, context_tokens: int = 2048
             ) -> OnnxEngine:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError as err:
            raise ModelNotFoundError("The onnx backend needs onnxruntime-genai: `pip install -r requirements.txt`, "
                                     "or choose --backend transformers.") from err
        folder = compile_model(model, precision)
        name = DEFAULT_NAME if not model else model
        return cls(folder, name, context_tokens, model_profile(name, model), precision)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        with self.tokenizer_lock:
            return len(render_prompt(self.tokenizer, messages))

    def stream(self, messages: Sequence[Message], options: GenerationOptions | None = None,
               stop: threading.Event | None = None, usage: Usage | None = None) -> Iterator[str]:
        """Yield the reply piece by piece; ends at end-of-turn, max_new_tokens, `stop`, the time limit (counted
        from when the request joins the batch) or a loop."""
        options = options or GenerationOptions()
        stop = stop or threading.Event()
        fitted = fit(self, messages, options.max_new_tokens)
        with self.tokenizer_lock:
            ids = render_prompt(self.tokenizer, fitted)
        request = _Request(ids, options, stop, usage if usage is not None else Usage())
        request.usage.prompt_tokens = len(ids)
        self.waiting.put(request)
        try:
            while (item := request.out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # a consumer that leaves early (Stop, a closed connection) cancels its request

    def close(self) -> None:
        """End the scheduler thread once the requests in flight are done (the engine cannot be used after)."""
        self.waiting.put(None)

    # ----- the scheduler thread ----------------------------------------------------------------------------
    def _schedule(self, started: queue.SimpleQueue) -> None:
        try:
            engine = self.og.Engine(self.model)
            self.batch_size = max(1, engine.get_capabilities().configured_max_batch_size)
        except Exception as err:  # noqa: BLE001 (reported by __init__)
            started.put(err)
            return
        started.put(None)
        active: dict[object, _Request] = {}
        events = engine.create_event_buffer(256)
        while not self.closed or active:
            try:
                self._step(engine, events, active)
            except Exception as err:  # noqa: BLE001 (an engine failure ends the requests in flight, not the server)
                for request in active.values():
                    self._finish(request, RuntimeError(f"onnxruntime-genai failed: {err}"))
                active.clear()
                engine = self.og.Engine(self.model)
                events = engine.create_event_buffer(256)

    def _step(self, engine, events, active: dict) -> None:
        """Admit whoever waits (up to the batch size; sleep when idle), cancel stopped requests, decode once."""
        while len(active) < self.batch_size:
            try:
                request = self.waiting.get(block=not active)
            except queue.Empty:
                break
            if request is None:
                self.closed = True
                break
            if request.stop.is_set():
                request.out.put(_DONE)
                continue
            try:
                self._admit(engine, request, active)
            except Exception as err:  # noqa: BLE001 (this request's failure, e.g. a prompt the model cannot take)
                self._finish(request, err)
        for request in active.values():
            if request.stop.is_set() and not request.cancelled:
                request.cancelled = True
                request.handle.cancel_turn(request.turn_id)
        if not engine.has_pending_requests():
            for request in active.values():  # the engine holds nothing more for them: end them, never hang
                self._finish(request, None)
            active.clear()
            return
        for event in engine.run(events):
            request = active.get(event.request)
            if request is not None and self._take(request, event):
                del active[event.request]

    def _admit(self, engine, request: _Request, active: dict) -> None:
        og, options = self.og, request.options
        settings = og.RequestOptions()
        settings.set_max_session_tokens(max(self.min_session_tokens,
                                            len(request.ids) + options.max_new_tokens + 1))
        handle = engine.create_request(options=settings)
        turn = og.TurnOptions(handle)
        turn.set_max_generated_tokens(options.max_new_tokens)
        if options.min_new_tokens:
            turn.set_min_generated_tokens(options.min_new_tokens)
        if options.temperature > 0:
            turn.set_do_sample(True)
            turn.set_temperature(options.temperature)
            turn.set_top_p(options.top_p)
            turn.set_top_k(0)
            turn.set_seed(options.seed)
        else:
            turn.set_do_sample(False)
        request.handle, request.decoder = handle, _Decoder(self._decode)
        request.turn_id = handle.begin_turn(np.asarray(request.ids, dtype=np.int32), turn)
        if options.time_limit:  # counted from here, not while waiting for a place in the batch
            request.timer = threading.Timer(options.time_limit, request.stop.set)
            request.timer.daemon = True
            request.timer.start()
        active[handle] = request

    def _take(self, request: _Request, event) -> bool:
        """Pass one event to its request; True when the request has finished."""
        flags, kinds = int(event.flags), self.og.EngineEventFlags
        if event.token is not None and flags & int(kinds.TOKEN):
            request.usage.completion_tokens += 1
            if event.token not in self.eos_token_ids:
                text = request.decoder.add(event.token)
                if text:
                    request.out.put(text)
            if request.loop.add([event.token]):
                request.stop.set()
        if flags & int(kinds.FAILED):
            self._finish(request, RuntimeError(f"onnxruntime-genai failed to generate ({event.error_code.name}; "
                                               "its log above says why)"))
            return True
        if flags & int(kinds.TURN_FINISHED):
            if event.usage is not None:
                request.usage.completion_tokens = event.usage.generated_tokens
            self._finish(request, None)
            return True
        return False

    def _decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _finish(self, request: _Request, error: BaseException | None) -> None:
        if request.decoder is not None and (rest := request.decoder.flush()):
            request.out.put(rest)
        if request.timer:
            request.timer.cancel()
        if request.handle is not None:
            request.handle.close()
        request.out.put(error if error is not None else _DONE)


if __name__ == "__main__":
    run_builder()
