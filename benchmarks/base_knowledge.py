"""What a base model knows before any tuning: the factual check asked as a plain few-shot completion, per language,
and the Chinese questions asked again in English. Fine-tuning on other facts teaches a model to answer in a format
and a language; it cannot teach the facts of a held-out check. So what the base knows in either language bounds
what a tuned model can reach on those questions, whatever the hardware the tuning runs on.

    python benchmarks/base_knowledge.py                               # Gemma 3 270M base, about 2 minutes on 2 cores
    python benchmarks/base_knowledge.py --models gemma-3-270m,EMBEDDED --show
    python benchmarks/base_knowledge.py --chat --models gemma-3-270m-bilingual   # a tuned model, as the app asks
    python benchmarks/base_knowledge.py --prompts --models gemma-3-270m-bilingual  # other prompts, about 5 minutes

Sets: chatbot/eval/factual.jsonl's English questions, its Chinese questions, and the same Chinese questions in
English (their `question_en`, answered by their English forms). Each question follows three solved examples in its
language (facts the check does not ask), greedy, up to 24 new tokens; the reply is the first line. Correct: an
accepted answer appears in it (benchmarks.quality.correct). The last column counts the Chinese questions answered
in at least one of the two languages.

With `--chat` each model is a tuned chat model asked as the app asks (`benchmarks.quality.ask`: the system prompt,
the question and its reply-language line, onnx at the default precision, up to 48 new tokens), the same three sets:
what it knows when a question is put in English against what it says when asked in Chinese. The Chinese questions
put in English then count an accepted answer in either language (a tuned model may answer them in Chinese).

With `--prompts` (`--models gemma-3-270m-bilingual`: tuned chat models) the Chinese questions are asked with the
app's prompt and with others: a Chinese system prompt, and one or three solved Chinese examples (SHOTS) as earlier
turns. Scored on the check and on chatbot/eval/factual_validation.jsonl (60 Chinese questions on other facts,
written to choose a prompt on, and kept out of the fine-tuning data; the check's figures are for reporting): a
prompt is worth adopting only if it answers clearly more of the validation set than the app's (by three or more:
one or two of 60 is noise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import FACTUAL, ask, correct  # noqa: E402
from chatbot.engine import load_engine  # noqa: E402
from chatbot.evaluate import read_jsonl  # noqa: E402
from chatbot.models import EMBEDDED_NAME, load_model  # noqa: E402
from chatbot.onnx_engine import DEFAULT_PRECISION  # noqa: E402
from chatbot.prompts import DEFAULT_SYSTEM_PROMPT, user_turn  # noqa: E402

NEW_TOKENS = 24
# Solved examples: facts chatbot/eval/factual.jsonl does not ask, nor name as an answer.
SHOTS = {
    "en": [("What is the capital of Portugal?", "Lisbon."), ("What colour is fresh snow?", "White."),
           ("Which instrument has 88 keys?", "The piano.")],
    "zh": [("葡萄牙的首都是哪座城市？", "里斯本。"), ("刚下的雪是什么颜色的？", "白色。"),
           ("哪种乐器有88个键？", "钢琴。")],
}
ASK = {"en": "Q: {}\nA:", "zh": "问：{}\n答："}
ANSWERED = {"en": " {}\n", "zh": "{}\n"}


def prompt(question: str, language: str) -> str:
    solved = "".join(ASK[language].format(q) + ANSWERED[language].format(a) for q, a in SHOTS[language])
    return solved + ASK[language].format(question)


def complete(model, tokenizer, text: str) -> str:
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip().split("\n")[0]


def english_answers(row: dict) -> list[str]:
    return [a for a in row["answers"] if a.isascii()] + row.get("answers_en", [])


def check(answer, rows: list[dict], show: bool = False, either_language: bool = False) -> dict:
    """Per set: questions asked, answered correctly, and the replies; zh_either: Chinese questions answered in
    Chinese or in English. `answer(question, language)` is the model's reply; `either_language`: the Chinese
    questions put in English count their Chinese answers too."""
    sets = {
        "en": [(r["question"], "en", r["answers"]) for r in rows if r["language"] == "en"],
        "zh": [(r["question"], "zh", r["answers"]) for r in rows if r["language"] == "zh"],
        "zh_in_english": [(r["question_en"], "en", english_answers(r) + (r["answers"] if either_language else []))
                          for r in rows if r["language"] == "zh"],
    }
    figures: dict = {}
    for name, questions in sets.items():
        hits = []
        for n, (question, language, answers) in enumerate(questions, 1):
            reply = answer(question, language)
            hits.append(correct(reply, answers))
            if show and not hits[-1]:
                print(f"  {name}: {question} -> {reply!r}", flush=True)
            print(f"\r{name}: {n}/{len(questions)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        figures[name] = {"asked": len(hits), "correct": sum(hits), "hits": hits}
    figures["zh_either"] = sum(a or b for a, b in zip(figures["zh"]["hits"], figures["zh_in_english"]["hits"],
                                                                 strict=True))
    return figures


VALIDATION = ROOT / "chatbot" / "eval" / "factual_validation.jsonl"
ZH_SYSTEM = "你是一个乐于助人的助手。"


# The Chinese solved examples as the tuned model answers, in a full sentence.
SOLVED_ZH = ["葡萄牙的首都是里斯本。", "刚下的雪是白色的。", "钢琴有88个键。"]


def solved_turns(count: int) -> list[dict]:
    """The first `count` (at most 3) Chinese solved examples as earlier turns of the conversation."""
    turns = []
    for (question, _), answer in zip(SHOTS["zh"][:count], SOLVED_ZH[:count], strict=True):
        turns += [{"role": "user", "content": user_turn(question, "zh")}, {"role": "assistant", "content": answer}]
    return turns


PROMPTS = {"the app's": (DEFAULT_SYSTEM_PROMPT, 0), "Chinese system prompt": (ZH_SYSTEM, 0),
           "one solved example": (DEFAULT_SYSTEM_PROMPT, 1), "three solved examples": (DEFAULT_SYSTEM_PROMPT, 3)}


def prompt_table(engine, sets: dict[str, list[dict]]) -> list[str]:
    """A row per prompt of PROMPTS: the Chinese questions of each set answered correctly."""
    lines = [f"| {engine.name}, prompt | {' | '.join(sets)} |", "|---|" + "---|" * len(sets)]
    for name, (system, shots) in PROMPTS.items():
        cells = []
        for rows in sets.values():
            hits = sum(correct(ask(engine, r["question"], "zh", system=system, earlier=solved_turns(shots))[0],
                               r["answers"]) for r in rows)
            cells.append(f"{hits}/{len(rows)}")
        print(f"{name}: {', '.join(cells)}", file=sys.stderr, flush=True)
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gemma-3-270m",
                        help=f"comma-separated --model values (a base model, or {EMBEDDED_NAME} for SmolLM2)")
    parser.add_argument("--show", action="store_true", help="print the replies that missed")
    parser.add_argument("--chat", action="store_true",
                        help="tuned chat models, asked as the app asks (onnx, the default precision), not few-shot")
    parser.add_argument("--prompts", action="store_true",
                        help="tuned chat models asked the Chinese questions with other prompts (onnx, the default "
                             "precision), on the check and on its validation set")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    rows = read_jsonl(FACTUAL)
    if args.prompts and (args.chat or args.show or args.json):
        parser.error("--prompts prints its own table; it takes --models only")
    if args.prompts:
        sets = {"the check's Chinese questions": [r for r in rows if r["language"] == "zh"],
                "validation set (other facts)": read_jsonl(VALIDATION)}
        for spec in args.models.split(","):
            engine = load_engine(spec, "onnx", "cpu", precision=DEFAULT_PRECISION)
            print("\n" + "\n".join(prompt_table(engine, sets)))
            engine.close()
        return 0
    if any(r["language"] == "zh" and "question_en" not in r for r in rows):
        parser.error(f"{FACTUAL} has Chinese questions without question_en")
    results = {}
    for spec in args.models.split(","):
        if args.chat:
            engine = load_engine(spec, "onnx", "cpu", precision=DEFAULT_PRECISION)
            results[f"{engine.name} ({engine.backend})"] = check(
                lambda question, language, engine=engine: ask(engine, question, language)[0], rows, args.show,
                either_language=True)
            continue
        model, tokenizer, name = load_model(spec, device="cpu", dtype=torch.float32)
        model.eval()
        results[name] = check(lambda question, language, model=model, tokenizer=tokenizer:
                              complete(model, tokenizer, prompt(question, language)), rows, args.show)
    how = "as the app asks" if args.chat else "few-shot, untuned"
    print(f"\n| model, {how} | English questions | Chinese questions | the Chinese questions in English "
          "| Chinese questions answered in either |")
    print("|---|---|---|---|---|")
    for name, f in results.items():
        print(f"| {name} | {f['en']['correct']}/{f['en']['asked']} | {f['zh']['correct']}/{f['zh']['asked']} "
              f"| {f['zh_in_english']['correct']}/{f['zh_in_english']['asked']} "
              f"| {f['zh_either']}/{f['zh']['asked']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
