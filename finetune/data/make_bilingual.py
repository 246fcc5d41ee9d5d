"""Build the bilingual fine-tuning set that teaches a base model (Gemma 3 270M) to chat in English and Chinese the
way this app serves it. Run from the repository root:

    python finetune/data/make_bilingual.py

It reads the hand-written records in `finetune/data/bilingual/*.jsonl`, one per line:

    {"kind": "chat", "language": "zh", "topic": "cooking-rice", "turns": [{"user": ..., "assistant": ...}, ...]}
    {"kind": "grounded", "language": "en", "topic": "hr-leave", "passages": [{"label": ..., "text": ...}, ...],
     "question": ..., "answer": ...}

and adds the sample dialogues (`finetune/data/sample_dialogues.jsonl`) but those in which the assistant gives the
app's refusal or crisis reply (`chatbot.prompts.REFUSAL`, `SELF_HARM`): the safety check, which runs before the model,
decides what is refused. (Until 2026-12-07 the set also taught those replies to 64 harmful and self-harm requests; the
model then gave the refusal to 12% of the Chinese benign test requests of the safety data that the check let through,
see README, "A bilingual model".) Among the records, `lookalike_*.jsonl` answers one request of each benign intent of
the safety data's training split (look-alikes and everyday requests that sound harmful: a wake, a scam warning, a
game boss); the safety data's test split is other intents. It writes `finetune/data/bilingual_train.jsonl` and
`finetune/data/bilingual_heldout.jsonl`, one `{"messages": [...]}` conversation per line, rendered as the app renders
them: the system prompt first, earlier turns as the user typed them, the last user turn through
`chatbot.prompts.user_turn` (the reply-language line, or the numbered passages for a grounded question).

The held-out set is whole topics (HELD_OUT_SHARE of each file's topics, chosen by a hash of the topic's name), so no
paraphrase of a held-out question is trained on; `main` fails if a question or passage is on both sides.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections import Counter
from collections.abc import Iterable
from difflib import SequenceMatcher
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chatbot.prompts import DEFAULT_SYSTEM_PROMPT, Passage, gives_refusal, shown_passages, user_turn  # noqa: E402
from common.language import letters  # noqa: E402

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "bilingual"
TRAIN = HERE / "bilingual_train.jsonl"
HELD_OUT = HERE / "bilingual_heldout.jsonl"
SAMPLE = HERE / "sample_dialogues.jsonl"
HELD_OUT_SHARE = 0.08
# The app's own evaluation sets: a training request that is one of theirs, or nearly (SequenceMatcher ratio of the
# letters and digits), is dropped, so benchmarks/models.py and benchmarks/quality.py measure unseen requests
# (and benchmarks/base_knowledge.py --prompts chooses on unseen ones).
EVALUATION = [ROOT / "chatbot/eval/everyday.jsonl", ROOT / "chatbot/eval/factual.jsonl",
              ROOT / "chatbot/eval/factual_validation.jsonl"]
SAME_REQUEST = 0.9


def held_out(topic: str) -> bool:
    return int(hashlib.sha1(topic.encode()).hexdigest()[:8], 16) / 2**32 < HELD_OUT_SHARE


def chat_messages(record: dict) -> list[dict]:
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
    turns = record["turns"]
    for number, turn in enumerate(turns, 1):
        # As served: only the current question carries the reply-language line; history is what the user typed.
        user = user_turn(turn["user"], record["language"]) if number == len(turns) else turn["user"]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": turn["assistant"]}]
    return messages


def grounded_messages(record: dict) -> list[dict]:
    passages = [Passage(number, p["label"], p["text"]) for number, p in enumerate(record["passages"], 1)]
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": user_turn(record["question"], record["language"], passages)},
            {"role": "assistant", "content": record["answer"]}]


def check(record: dict, where: str) -> None:
    if record.get("language") not in ("en", "zh") or not record.get("topic"):
        raise ValueError(f"{where}: needs language en|zh and a topic")
    if record.get("kind") == "chat":
        if not record.get("turns") or any(not t.get("user", "").strip() or not t.get("assistant", "").strip()
                                          for t in record["turns"]):
            raise ValueError(f"{where}: a chat record needs turns with user and assistant text")
    elif record.get("kind") == "grounded":
        if not record.get("passages") or not record.get("question") or not record.get("answer"):
            raise ValueError(f"{where}: a grounded record needs passages, question and answer")
    else:
        raise ValueError(f"{where}: unknown kind {record.get('kind')!r}")


def written() -> list[tuple[dict, str]]:
    """(record, source file stem) for every hand-written record."""
    records = []
    for path in sorted(SOURCES.glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                check(record, f"{path.name}:{number}")
                records.append((record, path.stem))
    return records


def refuses(messages: list[dict]) -> bool:
    """The assistant gives the app's refusal or crisis reply (alone or with a suggestion after it) in the dialogue."""
    return any(m["role"] == "assistant" and gives_refusal(m["content"]) for m in messages)


