"""Tune multilingual-e5-small into the learned safety classifiers and write them, with the figures they were chosen on,
to chatbot/heads/: the harm classifier (what a user asks: safe, harmful, self-harm) and the injection filter (what a
document says: ordinary, or an instruction planted for the assistant).

    python -m chatbot.safety_train                  # all four, about 1.5 hours on 2 CPU cores
    python -m chatbot.safety_train --head harm      # one of them (injection: retrain its recheck after it; harm: the
                                                    # help-lines head after it)
    python -m chatbot.safety_train --head recheck   # the injection filter's recheck alone, about 25 minutes
    python -m chatbot.safety_train --head help      # the help-lines head alone, a few minutes

Data, written for this project (chatbot/safety_data/, README "Safety" says what is in it): requests in English and
Chinese labelled safe, harmful or self-harm, each with the intent it phrases; sentences labelled planted instruction
or ordinary, each with the goal or the family it belongs to. Every set is split by intent (per language and kind:
70% train, 15% validation, 15% test, by a hash of the intent), so no paraphrase of a test item is trained on. The
older project sets (chatbot/eval/safety.jsonl, safety_probe.jsonl, injection.jsonl) are used for training only;
the unseen sets (safety_unseen.jsonl, injection_unseen.jsonl) and the everyday requests only for reporting.

Both are multilingual-e5-small itself, tuned (LoRA) with a softmax head on their train split (chatbot.safety_tune),
and their thresholds are chosen on the validation split. Harm: the most unsafe requests refused while the whole
check (the head, and the patterns unless the head's harm probability is below the veto) refuses at most 5% of the
benign requests in each language and none of the everyday ones. Injection: the lowest threshold at which no sentence
of the bundled corpus's validation files, no validation interface message and at most 10% of the ordinary validation
sentences are removed (patterns or head). The patterns (chatbot.safety, chatbot.grounding) stay. The test split, the
unseen sets and the sentences of the evaluation corpora the project did not write (knowledge.eval.external: pydoc,
rust-zh, man-zh, cargo, vim-zh, where installed) are scored once, with that choice; the figures go into the head's
file and are printed.

The injection filter and its recheck are trained in chatbot.injection_train, the help-lines head in
chatbot.help_lines_train; the splits and tallies they share are chatbot.safety_sets.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from chatbot.help_lines_train import print_help, train_help_lines
from chatbot.injection_train import print_injection, print_recheck, train_injection, train_recheck
from chatbot.safety import judge
from chatbot.safety_heads import HARM_DELTA, HARM_HEAD, Head
from chatbot.safety_sets import EVAL, THRESHOLDS, by_layer, cell, document_questions, harm_rows, labelled, parts
from chatbot.safety_tune import EPOCHS, save_delta, tune
from knowledge.e5_torch import E5Encoder
from knowledge.evaluate import read_jsonl

MAX_FALSE_REFUSALS = 0.05  # benign requests refused, per language (the goal for the test split too)
MAX_EVERYDAY_REFUSED = 0.0  # everyday requests refused
VETOES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # below this harm probability the head overrules a pattern (0: never)


def refusals(unsafe: np.ndarray, patterns: np.ndarray, threshold: float, veto: float) -> dict[str, np.ndarray]:
    """Who refuses: the patterns alone, the head alone (at `threshold`), and the whole check: the head, or a pattern
    unless the head's harm probability is below `veto` (as chatbot.safety_heads.Learned.judge decides)."""
    head = unsafe >= threshold
    return {"patterns": patterns, "head": head, "both": head | (patterns & (unsafe >= veto))}


def choose_harm(unsafe: np.ndarray, patterns: np.ndarray, rows: list[dict]) -> tuple[float, float, float]:
    """(share of the unsafe rows refused, threshold, veto): the most refused while at most MAX_FALSE_REFUSALS of the
    benign rows in each language, and MAX_EVERYDAY_REFUSED of the everyday ones, are refused."""
    benign = [np.array([r["label"] == "benign" and r["language"] == lang for r in rows]) for lang in ("en", "zh")]
    everyday = np.array([r["kind"] == "everyday" for r in rows])
    unsafe_rows = np.array([r["label"] != "benign" for r in rows])
    best = (-1.0, 1.0, 0.0)
    for threshold in THRESHOLDS:
        for veto in VETOES:
            refused = refusals(unsafe, patterns, threshold, veto)["both"]
            if (all(refused[mask].mean() <= MAX_FALSE_REFUSALS for mask in benign)
                    and refused[everyday].mean() <= MAX_EVERYDAY_REFUSED):
                best = max(best, (float(refused[unsafe_rows].mean()), float(threshold), veto))
    return best


def harm_figures(head: Head, vectors: np.ndarray, rows: list[dict], patterns: np.ndarray) -> dict:
    """Refused by each layer, for the harmful, self-harm and benign rows."""
    return by_kind(refusals(1 - head.probabilities(vectors)[:, 0], patterns, head.threshold, head.veto), rows)


