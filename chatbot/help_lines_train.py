"""The help-lines head (chatbot/heads/help_lines.json, `--head help`, a few minutes) is a logistic regression on the
harm encoder's vectors: the message asks for a crisis or support line, which the app answers with the numbers
written into it (chatbot.prompts.HELP_LINES) rather than the model's guess at them. It is trained on
chatbot/safety_data/help_lines.*.jsonl (such requests and look-alikes that ask for none: other phone numbers,
mental-health questions, hotline volunteering; split by intent, an intent both languages have in one split) and
the harm data's everyday and technical requests; its C and threshold are chosen on validation: the most requests
for a line given the numbers while no everyday or technical request and at most 1% of all the others that ask for
none (pooled) are. It records a fingerprint of the harm encoder and head it was fitted over, and serving skips it
when they have changed.

    python -m chatbot.safety_train --head help
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np

from chatbot.safety import judge
from chatbot.safety_heads import HARM_DELTA, HARM_HEAD, HELP_HEAD, Head, harm_category, harm_fingerprint
from chatbot.safety_sets import (
    DATA,
    EVAL,
    THRESHOLDS,
    assign_splits,
    document_questions,
    fit_logistic,
    harm_rows,
    labelled,
    parts,
    rates,
)
from knowledge.e5_torch import E5Encoder
from knowledge.evaluate import read_jsonl

HELP_DATA = sorted(DATA.glob("help_lines.*.jsonl"))  # requests for a crisis line, and look-alikes that ask for none
# the help-lines head's inverse regularisations, one chosen on validation (from 1,000 on it gains no more there)
HELP_CS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
MAX_HELP_OTHERS = 0.01  # validation messages asking for no line that may get the lines instead of the model's answer
PLAIN_KINDS = ("everyday", "technical")  # the harm data's kinds that must never get the lines
ASKS = "asks for a line"
OUTCOMES = ("the numbers", "the crisis reply", "a refusal", "the model")


def help_rows() -> list[dict]:
    """Requests for a crisis or support line and messages like them that ask for none (HELP_DATA, split by intent
    per label, an intent both languages have in one split), and as messages that ask for none the harm data's
    everyday requests and technical questions, in their own splits."""
    rows = [row for path in HELP_DATA for row in read_jsonl(path)]
    assign_splits(rows, "label", per_language=False)
    return rows + [row | {"label": "other"} for row in harm_rows() if row.get("kind") in PLAIN_KINDS]


def help_kind(row: dict) -> str:
    """How a row counts in the help-lines head's figures."""
    if row["label"] == "help":
        return ASKS
    if row["label"] == "other" and row.get("kind") not in PLAIN_KINDS:
        return "look-alikes"
    if row["label"] in ("harmful", "self_harm"):
        return "unsafe"
    return row["kind"] if row.get("kind") in PLAIN_KINDS else "other benign"


def harm_categories(vectors: np.ndarray, rows: list[dict]) -> list[str | None]:
    """The shipped harm check's category for each row (None: it lets the row through), as
    `chatbot.safety_heads.Learned.verdict` decides: its head on these harm-encoder vectors, and the patterns."""
    harm = Head.read(HARM_HEAD)
    return [harm_category(harm, p, judge(r["text"]).category)
            for p, r in zip(harm.probabilities(vectors), rows, strict=True)]


def help_figures(head: Head, vectors: np.ndarray, rows: list[dict]) -> dict:
    """Per kind of row (help_kind) and language, how many get the lines: the harm check lets them through and the
    head flags them; the texts that get them but ask for none; and per language what answers the requests for a
    line (OUTCOMES: the lines, or the harm check's crisis reply or refusal, or the model where neither says)."""
    categories = harm_categories(vectors, rows)
    flags = np.array([f is not None and c is None for f, c in zip(head.flagged(vectors), categories, strict=True)])
    table = {}
    for kind in dict.fromkeys(help_kind(r) for r in rows):
        members = [i for i, r in enumerate(rows) if help_kind(r) == kind]
        table[kind] = rates(flags[members], [rows[i] for i in members])
    table["flagged"] = [r["text"] for r, f in zip(rows, flags, strict=True) if f and help_kind(r) != ASKS]
    answered = {language: dict.fromkeys(OUTCOMES, 0) for language in ("en", "zh")}
    for row, flag, category in zip(rows, flags, categories, strict=True):
        if help_kind(row) == ASKS:
            outcome = 0 if flag else 1 if category == "self_harm" else 2 if category else 3
            answered[row["language"]][OUTCOMES[outcome]] += 1
    if any(sum(counts.values()) for counts in answered.values()):
        table["requests for a line answered by"] = answered
    return table


