"""The labelled safety data as the training commands read it (chatbot.safety_train, chatbot.injection_train,
chatbot.help_lines_train): every set split by intent into train, validation and test by a hash of the intent,
so no paraphrase of a test item is trained on; the tallies the figures are made of; and the logistic head that
the recheck and the help-lines head are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from chatbot.safety_heads import Head
from knowledge.evaluate import read_jsonl

HERE = Path(__file__).resolve().parent
DATA = HERE / "safety_data"
EVAL = HERE / "eval"
SHARES = (0.70, 0.85)  # train below the first, validation below the second, test above
THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.01), 2)


def split_of(intent: str, members: list[str]) -> str:
    """train, validation or test for `intent`, whose group (same language and kind) has these intents."""
    order = sorted(members, key=lambda name: hashlib.sha1(name.encode()).hexdigest())
    position = order.index(intent) / len(order)
    return "train" if position < SHARES[0] else "validation" if position < SHARES[1] else "test"


def assign_splits(rows: list[dict], kind: str, per_language: bool = True) -> None:
    """Set row["split"] by intent, within each (language, `kind` value, batch) group. Rows written later carry
    their "batch" number and are split among themselves, so adding them moves no earlier intent to another split.
    Where both languages name some intents alike (the same request written in each), `per_language=False` splits
    the names of both languages together, so an intent is in the same split in both: a multilingual encoder reads a
    translation as a paraphrase."""
    def group(row: dict) -> tuple:
        return row["language"] if per_language else None, row[kind], row.get("batch")

    groups: dict[tuple, set[str]] = {}
    for row in rows:
        groups.setdefault(group(row), set()).add(row["intent"])
    members = {key: sorted(intents) for key, intents in groups.items()}
    for row in rows:
        row["split"] = split_of(row["intent"], members[group(row)])


def rates(flags: np.ndarray, rows: list[dict]) -> dict:
    """How many of `rows` are flagged, per language and overall."""
    table = {}
    for language in ("en", "zh", "all"):
        chosen = [bool(f) for f, r in zip(flags, rows, strict=True) if language in ("all", r["language"])]
        table[language] = {"n": len(chosen), "flagged": sum(chosen), "rate": round(sum(chosen) / max(len(chosen), 1),
                                                                                   4)}
    return table


def by_layer(layers: dict[str, np.ndarray], rows: list[dict], chosen: list[int]) -> dict:
    return {name: rates(flags[chosen], [rows[i] for i in chosen]) for name, flags in layers.items()}


def parts(rows: list[dict]) -> dict[str, list[int]]:
    return {name: [i for i, r in enumerate(rows) if r["split"] == name] for name in ("train", "validation", "test")}


def harm_rows() -> list[dict]:
    rows = [row for path in sorted(DATA.glob("requests*.jsonl")) for row in read_jsonl(path)]
    assign_splits(rows, "kind")
    rows += [labelled(row, "train", name) for name in ("safety.jsonl", "safety_probe.jsonl")  # the patterns were
             for row in read_jsonl(EVAL / name)]                                              # tuned on these
    return rows


def document_questions() -> dict[str, list[dict]]:
    """The retrieval questions, every one benign (a user asking about their documents): the bundled set's, and those
    of the corpora the project did not write, which nothing is tuned on (knowledge.eval.external). Report only."""
    from knowledge.eval import external
    from knowledge.evaluate import QUESTIONS

    sets = {"bundled document questions": [QUESTIONS],
            "unseen corpora's document questions": [external.PYDOC_QUESTIONS, external.RUST_ZH_QUESTIONS,
                                                    external.MAN_ZH_QUESTIONS, external.CARGO_QUESTIONS,
                                                    external.VIM_ZH_QUESTIONS]}
    return {name: [{"text": q["question"], "language": q["language"], "label": "benign", "kind": "technical",
                    "intent": path.name, "split": "report"} for path in paths for q in read_jsonl(path)]
            for name, paths in sets.items()}


def labelled(row: dict, split: str, source: str) -> dict:
    """A row of the older sets (text, language, harmful, category) in the shape of the new ones."""
    label = "self_harm" if row.get("category") == "self_harm" else "harmful" if row.get("harmful") else "benign"
    return {"text": row["text"], "language": row["language"], "label": label, "split": split, "intent": source,
            "kind": "everyday" if source == "everyday.jsonl" else "lookalike" if label == "benign" else label}


def fit_logistic(vectors: np.ndarray, labels: np.ndarray, name: str, c: float,
                 classes: tuple[str, str] = ("ordinary", "instruction")) -> Head:
    """A logistic regression on an encoder's vectors, as a two-class head (threshold 0.5 until one is chosen)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=5000).fit(vectors, labels)
    w, b = model.coef_[0].astype(np.float32), float(model.intercept_[0])
    # softmax over (-z/2, z/2) is the logistic sigmoid of z = w·x + b
    return Head(classes, np.stack([-w / 2, w / 2]), np.array([-b / 2, b / 2], np.float32), 0.5, name)


def cell(table: dict, layers: tuple[str, ...], language: str) -> str:
    if not table["both"][language]["n"]:
        return "–"
    return " / ".join(str(table[layer][language]["flagged"]) for layer in layers) + \
        f" of {table['both'][language]['n']}"
