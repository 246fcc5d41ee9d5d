"""Settings for fine-tuning and evaluation: `FinetuneConfig` (train) and `EvaluateConfig` (evaluate).

Every field is a CLI flag of the same name (`max_steps` -> `--max-steps`, through `common.cli`); `python -m finetune
train --config FILE.yaml` reads defaults from YAML, whose keys are the field names, and flags given on the command
line win.
Relative paths are relative to the working directory (run from the repository root). The resolved config is
saved as config.yaml in the run folder, so `--config RUN/config.yaml` repeats or resumes a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chatbot.models import ADAPTER_CONFIG, adapter_base
from chatbot.prompts import DEFAULT_SYSTEM_PROMPT
from common.cli import ConfigError

METHODS = ("lora", "full", "qlora")


def _field(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class FinetuneConfig:
    model: str | None = _field(None, "base model: Hugging Face id, local folder or .gguf file "
                                     "(default: the embedded SmolLM2-135M-Instruct)")
    data: str | None = _field(None, "training dialogues, JSONL: chat `messages`, ShareGPT `conversations` or "
                                    "Alpaca `instruction`/`input`/`output` records")
    eval_data: str | None = _field(None, "held-out dialogues (default: split --eval-fraction off --data)")
    eval_fraction: float = _field(0.1, "share of --data held out for evaluation when --eval-data is not given")
    output_dir: str = _field("runs/finetune", "run folder: adapter or model, checkpoints, metrics, eval.jsonl")
    method: str = _field("lora", "lora (peft adapter), full (all weights) or qlora (4-bit base; CUDA + "
                                 "bitsandbytes)", choices=METHODS)
    lora_r: int = _field(16, "LoRA rank")
    lora_alpha: int = _field(32, "LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = _field(0.05, "dropout on the LoRA branch")
    lora_target_modules: list[str] = _field(["all-linear"], "module names LoRA adapts, e.g. q_proj v_proj; "
                                                            "all-linear = every linear layer but the output head")
    init_adapter: str | None = _field(None, "start from this LoRA adapter folder's weights (go on tuning a shipped "
                                            "adapter, e.g. chatbot/adapters/gemma3-270m-bilingual) instead of new "
                                            "ones; its rank and modules replace --lora-r and --lora-target-modules")
    max_length: int = _field(1024, "tokens per training sequence; longer dialogues lose their last turns")
    packing: bool = _field(False, "pack each batch into one padding-free sequence (attention stays within "
                                  "each dialogue)")
    skip_invalid: bool = _field(False, "skip (and count) bad records instead of stopping at them")
    system_prompt: str = _field(DEFAULT_SYSTEM_PROMPT, "system message added to dialogues without one, as the "
                                                       "app adds it when serving ('' adds none)")
    languages: list[str] = _field([], "languages the tuned model writes, for chat and for answers from documents "
                                      "(its chatbot_model.json; e.g. en zh); default: what the base model writes")
    epochs: float = _field(1.0, "passes over the training data")
    max_steps: int = _field(-1, "optimizer steps; overrides --epochs when > 0")
    batch_size: int = _field(1, "dialogues per device per forward pass")
    gradient_accumulation_steps: int = _field(8, "forward passes per optimizer step")
    learning_rate: float = _field(2e-4, "peak learning rate")
    lr_scheduler: str = _field("cosine", "learning-rate schedule (transformers SchedulerType: linear, cosine, "
                                         "constant_with_warmup ...)")
    warmup: float = _field(0.05, "warm-up: a fraction of the steps if < 1, else a number of steps")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    gradient_checkpointing: bool = _field(False, "recompute activations in the backward pass: less memory, "
                                                 "~30%% slower")
    bf16: bool | None = _field(None, "bf16 mixed precision (default: on GPUs that support it; fp32 on CPU)")
    eval_steps: int = _field(10, "evaluate (and checkpoint) every N optimizer steps")
    logging_steps: int = _field(2, "log the training loss every N optimizer steps")
    save_total_limit: int = _field(2, "checkpoints kept on disk (the best one is always among them)")
    early_stopping_patience: int = _field(3, "stop after N evaluations without a better eval loss (0: never)")
    seed: int = _field(0, "seed for the split, shuffling, LoRA initialisation and dropout")
    resume: bool = _field(False, "resume from the latest checkpoint in --output-dir")
    resume_from: str | None = _field(None, "resume from this checkpoint folder")

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("no training data: pass --data FILE.jsonl or set `data:` in the --config file")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.init_adapter:
            if self.method == "full":
                raise ConfigError("--init-adapter starts a LoRA run from an adapter; --method full tunes every weight")
            base = adapter_base(self.init_adapter)
            if base is None:
                raise ConfigError(f"--init-adapter: {self.init_adapter} holds no {ADAPTER_CONFIG}")
            # The adapter's own base unless --model names one: a Gemma adapter on SmolLM2 cannot load.
            self.model = self.model or base
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation_steps", "eval_steps",
                     "logging_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_length < 16:
            raise ConfigError(f"max_length must be at least 16 tokens, got {self.max_length}")
        if self.learning_rate <= 0 or self.epochs <= 0:
            raise ConfigError("learning_rate and epochs must be positive")


@dataclass
class EvaluateConfig:
    model: str | None = _field(None, "the tuned model: run folder, adapter folder or merged model folder")
    data: str | None = _field(None, "held-out dialogues, JSONL (a run's eval.jsonl)")
    base: str | None = _field(None, "model to compare with (default: the adapter's base model, else the "
                                    "embedded SmolLM2-135M-Instruct; 'none' to evaluate --model alone)")
    limit: int | None = _field(None, "evaluate the first N dialogues only")
    max_new_tokens: int = _field(128, "longest generated reply, in tokens (generation is greedy)")
    max_length: int = _field(2048, "longest dialogue scored for perplexity, in tokens (the rest are cut)")
    system_prompt: str = _field(DEFAULT_SYSTEM_PROMPT, "system message added to dialogues without one")
    device: str | None = _field(None, "cpu, cuda ... (default: cuda when available)")
    backend: str = _field("transformers", "backend that generates the replies: transformers, onnx or openai "
                                          "(perplexity always comes from the PyTorch weights; none for openai)")
    precision: str = _field("int4", "weights of the onnx backend: int4, int8 or fp32")
    output: str | None = _field(None, "also write the figures and every generated reply to this JSON file")

    def __post_init__(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("pass --model (the tuned model) and --data (held-out dialogues, JSONL)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