def choose_help(asks: np.ndarray, rows: list[dict]) -> float:
    """The lowest threshold (the most requests for a line answered with the app's numbers) at which no everyday or
    technical message and at most MAX_HELP_OTHERS of the others are answered so instead of by the model; `asks`:
    the head's probability for the rows the harm check lets through, 0 for the others."""
    plain = np.array([r.get("kind") in PLAIN_KINDS for r in rows])
    other = np.array([r["label"] != "help" for r in rows])
    for threshold in THRESHOLDS:
        flagged = asks >= threshold
        if not (flagged & plain).any() and (flagged & other).sum() <= MAX_HELP_OTHERS * other.sum():
            return float(threshold)
    return 1.01  # none: a head that flags nothing


def train_help_lines() -> dict:
    """Fit the help-lines head on the harm encoder's vectors of the train split with each of HELP_CS, keep the one
    that gives the most validation requests for a line the numbers at its threshold (choose_help), score the test
    split and the report-only sets once, and write what serving loads."""
    rows = help_rows()
    labels = np.array([int(r["label"] == "help") for r in rows])
    split = parts(rows)
    encoder = E5Encoder.load(delta=HARM_DELTA)
    print(f"embedding {len(rows)} requests ...", file=sys.stderr, flush=True)
    vectors = encoder.queries([r["text"] for r in rows])
    validation = split["validation"]
    held = [rows[i] for i in validation]
    passes = np.array([c is None for c in harm_categories(vectors[validation], held)])
    best: tuple[int, float, Head] | None = None
    for c in HELP_CS:  # the smallest C of a tie: the most regularised
        head = fit_logistic(vectors[split["train"]], labels[split["train"]], encoder.name, c, ("other", "help_lines"))
        asks = (1 - head.probabilities(vectors[validation])[:, 0]) * passes  # as Head.flagged reads it
        threshold = choose_help(asks, held)
        answered = int(((asks >= threshold) & (labels[validation] == 1)).sum())
        print(f"validation: C {c}, threshold {threshold:.2f}, {answered} requests for a line given the numbers",
              file=sys.stderr)
        if best is None or answered > best[0]:
            best = answered, c, replace(head, threshold=threshold)
    head = best[2]
    figures = {name: help_figures(head, vectors[split[name]], [rows[i] for i in split[name]])
               for name in ("validation", "test")}
    fresh = sorted((DATA / "not_trained").glob("requests5.*.jsonl"))
    reports = {"harm data's test split": [r for r in harm_rows() if r["split"] == "test"],
               "everyday.jsonl": [labelled(r, "report", "everyday.jsonl") for r in read_jsonl(EVAL / "everyday.jsonl")],
               "fresh requests (not_trained)": [r for path in fresh for r in read_jsonl(path)]} | document_questions()
    for name, extra in reports.items():
        figures[name] = help_figures(head, encoder.queries([r["text"] for r in extra]), extra)
    head.write(HELP_HEAD, C=best[1], harm=harm_fingerprint(), split={name: len(split[name]) for name in split},
               figures=figures,
               trained_on="the harm encoder's vectors (" + HARM_DELTA.name + ") of the train split of "
                          "chatbot/safety_data/help_lines.*.jsonl and of the harm data's everyday and technical "
                          "requests")
    return figures


def print_help(figures: dict) -> None:
    """The help-lines head's figures as a table, what answers the requests for a line, then the messages given the
    lines that ask for none."""
    print("\n| set | kind | en | zh |\n|---|---|---|---|")
    for name, table in figures.items():
        for kind, counts in table.items():
            if kind not in ("flagged", "requests for a line answered by"):
                cells = [f"{counts[lang]['flagged']} of {counts[lang]['n']}" if counts[lang]["n"] else "–"
                         for lang in ("en", "zh")]
                print(f"| {name} | {kind} | {' | '.join(cells)} |")
    print(f"\n| set | requests for a line answered by: {' / '.join(OUTCOMES)}, en | zh |\n|---|---|---|")
    for name, table in figures.items():
        if answered := table.get("requests for a line answered by"):
            cells = [" / ".join(str(answered[lang][outcome]) for outcome in OUTCOMES) for lang in ("en", "zh")]
            print(f"| {name} | {' | '.join(cells)} |")
    for name, table in figures.items():
        if table["flagged"]:
            print(f"\n{name}, answered with the lines though they ask for none: {table['flagged']}")
