"""Fit the router (`chatbot.routing.Router`): when are the best passages close enough to a message, in meaning and in
words, for the documents to answer it?

    python -m chatbot.routing_fit       # about two minutes: builds the bundled corpus into a temporary index

Each message is retrieved as the assistant retrieves it (`chatbot.grounding.ground`, the default embedder), and
described by its best passage's relevance (the larger of the dense closeness and the share of its words a passage
holds) and its best dense closeness (`Hit.meaning`). Only messages the router would judge are used: not tasks, and
at or above `--min-relevance`.
- Answered from the documents: the bundled knowledge base's document questions (knowledge/eval/questions.jsonl).
- Answered by the model: the everyday requests (chatbot/eval/everyday.jsonl), the out-of-scope questions
  (knowledge/eval/out_of_scope.jsonl) and the benign requests of the safety data (chatbot/safety_data/requests*:
  everyday, look-alikes and technical questions about software; its train split for the fit, its validation split
  for the threshold, its test split reported).
The threshold is the highest on a 0.05 grid at which every document question that relevance alone sends to the
documents still goes there, and the validation requests sent there are fewest; or `--threshold` (the shipped router:
0.15, see README "The router"). The trade of every threshold on the grid is printed. Reported, and used for nothing: the
safety data's test split and the fresh requests of `chatbot/safety_data/not_trained/requests5.*`. The figures on the
corpora the project did not write come from `python benchmarks/corpora.py` (README, "How a message is routed").
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np

from chatbot.config import ChatConfig
from chatbot.evaluate import EVERYDAY, FRESH, QUESTIONS, read_jsonl
from chatbot.grounding import ground
from chatbot.routing import ROUTER_FILE, Router, is_task
from chatbot.safety_sets import harm_rows
from knowledge.embedder import Embedder
from knowledge.retriever import Retriever
from knowledge.store import BUNDLED_CORPUS, scratch_knowledge_base

OUT_OF_SCOPE = QUESTIONS.parent / "out_of_scope.jsonl"
C = 10.0  # inverse regularisation of the logistic regression (two features: little to regularise)
THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def messages() -> list[dict]:
    """text, language, documents (whether the documents should answer) and set (where it is used)."""
    rows = [{"text": q["question"], "language": q["language"], "documents": True, "set": "document questions"}
            for q in read_jsonl(QUESTIONS)]
    rows += [{"text": r["text"], "language": r["language"], "documents": False, "set": "train"}
             for r in read_jsonl(EVERYDAY)]
    rows += [{"text": r["question"], "language": r["language"], "documents": False, "set": "train"}
             for r in read_jsonl(OUT_OF_SCOPE)]
    rows += [{"text": r["text"], "language": r["language"], "documents": False, "set": r["split"]}
             for r in harm_rows() if r["label"] == "benign" and r["split"] in ("train", "validation", "test")]
    rows += [{"text": r["text"], "language": r["language"], "documents": False, "set": "fresh"}
             for path in FRESH for r in read_jsonl(path) if r["label"] == "benign"]
    return rows


def features(retriever: Retriever, rows: list[dict], min_relevance: float, passages: int) -> np.ndarray:
    """(relevance, closeness, judged) per message: judged is 1 where the router would judge it (not a task, relevant
    enough, and read by the embedder)."""
    from tqdm import tqdm

    table = np.zeros((len(rows), 3))
    for i, row in enumerate(tqdm(rows, desc="retrieving", unit="message", file=sys.stderr)):
        hits = ground(retriever, [], row["text"], row["language"], min_relevance, passages).hits
        closeness = [h.meaning for h in hits if h.meaning is not None]
        relevance = max((h.relevance for h in hits), default=0.0)
        judged = bool(closeness) and not is_task(row["text"]) and relevance >= min_relevance
        table[i] = (relevance, max(closeness, default=0.0), judged)
    return table


def fit(table: np.ndarray, labels: np.ndarray) -> Router:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit(table[:, [1, 0]], labels)
    return Router(float(model.coef_[0][0]), float(model.coef_[0][1]), float(model.intercept_[0]), 0.5)


def sent_to_documents(router: Router | None, table: np.ndarray, chosen: np.ndarray) -> int:
    """How many of the `chosen` judged messages the router lets through to the documents (None: all of them)."""
    if router is None:
        return int(chosen.sum())
    return sum(router.answers(table[i, 1], table[i, 0]) for i in np.flatnonzero(chosen))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatbot.routing_fit", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help=f"print the figures, do not write {ROUTER_FILE.name}")
    parser.add_argument("--threshold", type=float,
                        help="use this threshold instead of choosing one (the figures show what it keeps)")
    args = parser.parse_args(argv)
    config = ChatConfig()
    rows = messages()
    embedder = Embedder()
    with scratch_knowledge_base([BUNDLED_CORPUS], embedder) as kb:
        table = features(Retriever(kb, embedder), rows, config.min_relevance, config.passages)
    judged = table[:, 2] > 0
    labels = np.array([r["documents"] for r in rows])
    in_set = {name: np.array([r["set"] == name for r in rows]) for name in
              ("document questions", "train", "validation", "test", "fresh")}
    training = judged & (in_set["document questions"] | in_set["train"])
    router = fit(table[training], labels[training])
    questions = judged & in_set["document questions"]
    validation = judged & in_set["validation"]
    answered = sent_to_documents(None, table, questions)
    candidates = [replace(router, threshold=float(t)) for t in THRESHOLDS]
    kept = [sent_to_documents(r, table, questions) for r in candidates]
    print("| threshold | document questions sent to the model | validation requests sent to the documents |\n"
          "|---|---|---|")
    for candidate, questions_kept in zip(candidates, kept, strict=True):
        print(f"| {candidate.threshold:.2f} | {answered - questions_kept} | "
              f"{sent_to_documents(candidate, table, validation)} |")
    print()
    usable = [r for r, questions_kept in zip(candidates, kept, strict=True) if questions_kept == answered]
    if args.threshold is not None:
        usable = [replace(router, threshold=args.threshold)]
    if not usable:
        raise SystemExit("no threshold keeps every document question: nothing written")
    router = min(usable, key=lambda r: (sent_to_documents(r, table, validation), -r.threshold))
    figures = {}
    for name, chosen in in_set.items():
        for language in ("en", "zh"):
            mask = chosen & np.array([r["language"] == language for r in rows])
            figures[f"{name} {language}"] = {"messages": int(mask.sum()), "judged": int((mask & judged).sum()),
                                             "relevance alone": sent_to_documents(None, table, mask & judged),
                                             "with the router": sent_to_documents(router, table, mask & judged)}
    print(f"router: P = sigmoid({router.meaning:.3f} x closeness + {router.words:.3f} x relevance + {router.bias:.3f})"
          f" >= {router.threshold:.2f}\n")
    print("| set | language | messages | reach --min-relevance, not tasks | sent to the documents: relevance alone | "
          "with the router |\n|---|---|---|---|---|---|")
    for key, row in figures.items():
        name, language = key.rsplit(" ", 1)
        print(f"| {name} | {language} | {row['messages']} | {row['judged']} | {row['relevance alone']} | "
              f"{row['with the router']} |")
    if not args.dry_run:
        router.write(ROUTER_FILE, C=C, figures=figures,
                     threshold_chosen="given (--threshold)" if args.threshold is not None else
                     "the highest that keeps every document question",
                     fitted_on="the bundled document questions, chatbot/eval/everyday.jsonl, knowledge/eval/"
                               "out_of_scope.jsonl and the benign train split of chatbot/safety_data/requests*.jsonl")
        print(f"\nwrote {ROUTER_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
