"""Export a fine-tuning run: the adapter alone (small, for shipping) or a merged standalone model.

    python -m finetune export runs/sample --output chatbot/adapters/smollm2-135m-sample    # adapter, a few MB
    python -m finetune export runs/sample --merge --output runs/sample-merged                # base + adapter

Either folder works as `--model DIR` in the chat. Without --merge, the adapter files are copied with the run's
serving profile (chatbot_model.json), config.yaml, metrics.json, loss_curve.png and held-out eval.jsonl, but
no checkpoints or optimizer states. With --merge, the adapter is folded into its base model's weights and the
result is written as an ordinary model folder (safetensors + tokenizer + chat template) that loads without peft.

Tested by tests/test_finetune_train.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from chatbot.models import ADAPTER_CONFIG, PROFILE_FILE, ModelNotFoundError, adapter_base, load_model
from common.cli import run

RUN_FILES = (PROFILE_FILE, "config.yaml", "metrics.json", "loss_curve.png", "eval.jsonl")
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors")


class ExportError(ValueError):
    """The run folder cannot be exported as asked; one line."""


def export(run_dir: str, output: str, merge: bool) -> Path:
    source, target = Path(run_dir), Path(output)
    if not source.is_dir():
        raise ExportError(f"run folder {run_dir} does not exist")
    if target.resolve() == source.resolve():
        raise ExportError("--output must differ from the run folder")
    if merge:
        # fp32 on the CPU: merging is exact there, and the folder loads on any device afterwards.
        model, tokenizer, _ = load_model(str(source), device="cpu", dtype=torch.float32)
        target.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    else:
        if adapter_base(str(source)) is None:
            raise ExportError(f"{run_dir} holds no LoRA adapter ({ADAPTER_CONFIG}); a full fine-tuning run is "
                              "already a standalone model folder")
        target.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            shutil.copy2(source / name, target / name)
    for name in RUN_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    print(f"exported {'the merged model' if merge else 'the adapter'} of {run_dir} to {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="the run folder (--output-dir of the training), or any adapter folder")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into its base model")
    args = parser.parse_args(argv)
    return run(lambda: export(args.run_dir, args.output, args.merge), ExportError, ModelNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
