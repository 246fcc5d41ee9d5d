"""Fine-tuning with transformers' Trainer: a LoRA adapter (peft) by default, all weights, or QLoRA on a GPU.

    python -m finetune train --config finetune/configs/sample.yaml                  # the sample recipe, CPU
    python -m finetune train --config finetune/configs/sample.yaml --max-steps 20 --output-dir runs/try
    python -m finetune train --config runs/try/config.yaml --resume                 # continue an interrupted run
    accelerate launch --config_file finetune/configs/accelerate_ddp.yaml -m finetune train --config ...

The run folder (--output-dir) gets: config.yaml (the resolved settings), eval.jsonl (the held-out dialogues, for
`python -m finetune evaluate`), the adapter (adapter_model.safetensors + adapter_config.json, whose
base_model_name_or_path says what to load it onto) or the whole model, chatbot_model.json (the serving profile,
copied from the base model), metrics.json, loss_curve.png, and checkpoint-N/ folders for --resume. With held-out
data, Trainer evaluates every --eval-steps, stops early when the eval loss stops improving, and the saved model
is the best checkpoint. `python -m chatbot ask --model RUN_DIR "..."` chats with the result.

Tested by tests/test_finetune_train.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from chatbot.models import (
    ADAPTER_CONFIG,
    EMBEDDED_NAME,
    PROFILE_FILE,
    ModelNotFoundError,
    ModelProfile,
    load_model,
    model_profile,
    resolve_model,
)
from common.cli import ConfigError, add_arguments, resolve, run, save_yaml
from finetune.config import FinetuneConfig
from finetune.data import (
    IGNORE,
    DataError,
    DataReport,
    check_problems,
    passages_shown,
    read_dialogues,
    split,
    tokenize,
    write_dialogues,
)


class FinetuneTrainer(Trainer):
    """Trainer that also logs the eval perplexity, exp(eval_loss), next to the eval loss."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, start_time)


class ReplyLogitsCollator:
    """Pads a batch like DataCollatorForSeq2Seq, and has the model compute logits only from the position before
    the first token that carries loss (`logits_to_keep`). Most sample dialogues are a long prompt (passages) and
    one short reply; the output layer and softmax over SmolLM2's 49k vocabulary at every prompt position add no
    loss term but cost time: without them a LoRA step on 2 CPU cores takes 11% less (7.5 s -> 6.6 s for four
    370-token dialogues)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)

    def __call__(self, features: list[dict]) -> dict:
        batch = self.pad(features)
        learned = (batch["labels"] != IGNORE).any(dim=0).nonzero()
        if len(learned):
            keep = batch["labels"].shape[1] - int(learned[0]) + 1
            # The model shifts labels by one: the logit at position t is scored against the label at t + 1.
            batch["labels"], batch["logits_to_keep"] = batch["labels"][:, -keep:], keep
        return batch


def make_collator(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, packing: bool):
    if packing:
        return DataCollatorWithFlattening()  # one padding-free row per batch; position ids mark the dialogues
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        return ReplyLogitsCollator(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)


def base_spec(model: str | None) -> str:
    """What to record as an adapter's base: a name `chatbot.models.resolve_model` resolves on any machine."""
    if not model or model == EMBEDDED_NAME:
        return EMBEDDED_NAME
    return str(Path(model).resolve()) if Path(model).exists() else model


def record_base(adapter_config: Path, base: str) -> None:
    """Make adapter_config.json name the base as `--model` does, not as the converted folder on this machine, so
    `--model RUN_DIR` loads on any machine. (Written after saving: while saving, peft looks the name up.)"""
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = base
    adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def use_bf16(config: FinetuneConfig) -> bool:
    supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if config.bf16 and not supported:
        raise ConfigError("--bf16 needs a GPU that supports bf16; without one, training runs in fp32")
    return supported if config.bf16 is None else config.bf16