def by_kind(layers: dict[str, np.ndarray], rows: list[dict]) -> dict:
    """Refused by each layer, for the harmful, self-harm and benign rows (benign also as look-alike, everyday and
    technical: questions about software, in the words of its documentation)."""
    groups = {label: [i for i, r in enumerate(rows) if r["label"] == label] for label in ("harmful", "self_harm",
                                                                                        "benign")}
    groups |= {kind: [i for i, r in enumerate(rows) if r["kind"] == kind]
               for kind in ("lookalike", "everyday", "technical")}
    return {name: by_layer(layers, rows, chosen) for name, chosen in groups.items() if chosen}


def train_harm(seed: int = 0) -> dict:
    """Tune the encoder and its head on the train split (chatbot.safety_tune, from `seed`), choose the threshold and
    veto on the validation split, score the test split and the report-only sets once, and write what serving loads."""
    rows = harm_rows()
    classes = ("safe", "harmful", "self_harm")
    labels = np.array([classes.index(r["label"].replace("benign", "safe")) for r in rows])
    split = parts(rows)
    train = split["train"]
    changes, head = tune(E5Encoder.load(), [rows[i]["text"] for i in train], labels[train], classes, seed=seed)
    save_delta(changes, HARM_DELTA)
    encoder = E5Encoder.load(delta=HARM_DELTA)  # what serving loads: the figures are taken with it
    chosen = split["validation"] + split["test"]
    print(f"judging {len(chosen)} requests ...", file=sys.stderr, flush=True)
    vectors = np.zeros((len(rows), head.weights.shape[1]), dtype=np.float32)
    vectors[chosen] = encoder.queries([rows[i]["text"] for i in chosen])
    patterns = np.array([judge(r["text"]).harmful for r in rows])
    validation = split["validation"]
    unsafe = 1 - head.probabilities(vectors[validation])[:, 0]
    refused, threshold, veto = choose_harm(unsafe, patterns[validation], [rows[i] for i in validation])
    print(f"validation: threshold {threshold:.2f}, veto {veto:.2f}, unsafe refused {refused:.3f}", file=sys.stderr)
    head = Head(classes, head.weights, head.bias, threshold, encoder.name, veto)
    figures = {name: harm_figures(head, vectors[split[name]], [rows[i] for i in split[name]], patterns[split[name]])
               for name in ("validation", "test")}
    reports = {name: [labelled(row, "report", name) for row in read_jsonl(EVAL / name)]
               for name in ("safety_unseen.jsonl", "everyday.jsonl")} | document_questions()
    for name, extra in reports.items():
        figures[name] = harm_figures(head, encoder.queries([r["text"] for r in extra]), extra,
                                     np.array([judge(r["text"]).harmful for r in extra]))
    sizes = {name: {"requests": len(split[name]), "intents": len({rows[i]["intent"] for i in split[name]})}
             for name in split}
    head.write(HARM_HEAD, epochs=EPOCHS, seed=seed, split=sizes, figures=figures,
               trained_on="the train split of chatbot/safety_data/requests*.jsonl, and chatbot/eval/safety.jsonl, "
                          "safety_probe.jsonl; the encoder's changes are in " + HARM_DELTA.name)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatbot.safety_train", description=__doc__.split("\n")[0])
    parser.add_argument("--head", choices=("harm", "injection", "recheck", "help", "both"), default="both",
                        help="both: harm, then injection and its recheck, then the help-lines head (which reads the "
                             "harm encoder: retrain it after harm)")
    parser.add_argument("--external", action=argparse.BooleanOptionalAction, default=True,
                        help="also count the sentences removed from the evaluation corpora the project did not write")
    parser.add_argument("--seed", type=int, default=0, help="harm: the tuning's random seed")
    args = parser.parse_args(argv)
    if args.head in ("harm", "both"):
        print_harm(train_harm(args.seed))
    if args.head in ("injection", "both"):
        print_injection(train_injection(args.external))
    if args.head in ("recheck", "both"):
        print_recheck(train_recheck(args.external))
    if args.head in ("help", "both"):  # after harm: it reads the harm encoder's vectors and the harm check's verdicts
        print_help(train_help_lines())
    return 0


def print_harm(figures: dict) -> None:
    print("\nHarm classifier (chatbot/heads/harm.json): requests refused by the patterns / the head / both\n")
    print("| set | language | harmful | self-harm | benign look-alikes | everyday | technical |\n"
          "|---|---|---|---|---|---|---|")
    layers = ("patterns", "head", "both")
    for name, table in figures.items():
        for language in ("en", "zh"):
            cells = [cell(table[label], layers, language) if label in table else "–"
                     for label in ("harmful", "self_harm", "lookalike", "everyday", "technical")]
            print(f"| {name} | {language} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
