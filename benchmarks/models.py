"""The built-in models side by side, each at its default precision on the onnx backend, on the same sets. One command
prints one table:

    python benchmarks/models.py                         # about 10 minutes on 2 CPU cores (compiles what is missing)
    python benchmarks/models.py --models default,gemma-3-270m-bilingual --documents 20 --show

Per language (English, Chinese):
- factual: chatbot/eval/factual.jsonl (40 + 40 short questions, different facts per language), asked as
  benchmarks/quality.py asks them: correct, and replies in the question's language; correct is also counted on the
  questions that no shipped adapter's training data asks (TRAINED);
- everyday: chatbot/eval/everyday.jsonl (32 + 32 requests: writing, arithmetic, advice, small talk ...), asked the same
  way, up to EVERYDAY_TOKENS new tokens: answered = a non-empty reply in the question's language that does not loop
  (chatbot.engine.LoopCheck over its tokens: the last 8 tokens already occurred twice before), does not repeat the
  request (its letters and digits within the reply's) and is not the app's refusal or crisis reply;
- documents: the first --documents questions per language of knowledge/eval/questions.jsonl, asked through the whole
  assistant (chatbot.assistant.Assistant over a scratch index of the bundled corpus, with the model's profile: a
  model that does not write a language in answers from documents quotes the passages instead), the share whose answer
  carries the question's key phrase (chatbot.evaluate.key_fact_recall);
- speed: median time to first token and decode tokens/s over the factual replies.

The raw replies are scored, as the model writes them; the app itself shows a note instead of a reply in a language the
model's profile says it cannot write (chatbot.models.ModelProfile).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from difflib import SequenceMatcher
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import FACTUAL, ask, correct, score  # noqa: E402
from chatbot.assistant import Assistant  # noqa: E402
from chatbot.config import ChatConfig  # noqa: E402
from chatbot.engine import LoopCheck, load_engine  # noqa: E402
from chatbot.evaluate import EVERYDAY, QUESTIONS, key_fact_recall, read_jsonl  # noqa: E402
from chatbot.onnx_engine import DEFAULT_PRECISION  # noqa: E402
from chatbot.prompts import gives_refusal  # noqa: E402
from common.language import detect_language, letters  # noqa: E402
from knowledge.embedder import Embedder  # noqa: E402
from knowledge.retriever import Retriever  # noqa: E402
from knowledge.store import BUNDLED_CORPUS, scratch_knowledge_base  # noqa: E402

EVERYDAY_TOKENS = 96
LANGUAGES = ("en", "zh")
# What the shipped adapters were trained on: a factual question one of them saw (13 English ones are in the sample
# dialogues the default adapter learned from) is also counted apart, as "unseen" below.
TRAINED = [ROOT / "finetune/data/sample_dialogues.jsonl", ROOT / "finetune/data/bilingual_train.jsonl"]


def trained_questions() -> set[str]:
    return {letters(m["content"]) for path in TRAINED for line in path.read_text(encoding="utf-8").splitlines()
            for m in json.loads(line)["messages"] if m["role"] == "user"}


def loops(engine, reply: str) -> bool:
    return LoopCheck().add(engine.tokenizer(reply, add_special_tokens=False)["input_ids"])


def echoes(request: str, reply: str) -> bool:
    """The reply repeats the request (SmolLM2 does so with most Chinese requests: "一公里等于多少米？" → the same)."""
    return letters(request) in letters(reply)


def everyday(engine, rows: list[dict]) -> dict:
    tally = {language: {"asked": 0, "answered": 0, "looped": 0, "echoed": 0, "refused": 0} for language in LANGUAGES}
    replies = []
    for row in rows:
        reply, _, _ = ask(engine, row["text"], row["language"], EVERYDAY_TOKENS)
        looped, echoed = loops(engine, reply), echoes(row["text"], reply)
        refused = gives_refusal(reply, row["language"])
        figures = tally[row["language"]]
        figures["asked"] += 1
        figures["looped"] += looped
        figures["echoed"] += echoed
        figures["refused"] += refused
        figures["answered"] += (bool(reply.strip()) and not looped and not echoed and not refused
                                and detect_language(reply, default="") == row["language"])
        replies.append(reply)
    return tally | {"replies": replies}


def documents(engine, spec: str | None, retriever: Retriever, rows: list[dict]) -> dict:
    config = ChatConfig(model=spec, backend="onnx")
    recall, missed = key_fact_recall(Assistant(engine, config, retriever), rows)
    # found / asked: a question declined as not covered counts as missed
    return {language: (sum(r["language"] == language for r in rows), recall.get(language, (0, 0))[1])
            for language in LANGUAGES} | {"missed": missed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="default,gemma-3-270m-bilingual",
                        help="comma-separated --model values ('default': the built-in default)")
    parser.add_argument("--documents", type=int, default=20, help="document questions per language")
    parser.add_argument("--show", action="store_true", help="print the replies that missed")
    args = parser.parse_args(argv)
    factual, requests = read_jsonl(FACTUAL), read_jsonl(EVERYDAY)
    seen = trained_questions()
    unseen = [i for i, row in enumerate(factual)
              if not any(SequenceMatcher(None, letters(row["question"]), asked).ratio() >= 0.9 for asked in seen)]
    questions = [row for language in LANGUAGES
                 for row in [r for r in read_jsonl(QUESTIONS) if r["language"] == language][:args.documents]]
    embedder = Embedder()
    results = {}
    with scratch_knowledge_base([BUNDLED_CORPUS], embedder) as kb:
        retriever = Retriever(kb, embedder)
        for name in args.models.split(","):
            spec = None if name == "default" else name
            engine = load_engine(spec, "onnx", "cpu", precision=DEFAULT_PRECISION)
            print(f"{engine.name}: {len(factual)} factual, {len(requests)} everyday, {len(questions)} document "
                  "questions ...", file=sys.stderr, flush=True)
            results[engine.name] = (score(engine, factual), everyday(engine, requests),
                                    documents(engine, spec, retriever, questions))
            engine.close()
    print(f"\nThe built-in models side by side, onnx {DEFAULT_PRECISION}, greedy (benchmarks/models.py): factual "
          f"{len(factual)} questions, everyday {len(requests)} requests, document questions {args.documents} per "
          "language through the assistant; per language English / Chinese\n")
    print("| model | factual correct | factual correct, questions no model trained on | factual in the question's "
          "language | everyday answered in language, no loop | everyday looped, echoed, refused | key fact in answers "
          "from documents | time to first token | decode tokens/s |\n|---|---|---|---|---|---|---|---|---|")

    def pair(key: str, table: dict) -> str:
        return " / ".join(f"{table[language][key]}/{table[language]['asked']}" for language in LANGUAGES)

    def fresh(replies: list[str], language: str) -> str:
        chosen = [i for i in unseen if factual[i]["language"] == language]
        return f"{sum(correct(replies[i], factual[i]['answers']) for i in chosen)}/{len(chosen)}"

    for name, (facts, chat, docs) in results.items():
        cells = [pair("correct", facts), " / ".join(fresh(facts["replies"], lang) for lang in LANGUAGES),
                 pair("in_language", facts), pair("answered", chat),
                 " / ".join(f"{chat[lang]['looped']}, {chat[lang]['echoed']}, {chat[lang]['refused']}"
                            for lang in LANGUAGES),
                 " / ".join(f"{docs[lang][1]}/{docs[lang][0]}" for lang in LANGUAGES),
                 f"{statistics.median(facts['ttft']):.2f} s", f"{statistics.median(facts['rate']):.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.show:
        for name, (facts, chat, docs) in results.items():
            for row, reply in zip(factual, facts["replies"], strict=True):
                print(f"{name} factual: {row['question']} -> {reply[:90]!r}")
            for row, reply in zip(requests, chat["replies"], strict=True):
                print(f"{name} everyday: {row['text']} -> {reply[:90]!r}")
            for line in docs["missed"]:
                print(f"{name} document missed: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
