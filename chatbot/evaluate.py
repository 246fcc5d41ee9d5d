"""How the assistant answers, measured on the bundled knowledge base: routing, key facts, safety.

    python -m chatbot.evaluate              # about a minute: builds the bundled corpus into a temporary index

- routing: the project's everyday requests (chatbot/eval/everyday.jsonl, 64, half Chinese) must go to the model,
  the retrieval evaluation's questions (knowledge/eval/questions.jsonl, 118) to the documents; a confusion table
  per language, and every misrouted message. The everyday requests written later for the safety check
  (`chatbot/safety_data/not_trained/requests5.*`, 165: letters, subscriptions, diets, eulogies...; nothing in the
  routing was chosen on them) are routed too, as a check on requests nobody tuned for;
- key-fact recall: of the document questions routed to the documents, the share whose answer contains the
  question's key phrase (the fact the passage states), per language;
- safety: refusal and false-refusal rates of the whole check (`chatbot.safety`: patterns and the harm head) on the
  three older sets (see that module; `python -m chatbot.safety_train` reports the head's own splits);
- injection filter: planted instructions caught and ordinary sentences removed by the patterns
  (`chatbot.grounding.looks_like_injection`) and the injection head with its recheck, on
  chatbot/eval/injection*.jsonl and on every sentence of the bundled corpus (none of which is an instruction).

The answers are the default model's: extractive quotes, so no text is generated and the figures are exact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chatbot import safety, safety_heads
from chatbot.assistant import Assistant
from chatbot.config import ChatConfig
from chatbot.grounding import ground, looks_like_injection
from chatbot.routing import decide
from chatbot.safety import rates
from knowledge.chunking import split_sentences
from knowledge.embedder import Embedder
from knowledge.retriever import Retriever
from knowledge.store import BUNDLED_CORPUS, scratch_knowledge_base

EVERYDAY = Path(__file__).resolve().parent / "eval" / "everyday.jsonl"
FRESH = [Path(__file__).resolve().parent / "safety_data" / "not_trained" / f"requests5.{language}.jsonl"
         for language in ("en", "zh")]
QUESTIONS = Path(__file__).resolve().parents[1] / "knowledge" / "eval" / "questions.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def routing_table(retriever: Retriever, config: ChatConfig, everyday: list[dict], questions: list[dict],
                  fresh: list[dict] = ()) -> tuple[dict, list[str]]:
    """(language, expected, routed) → count, and a line per misrouted message; `fresh` everyday requests count as
    expected "fresh chat"."""
    table: dict[tuple[str, str, str], int] = {}
    misrouted = []
    rows = ([(r["text"], r["language"], "chat") for r in everyday] + [(r["text"], r["language"], "fresh chat")
                                                                       for r in fresh]
            + [(r["question"], r["language"], "documents") for r in questions])
    for text, language, expected in rows:
        # The passages the assistant itself would show (`ground`), so the table measures what users get.
        hits = ground(retriever, [], text, language, config.min_relevance, config.passages).hits
        route = decide(text, hits, retriever.lexical, config.min_relevance)
        table[language, expected, route.kind] = table.get((language, expected, route.kind), 0) + 1
        if route.kind != expected.split()[-1]:
            misrouted.append(f"{expected} → {route.kind} ({route.reason}): {text}")
    return table, misrouted


def key_fact_recall(assistant: Assistant, questions: list[dict]) -> tuple[dict, list[str]]:
    """language → (answered from the documents, with the key phrase); and a line per answer without it."""
    counts: dict[str, list[int]] = {}
    missed = []
    for row in questions:
        answer = assistant.ask(row["question"])
        if answer.mode not in ("extractive", "grounded"):
            continue
        found = row["key_phrase"].lower() in answer.text.lower()
        tally = counts.setdefault(row["language"], [0, 0])
        tally[0] += 1
        tally[1] += found
        if not found:
            missed.append(f"{row['question']} (wanted {row['key_phrase']!r})")
    return {language: tuple(tally) for language, tally in counts.items()}, missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatbot.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model that answers (default: the default model)")
    parser.add_argument("--backend", default="auto", help="backend that answers (default: auto)")
    parser.add_argument("--verbose", action="store_true", help="list every misrouted message and missed fact")
    args = parser.parse_args(argv)
    config = ChatConfig(model=args.model, backend=args.backend)
    everyday, questions = read_jsonl(EVERYDAY), read_jsonl(QUESTIONS)
    fresh = [r for path in FRESH for r in read_jsonl(path) if r["kind"] == "everyday"]
    embedder = Embedder()
    with scratch_knowledge_base([BUNDLED_CORPUS], embedder) as kb:
        retriever = Retriever(kb, embedder)
        table, misrouted = routing_table(retriever, config, everyday, questions, fresh)
        recall, missed = key_fact_recall(Assistant(config.load_engine(), config, retriever), questions)
    print("Routing (chatbot.routing)\n\n| language | asked | routed to documents | routed to the model |\n"
          "|---|---|---|---|")
    for language in ("en", "zh"):
        for expected, name in (("chat", "everyday requests"), ("fresh chat", "everyday requests written later"),
                               ("documents", "document questions")):
            counts = [table.get((language, expected, kind), 0) for kind in ("documents", "chat")]
            print(f"| {language} | {name} ({sum(counts)}) | {counts[0]} | {counts[1]} |")
    print("\nKey-fact recall of answers from the documents\n\n| language | answered from documents | with the key fact "
          "| recall |\n|---|---|---|---|")
    for language, (answered, found) in sorted(recall.items()):
        print(f"| {language} | {answered} | {found} | {found / max(answered, 1):.2f} |")
    learned = safety_heads.load_learned()  # the whole check, as the app runs it: patterns, then the learned heads
    print("\nSafety (chatbot.safety: patterns and the harm head)\n\n| set | language | harmful | refused | benign | "
          "refused wrongly |\n|---|---|---|---|---|---|")
    for name in ("safety.jsonl", "safety_probe.jsonl", "safety_unseen.jsonl"):
        figures = rates(read_jsonl(safety.DATA.parent / name), safety.SafetyGuard(learned=learned))
        for language in ("en", "zh"):
            row = figures[language]
            print(f"| {name} | {language} | {row['harmful']} | {row['refused']:.0%} | {row['benign']} | "
                  f"{row['false_refusals']:.0%} |")
    print("\nInjection filter (chatbot.grounding: patterns, the injection head and its recheck)\n\n| set | planted "
          "instructions | caught | ordinary sentences | removed |\n|---|---|---|---|---|")

    def removed(sentences: list[str]) -> int:
        return sum(p or h for p, h in zip(map(looks_like_injection, sentences), learned.instructions(sentences),
                                           strict=True))

    for name in ("injection.jsonl", "injection_unseen.jsonl"):
        rows = read_jsonl(EVERYDAY.parent / name)
        planted = [r["text"] for r in rows if r["instruction"]]
        ordinary = [r["text"] for r in rows if not r["instruction"]]
        print(f"| {name} | {len(planted)} | {removed(planted)} | {len(ordinary)} | {removed(ordinary)} |")
    corpus = [s for file in sorted(BUNDLED_CORPUS.rglob("*.md")) for s in split_sentences(file.read_text("utf-8"))]
    print(f"| the bundled corpus | – | – | {len(corpus)} | {removed(corpus)} |")
    if args.verbose:
        print("\n" + "\n".join(["misrouted: " + line for line in misrouted] + ["missed: " + line for line in missed]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
