"""Users' likes and dislikes, turned into fine-tuning data and regression dialogues.

The app appends one JSON line per rating to $CHATBOT_HOME/feedback.jsonl: the rating, the optional comment, the
conversation, the answer with its sources and mode, the model id, and the prompt the model saw. E-mail
addresses and phone numbers are redacted before anything is written.

    python -m chatbot.feedback export --sft liked.jsonl         # liked answers as `messages` training data
    python -m chatbot.feedback export --regress disliked.yaml   # disliked answers as dialogues to complete
    python -m chatbot.feedback export --sft a.jsonl --regress b.yaml --log other/feedback.jsonl

`python -m finetune train` accepts the first (JSONL, chat `messages`); `python -m chatbot.regress` runs the
second, which records each bad reply as `not_contains` with a comment asking a person to add what a good
answer must contain. Liked fixed replies that the safety check gives before any model runs (modes in FIXED_REPLIES:
the refusal, the crisis reply, the help lines) are not training data: a model taught them gives them to harmless
requests (README "Safety"), and the help lines' numbers are redacted in the log.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from common.paths import feedback_log

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# International (+86 138 0013 8000), Chinese mobile (13800138000), North American ((555) 123-4567) and
# other grouped numbers of 7+ digits; years and short numbers stay.
PHONE = re.compile(r"(?<![\w.])(?:\+\d{1,3}[\s-]?)?(?:\(\d{2,4}\)[\s-]?)?\d{2,4}(?:[\s-]?\d{3,4}){1,3}(?!\w|\.\d)")
MIN_PHONE_DIGITS = 7
FIXED_REPLIES = ("refused", "help")  # answers the safety check gives, not the model: never exported as training data


def redact(text: str) -> str:
    text = EMAIL.sub("[email]", text)
    return PHONE.sub(lambda m: "[phone]" if sum(c.isdigit() for c in m.group(0)) >= MIN_PHONE_DIGITS else m.group(0),
                     text)


def redact_all(value: Any) -> Any:
    """`redact` applied to every string inside nested lists and dicts."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_all(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    return value


class FeedbackLog:
    """Appends ratings to a JSONL file; safe to call from several request threads."""

    def __init__(self, path: Path | None = None):
        self.path = path or feedback_log()
        self._lock = threading.Lock()

    def record(self, liked: bool, comment: str, conversation: list[dict], answer: dict, model: str,
               prompt: list[dict] | None) -> dict:
        entry = redact_all({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rating": "like" if liked else "dislike",
                            "comment": comment.strip(), "model": model, "conversation": conversation,
                            "answer": answer, "prompt": prompt})
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return entry


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"no feedback log at {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sft_record(entry: dict) -> dict:
    """The prompt the model saw (or, for quoted and fixed answers, would have seen) plus the liked answer."""
    return {"messages": [*entry["prompt"], {"role": "assistant", "content": entry["answer"]["answer"]}]}


def regression_dialogue(entry: dict, number: int) -> dict:
    questions = [m["content"] for m in entry["conversation"] if m["role"] == "user"]
    turns = [{"user": q} for q in questions]
    note = f"Disliked on {entry['time']}" + (f": {entry['comment']}" if entry["comment"] else "")
    turns[-1]["expect"] = {"not_contains": [entry["answer"]["answer"]],
                           "comment": f"{note}. TODO: add what a good answer must contain (contains, cites, ...)."}
    return {"name": f"feedback {number}: {questions[-1][:60]}", "turns": turns}


def export(log: Path, sft: Path | None, regress: Path | None) -> tuple[int, int]:
    entries = read_log(log)
    liked = [e for e in entries if e["rating"] == "like" and e.get("prompt")
             and e["answer"].get("mode") not in FIXED_REPLIES]
    disliked = [e for e in entries if e["rating"] == "dislike"]
    if sft:
        sft.write_text("".join(json.dumps(sft_record(e), ensure_ascii=False) + "\n" for e in liked),
                       encoding="utf-8")
    if regress:
        document = {"name": "dialogues from disliked answers", "settings": {"index": "default"},
                    "dialogues": [regression_dialogue(e, i) for i, e in enumerate(disliked, 1)]}
        regress.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return len(liked), len(disliked)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatbot.feedback", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exporter = sub.add_parser("export", help="write liked answers as training data, disliked ones as dialogues")
    exporter.add_argument("--sft", type=Path, help="JSONL of liked conversations in the chat `messages` format")
    exporter.add_argument("--regress", type=Path, help="YAML regression dialogues from disliked answers")
    exporter.add_argument("--log", type=Path, default=None, help="feedback log (default: $CHATBOT_HOME/feedback.jsonl)")
    args = parser.parse_args(argv)
    if not args.sft and not args.regress:
        parser.error("give --sft FILE, --regress FILE or both")
    try:
        liked, disliked = export(args.log or feedback_log(), args.sft, args.regress)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.sft:
        print(f"{liked} liked conversation(s) -> {args.sft}")
    if args.regress:
        print(f"{disliked} disliked conversation(s) -> {args.regress}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