def load_dialogues(config: FinetuneConfig, report: DataReport) -> tuple[list, list]:
    """(train, eval) dialogues: --eval-data, or a seeded --eval-fraction of --data."""
    dialogues = read_dialogues(config.data, config.system_prompt, report)
    if config.eval_data:
        held_out = read_dialogues(config.eval_data, config.system_prompt, report)
    else:
        dialogues, held_out = split(dialogues, config.eval_fraction, config.seed)
    if not config.skip_invalid:
        check_problems(report, skip_invalid=False)  # fail before spending time on the model
    if not dialogues:
        raise DataError(f"{config.data} holds no usable dialogue")
    report.shared_passages = len(passages_shown(dialogues) & passages_shown(held_out))
    if report.shared_passages:
        print(f"warning: {report.shared_passages} passages appear in both the training and the held-out "
              "dialogues, so the held-out figures partly measure passages the model was trained on; hold out "
              "whole documents (as finetune/data/make_sample.py does) for an honest figure", file=sys.stderr)
    return dialogues, held_out


def load_for_training(config: FinetuneConfig, bf16: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if config.method == "qlora":
        model, tokenizer = load_quantized(config.model)
    else:
        # Weights that train stay fp32 (Trainer autocasts to bf16); a frozen LoRA base can be stored in bf16.
        dtype = torch.bfloat16 if bf16 and config.method == "lora" else torch.float32
        # Trainer places the model; without --model training starts from the plain embedded model.
        model, tokenizer, _ = load_model(config.model or EMBEDDED_NAME, device="cpu", dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.method == "full":
        return model, tokenizer
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    if config.init_adapter:
        return PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True), tokenizer
    targets = config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 renamed; nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, lora), tokenizer


def load_quantized(spec: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model in 4-bit NF4 (QLoRA), on this process's GPU."""
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--method qlora needs a CUDA GPU and the bitsandbytes package (pip install "
                          "bitsandbytes); use --method lora without them")
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    source = resolve_model(spec or EMBEDDED_NAME)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": PartialState().local_process_index})
    return model, AutoTokenizer.from_pretrained(source)


def training_arguments(config: FinetuneConfig, run_dir: Path, bf16: bool, evaluate: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(run_dir), seed=config.seed, data_seed=config.seed, report_to="none",
        num_train_epochs=config.epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup, weight_decay=config.weight_decay,
        bf16=bf16, activation_checkpointing=config.gradient_checkpointing,
        logging_steps=config.logging_steps, logging_first_step=True,
        eval_strategy="steps" if evaluate else "no", eval_steps=config.eval_steps, prediction_loss_only=True,
        save_strategy="steps", save_steps=config.eval_steps, save_total_limit=config.save_total_limit,
        load_best_model_at_end=evaluate, metric_for_best_model="eval_loss", greater_is_better=False,
        remove_unused_columns=False, dataloader_pin_memory=torch.cuda.is_available(),
    )


def resume_target(config: FinetuneConfig, run_dir: Path) -> str | bool | None:
    """What to pass Trainer.train(resume_from_checkpoint=...); refuses to mix a new run into an old one."""
    if config.resume_from:
        if not Path(config.resume_from).is_dir():
            raise ConfigError(f"--resume-from: checkpoint folder {config.resume_from} does not exist")
        return config.resume_from
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    if config.resume:
        if not checkpoints:
            raise ConfigError(f"--resume: {run_dir} holds no checkpoint-N folder to resume from")
        return True
    if checkpoints:
        raise ConfigError(f"{run_dir} already holds checkpoints of an earlier run: pass --resume to continue it, "
                          "or choose another --output-dir")
    return None


def train(config: FinetuneConfig) -> Path:
    """Run the whole recipe; returns the run folder."""
    run_dir = Path(config.output_dir)
    resume = resume_target(config, run_dir)
    bf16 = use_bf16(config)
    set_seed(config.seed)
    report = DataReport()
    train_set, eval_set = load_dialogues(config, report)
    model, tokenizer = load_for_training(config, bf16)
    train_examples = tokenize(train_set, tokenizer, config.max_length, report)
    eval_examples = tokenize(eval_set, tokenizer, config.max_length, report)
    check_problems(report, config.skip_invalid)
    if not train_examples:
        raise DataError(f"no training dialogue fits max_length {config.max_length}; raise --max-length")
    report.tokens = sum(len(e["input_ids"]) for e in train_examples)
    report.loss_tokens = sum(label != IGNORE for e in train_examples for label in e["labels"])
    print(f"data: {len(train_examples)} training and {len(eval_examples)} held-out dialogues; "
          + ", ".join(f"{k} {v}" for k, v in report.counts().items()), flush=True)
    collator = make_collator(model, tokenizer, config.packing)
    callbacks = ([EarlyStoppingCallback(config.early_stopping_patience)]
                 if eval_examples and config.early_stopping_patience else [])
    trainer = FinetuneTrainer(model=model, args=training_arguments(config, run_dir, bf16, bool(eval_examples)),
                              data_collator=collator, train_dataset=train_examples,
                              eval_dataset=eval_examples or None, processing_class=tokenizer, callbacks=callbacks)
    if trainer.is_world_process_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, run_dir / "config.yaml")
        write_dialogues(eval_set, run_dir / "eval.jsonl")
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    trainer.model.config.use_cache = True  # Trainer turns the cache off for training; generation wants it
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        if config.method != "full":
            record_base(run_dir / ADAPTER_CONFIG, base_spec(config.model))
        write_results(trainer, run_dir, config, report, time.perf_counter() - started)
    return run_dir