def evaluated() -> list[str]:
    rows = [json.loads(line) for path in EVALUATION for line in path.read_text(encoding="utf-8").splitlines()]
    return [letters(row.get("text") or row["question"]) for row in rows]


def asks_an_evaluated_request(asked: Iterable[str], tested: list[str]) -> bool:
    return any(SequenceMatcher(None, letters(q), t).ratio() >= SAME_REQUEST for q in asked for t in tested)


def questions(messages: list[dict]) -> set[str]:
    return {m["content"] for m in messages if m["role"] == "user"}


def main() -> int:
    train, held = [], []
    counts: Counter[tuple[str, str, str]] = Counter()
    tested, dropped = evaluated(), []
    for record, source in written():
        asked = [t["user"] for t in record["turns"]] if record["kind"] == "chat" else [record["question"]]
        if asks_an_evaluated_request(asked, tested):
            dropped.append(record)
            continue
        messages = chat_messages(record) if record["kind"] == "chat" else grounded_messages(record)
        side = "held-out" if held_out(f"{source}/{record['topic']}") else "train"
        (held if side == "held-out" else train).append(messages)
        counts[side, source, record["language"]] += 1
    sample = [json.loads(line)["messages"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    refusing = sum(map(refuses, sample))
    sample = [m for m in sample if not refuses(m)]
    kept = [m for m in sample if not asks_an_evaluated_request(questions(m), tested)]
    dropped += [{"kind": "chat", "turns": [{"user": next(iter(questions(m)))}]} for m in sample if m not in kept]
    sample = kept
    train += sample
    counts["train", "sample_dialogues", "en+zh"] += len(sample)
    # A question written in two files under different topics ("What can you do?"), or a passage shown under two
    # topics, is trained on, not held out.
    seen = set().union(*(questions(m) for m in train))
    shown = {p.text for m in train for u in questions(m) for p in shown_passages(u)}

    def shared(messages: list[dict]) -> bool:
        return bool(questions(messages) & seen) or any(p.text in shown for u in questions(messages)
                                                       for p in shown_passages(u))

    moved = [m for m in held if shared(m)]
    held = [m for m in held if not shared(m)]
    train += moved
    random.Random(0).shuffle(train)
    for path, dialogues in ((TRAIN, train), (HELD_OUT, held)):
        path.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in dialogues),
                        encoding="utf-8")
    for key, count in sorted(counts.items()):
        print(f"{key[0]:9} {key[1]:18} {key[2]:6} {count:5}")
    print(f"{len(dropped)} records ask what the evaluation sets ask and were dropped:",
          "; ".join((r["turns"][0]["user"] if r["kind"] == "chat" else r["question"])[:40] for r in dropped))
    print(f"{refusing} sample dialogues with the app's refusal or crisis reply left out (the safety check refuses)")
    print(f"{len(moved)} dialogues of held-out topics ask or show what training does: trained on")
    print(f"wrote {len(train)} training dialogues to {TRAIN.name} and {len(held)} held-out to {HELD_OUT.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
