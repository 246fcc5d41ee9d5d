"""Fine-tune multilingual-e5-small into the harm classifier: LoRA on every matrix of its layers and a softmax head over
its mean-pooled vector, trained together on the labelled requests (chatbot/safety_data/). Run by

    python -m chatbot.safety_train --head harm       # about 15 minutes on 2 CPU cores

which chooses the threshold and veto on the validation split and records the test figures (chatbot.safety_train).
What it writes: chatbot/heads/harm_encoder.safetensors (the low-rank changes, 2.7 MB, merged into the encoder when it
is loaded: knowledge.e5_torch) and the head in chatbot/heads/harm.json.

Why tune the encoder: a linear head on the frozen 4-bit vectors judged topic more than intent (it refused about 60% of
the held-out harmful requests at 5% false refusals); tuned, the same encoder separates "how do I get into my ex's
account" from "how do I get back into my account" (the README's Safety table has the figures).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from chatbot.safety_heads import Head
from knowledge.e5_torch import E5Encoder

EPOCHS = 8  # chosen on the harm validation split: after 3 and 5, fewer harmful requests refused at 5% benign
BATCH = 32
RATE = 5e-4  # one-cycle schedule, 10% warm-up
RANK = 16  # LoRA rank on query, key, value and the dense layers (1.3M of 118M weights trained)
SCALE = 20.0  # the pooled vectors have unit length: the head's logits need a wider range to be sure
TARGETS = ["query", "key", "value", "dense"]


def tune(encoder: E5Encoder, texts: list[str], labels: np.ndarray, classes: tuple[str, ...], epochs: int = EPOCHS,
         rate: float = RATE, seed: int = 0, name: str = "the harm classifier") -> tuple[dict, Head]:
    """Train LoRA and a head on (texts, labels), classes weighted by their inverse frequency; return the low-rank
    changes (for save_delta) and the head. The encoder's model is wrapped in place: load a fresh one to serve."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(encoder.model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.1,
                                                     target_modules=TARGETS))
    encoder.model = model
    head = torch.nn.Linear(model.config.hidden_size, len(classes))
    fit(encoder.pooled, model, head, texts, labels, epochs, rate, seed, name)
    model.eval()
    return low_rank_changes(model), Head(classes, head.weight.detach().numpy() * SCALE, head.bias.detach().numpy(),
                                         0.5, "")


def fit(pooled: Callable, model, head, texts: list[str], labels: np.ndarray, epochs: int, rate: float, seed: int,
        name: str) -> None:
    """Train `model`'s trainable weights (its LoRA) and `head` on `pooled(texts)` × SCALE: cross-entropy, classes
    weighted by their inverse frequency, AdamW on a one-cycle schedule, batches of BATCH; leaves `model` in train
    mode (the caller puts it in eval mode)."""
    import torch
    from tqdm import tqdm

    parameters = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=rate, weight_decay=0.01)
    per_epoch = max(1, len(texts) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=rate, total_steps=epochs * per_epoch,
                                                   pct_start=0.1)
    counts = np.bincount(labels, minlength=head.out_features)
    weights = torch.tensor(len(labels) / (head.out_features * np.maximum(counts, 1)), dtype=torch.float32)
    rng = np.random.default_rng(seed)
    model.train()
    with tqdm(total=epochs * per_epoch, desc=f"tuning {name}", unit="step", file=sys.stderr) as bar:
        for _ in range(epochs):
            order = rng.permutation(len(texts))
            for step in range(per_epoch):
                chosen = order[step * BATCH:(step + 1) * BATCH]
                logits = head(pooled([texts[i] for i in chosen]) * SCALE)
                loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels[chosen]), weight=weights)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()


def low_rank_changes(model) -> dict:
    """module name → (A, B) with B already scaled: W + B @ A is the tuned matrix."""
    changes = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            base = name.removeprefix("base_model.model.")
            changes[base] = (module.lora_A["default"].weight.detach(),
                             module.lora_B["default"].weight.detach() * module.scaling["default"])
    return changes


def save_delta(changes: dict, path: Path) -> None:
    """The changes in half precision (what is shipped is what is measured: the figures are taken after reloading)."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for module, (a, b) in changes.items():
        tensors[module + ".A"] = a.to(torch.float16).contiguous()
        tensors[module + ".B"] = b.to(torch.float16).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"model": "multilingual-e5-small", "rank": str(RANK)})