def write_results(trainer: Trainer, run_dir: Path, config: FinetuneConfig, report: DataReport,
                  seconds: float) -> None:
    """chatbot_model.json (the base's profile), metrics.json and loss_curve.png, and a summary line."""
    profile = model_profile(config.model or EMBEDDED_NAME, config.model)
    if config.languages:
        profile = ModelProfile(chat=tuple(config.languages), grounded=tuple(config.languages))
    (run_dir / PROFILE_FILE).write_text(json.dumps(dataclasses.asdict(profile)) + "\n")
    metrics = collect_metrics(trainer, report, seconds)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    plot_losses(metrics["train_log"], metrics["eval_log"], run_dir / "loss_curve.png")
    what = "the full model" if config.method == "full" else "the LoRA adapter"
    best = (f"; best eval loss {metrics['best_eval_loss']:.4f} (perplexity {metrics['best_eval_perplexity']:.2f})"
            f" at {metrics['best_checkpoint']}" if metrics["best_eval_loss"] is not None else "")
    print(f"saved {what} to {run_dir}: {metrics['steps']} steps in {seconds:.0f} s "
          f"({metrics['seconds_per_step']:.1f} s/step), train loss {metrics['train_loss']:.4f}{best}; "
          f"metrics.json, loss_curve.png", flush=True)


def collect_metrics(trainer: Trainer, report: DataReport, seconds: float) -> dict:
    history = trainer.state.log_history
    train_log = [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate")}
                 for h in history if "loss" in h]
    eval_log = [{"step": h["step"], "eval_loss": h["eval_loss"], "eval_perplexity": h["eval_perplexity"]}
                for h in history if "eval_loss" in h]
    summary = next((h for h in reversed(history) if "train_loss" in h), {})
    best = trainer.state.best_metric
    steps = trainer.state.global_step
    device = trainer.args.device
    on_gpu = device.type == "cuda"
    return {
        "device": f"cuda: {torch.cuda.get_device_name(device)}" if on_gpu else device.type,
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if on_gpu else None,
        "steps": steps, "epochs": trainer.state.epoch, "train_loss": summary.get("train_loss"),
        "best_eval_loss": best, "best_eval_perplexity": math.exp(best) if best is not None else None,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint).name if best is not None else None,
        "train_seconds": round(seconds, 1), "seconds_per_step": round(seconds / max(steps, 1), 2),
        # training tokens seen per second, padding and evaluations included in the time
        "train_tokens_per_second": round(report.tokens * (trainer.state.epoch or 0) / max(seconds, 1e-9), 1),
        "data": report.counts(), "train_log": train_log, "eval_log": eval_log,
    }


def plot_losses(train_log: list[dict], eval_log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_log], [r["loss"] for r in train_log], label="train loss")
    if eval_log:
        ax.plot([r["step"] for r in eval_log], [r["eval_loss"] for r in eval_log], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per assistant token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file of settings (keys are the flag names with underscores)")
    add_arguments(parser, FinetuneConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(lambda: train(resolve(args, FinetuneConfig, args.config)), ConfigError, DataError, ModelNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
