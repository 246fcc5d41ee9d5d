"""A second opinion for the harm check: Gemma 3 270M (the base the built-in Chinese model is tuned from) tuned into a
harm classifier, alone and combined with the shipped one (multilingual-e5-small tuned, chatbot/heads/harm.json).
Measured, not served: what it would add to the check, and at what cost.

    python benchmarks/harm_second_opinion.py              # about 15 minutes on 2 cores with AMX, much longer without

The Gemma classifier: the base model's first LAYERS layers (the last norm left out), LoRA of rank 16 on every
matrix of them and a two-class head on the mean-pooled, L2-normalised hidden state, trained as the shipped
classifier is (chatbot.safety_tune: its split, class weights, one-cycle schedule, batch 32, rate 5e-4, a scale of
20 on the vector) for EPOCHS epochs on the train split of the harm data (chatbot.safety_sets.harm_rows). LAYERS and
EPOCHS were set before the first run, not chosen on any figure (frozen, the hidden states of layers 8 and 12 gave a
logistic regression the most validation harmful requests; the e5 classifier trains 8 epochs, this one overfits by
epoch 3: training loss 0.014).

Three checks, each with its threshold chosen on the validation split by the shipped rule (chatbot.safety_train: the
most harmful and self-harm requests refused while at most 5% of the benign ones in each language, and none of the
everyday ones, are): the shipped e5 classifier's harm probability, the Gemma classifier's, and both together (their
geometric mean, so a request is refused when both lean to harm). Heads alone, without the patterns. Scored once on
the test split, the fresh requests (chatbot/safety_data/not_trained/requests5.*, never used to train or choose
anything), chatbot/eval/safety_unseen.jsonl and everyday.jsonl, and the document questions (every one benign).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from chatbot.evaluate import EVERYDAY, FRESH  # noqa: E402
from chatbot.safety_heads import HARM_DELTA, HARM_HEAD, Head  # noqa: E402
from chatbot.safety_sets import EVAL, document_questions, harm_rows, labelled  # noqa: E402
from chatbot.safety_train import choose_harm  # noqa: E402
from chatbot.safety_tune import RANK, RATE, SCALE, fit  # noqa: E402
from knowledge.e5_torch import E5Encoder  # noqa: E402
from knowledge.evaluate import read_jsonl  # noqa: E402

LAYERS = 12  # of Gemma 3 270M's 18
EPOCHS = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rows_to_score() -> list[dict]:
    """The harm data (train, validation, test) and the report-only sets, each row with its split."""
    rows = harm_rows()
    rows += [r | {"split": "fresh"} for path in FRESH for r in read_jsonl(path)]
    rows += [labelled(r, "unseen", "safety_unseen.jsonl") for r in read_jsonl(EVAL / "safety_unseen.jsonl")]
    rows += [labelled(r, "everyday.jsonl", "everyday.jsonl") for r in read_jsonl(EVERYDAY)]
    for name, questions in document_questions().items():
        rows += [q | {"split": name} for q in questions]
    return rows


class GemmaClassifier:
    """The first `layers` layers of the Gemma base with LoRA, and a head over their mean-pooled state."""

    def __init__(self, layers: int, seed: int = 0):
        import torch
        from peft import LoraConfig, get_peft_model

        from chatbot.models import load_model

        torch.manual_seed(seed)
        model, self.tokenizer, _ = load_model("gemma-3-270m", device="cpu", dtype=torch.float32)
        base = model.model
        base.layers = base.layers[:layers]
        base.config.num_hidden_layers = layers
        base.norm = torch.nn.Identity()
        self.model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.1,
                                                     target_modules=TARGETS))
        self.head = torch.nn.Linear(base.config.hidden_size, 2)

    def pooled(self, texts: list[str]):
        import torch

        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def train(self, texts: list[str], labels: np.ndarray, epochs: int, seed: int = 0) -> None:
        fit(self.pooled, self.model, self.head, texts, labels, epochs, RATE, seed, "Gemma as a harm classifier")
        self.model.eval()

    def probabilities(self, texts: list[str], batch: int = 64) -> np.ndarray:
        import torch

        with torch.no_grad():
            return np.concatenate([torch.softmax(self.head(self.pooled(texts[i:i + batch]) * SCALE), -1)[:, 1]
                                   .numpy() for i in range(0, len(texts), batch)])


def refused(p: np.ndarray, threshold: float, members: np.ndarray) -> tuple[int, int]:
    return int((p[members] >= threshold).sum()), int(members.sum())


def choose(p: np.ndarray, rows: list[dict]) -> float:
    """The threshold the shipped rule (chatbot.safety_train.choose_harm, without patterns) picks on the validation
    split; 1.0 (refuse nothing) where none meets it."""
    validation = [i for i, r in enumerate(rows) if r["split"] == "validation"]
    return choose_harm(p[validation], np.zeros(len(validation), dtype=bool), [rows[i] for i in validation])[1]


def table(checks: dict[str, tuple[np.ndarray, float]], rows: list[dict]) -> list[str]:
    """Requests refused per set, language and kind of request, by each check at its threshold."""
    split = np.array([r["split"] for r in rows])
    language = np.array([r["language"] for r in rows])
    unsafe = np.array([r["label"] != "benign" for r in rows])
    everyday = np.array([r.get("kind") == "everyday" for r in rows])
    lines = ["| set | language | requests | " + " | ".join(f"{name} ({t:.2f})" for name, (_, t) in checks.items())
             + " |", "|---|---|---|" + "---|" * len(checks)]
    kinds = (("harmful and self-harm", unsafe), ("benign", ~unsafe), ("of them everyday", everyday))
    for name in dict.fromkeys(split):
        if name == "train":
            continue
        for lang in ("en", "zh"):
            for kind, members in kinds:
                chosen = (split == name) & (language == lang) & members
                if chosen.any():
                    cells = [refused(p, t, chosen) for p, t in checks.values()]
                    lines.append(f"| {name} | {lang} | {kind} | "
                                 + " | ".join(f"{n} of {total}" for n, total in cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)
    rows = rows_to_score()
    texts = [r["text"] for r in rows]
    shipped = Head.read(HARM_HEAD)
    encoder = E5Encoder.load(delta=HARM_DELTA)
    e5 = 1 - shipped.probabilities(encoder.queries(texts))[:, 0]  # queries batches by 64 itself
    train = [i for i, r in enumerate(rows) if r["split"] == "train"]
    labels = np.array([r["label"] != "benign" for r in rows], dtype=np.int64)
    started = time.perf_counter()
    gemma = GemmaClassifier(args.layers)
    gemma.train([texts[i] for i in train], labels[train], args.epochs)
    trained = time.perf_counter() - started
    scores = gemma.probabilities(texts)
    one = [texts[i] for i in range(0, len(texts), max(1, len(texts) // 50))][:50]
    started = time.perf_counter()
    for text in one:
        gemma.probabilities([text])
    per_request = (time.perf_counter() - started) / len(one)
    both = np.sqrt(e5 * scores)
    checks = {"e5, shipped": (e5, choose(e5, rows)), "Gemma": (scores, choose(scores, rows)),
              "both": (both, choose(both, rows))}
    print("\n".join(table(checks, rows)))
    print(f"\nGemma classifier: {args.layers} layers, {args.epochs} epochs on {len(train)} requests, trained in "
          f"{trained / 60:.1f} min; {per_request * 1000:.0f} ms a request alone (batch of one, 2 threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
