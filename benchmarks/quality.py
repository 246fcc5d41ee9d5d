"""Quality and speed of the built-in model at each backend and precision, side by side. One command prints the table:

    python benchmarks/quality.py                       # about 8 minutes on 2 CPU cores (compiles what is missing)
    python benchmarks/quality.py --precisions int4,int8 --model FOLDER

The check: chatbot/eval/factual.jsonl, 40 English and 40 Chinese short factual questions written for this project
(different facts in each language), each with the accepted forms of its answer. Each is asked as the app asks it
without documents (the default system prompt, the question and its reply-language line), greedy, up to 48 new
tokens. Counted per language: correct (an accepted form appears in the reply) and in the question's language
(common.language.detect_language of the reply). Speed, over the same replies: median time to first token and
decode tokens per second (tokens after the first over the time after it).

The default precision is the fastest that loses at most one answer against fp32 in each language
(chatbot.onnx_engine.DEFAULT_PRECISION says which, and cites this table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from chatbot.engine import GenerationOptions, Usage, load_engine  # noqa: E402
from chatbot.evaluate import read_jsonl  # noqa: E402
from chatbot.onnx_engine import PRECISIONS  # noqa: E402
from chatbot.prompts import DEFAULT_SYSTEM_PROMPT, user_turn  # noqa: E402
from common.language import detect_language  # noqa: E402

FACTUAL = ROOT / "chatbot" / "eval" / "factual.jsonl"
NEW_TOKENS = 48


def ask(engine, question: str, language: str, new_tokens: int = NEW_TOKENS, system: str = DEFAULT_SYSTEM_PROMPT,
        earlier: Sequence[dict] = ()) -> tuple[str, float, float]:
    """(reply, time to first token, decode tokens/s); `earlier`: turns before the question (none by default: a
    first question, as the checks ask)."""
    messages = [{"role": "system", "content": system}, *earlier,
                {"role": "user", "content": user_turn(question, language)}]
    usage, text, first = Usage(), "", None
    start = time.perf_counter()
    for piece in engine.stream(messages, GenerationOptions(max_new_tokens=new_tokens), usage=usage):
        first = first or time.perf_counter() - start
        text += piece
    total = time.perf_counter() - start
    first = first or total
    return text, first, (usage.completion_tokens - 1) / max(total - first, 1e-9)


def correct(reply: str, answers: list[str]) -> bool:
    return any(answer.lower() in reply.lower() for answer in answers)


def score(engine, rows: list[dict]) -> dict:
    figures: dict = {"ttft": [], "rate": [], "replies": []}
    for language in ("en", "zh"):
        figures[language] = {"asked": 0, "correct": 0, "in_language": 0}
    for row in rows:
        reply, first, rate = ask(engine, row["question"], row["language"])
        tally = figures[row["language"]]
        tally["asked"] += 1
        tally["correct"] += correct(reply, row["answers"])
        tally["in_language"] += detect_language(reply, default="") == row["language"]
        figures["ttft"].append(first)
        figures["rate"].append(rate)
        figures["replies"].append(reply)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="the model (default: the built-in one)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="onnx precisions to compare")
    parser.add_argument("--show", action="store_true", help="print every reply that missed")
    args = parser.parse_args(argv)
    rows = read_jsonl(FACTUAL)
    variants = [("transformers fp32", "transformers", None)]
    variants += [(f"onnx {p}", "onnx", p) for p in args.precisions.split(",")]
    results = {}
    for name, backend, precision in variants:
        engine = load_engine(args.model, backend, "cpu", precision=precision)
        print(f"{name}: asking {len(rows)} questions ...", file=sys.stderr, flush=True)
        results[name] = score(engine, rows)
        if hasattr(engine, "close"):
            engine.close()
    base = results["transformers fp32"]
    print(f"\nThe built-in model ({engine.name}), {len(rows)} factual questions (chatbot/eval/factual.jsonl), "
          f"greedy, up to {NEW_TOKENS} new tokens; correct / asked, and replies in the question's language:\n")
    print("| backend and precision | English correct | Chinese correct | in the question's language (en, zh) | "
          "time to first token | decode tokens/s | decode vs transformers |\n|---|---|---|---|---|---|---|")
    for name, figures in results.items():
        en, zh = figures["en"], figures["zh"]
        rate = statistics.median(figures["rate"])
        print(f"| {name} | {en['correct']}/{en['asked']} | {zh['correct']}/{zh['asked']} | "
              f"{en['in_language']}/{en['asked']}, {zh['in_language']}/{zh['asked']} | "
              f"{statistics.median(figures['ttft']):.2f} s | {rate:.1f} | "
              f"{rate / statistics.median(base['rate']):.1f}x |")
    if args.show:
        for name, figures in results.items():
            for row, reply in zip(rows, figures["replies"], strict=True):
                if not correct(reply, row["answers"]):
                    print(f"{name} missed: {row['question']} -> {reply[:100]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
