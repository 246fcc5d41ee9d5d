"""Build the sample fine-tuning set: bilingual (English + Simplified Chinese) dialogues that teach the chat
model how this app wants it to behave.

Run from the repository root:

    python finetune/data/make_sample.py          # or .venv/bin/python finetune/data/make_sample.py

It reads the hand-written content in `finetune/data/sample_source.yaml` and writes
`finetune/data/sample_dialogues.jsonl`, one conversation per line:

    {"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, {"role": "assistant", ...}, ...]}

Every conversation starts with `DEFAULT_SYSTEM_PROMPT`; every user turn is rendered with `user_turn` exactly
as the app renders the current turn (with its retrieved passages, or without any when there was no
retrieval). Behaviours covered: grounded answers with [n] citations, "not covered" replies, ignoring
instructions planted in passages, refusing harmful requests, small talk, and multi-turn follow-ups.

The source YAML is a stream of documents, each with optional `passages` (key -> topic, label, text) and
`conversations`. A conversation has `category`, `lang` ("en" | "zh") and `turns`; a turn has
  q      the user's question as typed,
  p      keys of the passages that answer it (cited in `a` as [@key], replaced here by their number),
  show   keys of passages that are shown but must not be cited (near misses, planted instructions),
  n      how many passages the turn shows (the rest are distractors from other topics),
  avoid  topics no distractor may come from,
  fixed  "not_covered" | "refusal": the reply starts with NOT_COVERED / REFUSAL in the turn's language,
  a      the reply (or, with `fixed`, an optional sentence after the fixed text).
A turn with none of p, show, n has no retrieval. Passage order and distractors are drawn from a random
generator seeded by the conversation's first question, so the output is deterministic.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `chatbot` importable
    sys.path.insert(0, str(ROOT))

from chatbot.language import detect_language  # noqa: E402
from chatbot.prompts import DEFAULT_SYSTEM_PROMPT, NOT_COVERED, REFUSAL, Passage, user_turn  # noqa: E402

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "sample_source.yaml"
OUTPUT = HERE / "sample_dialogues.jsonl"

CATEGORIES = ("grounded", "not_covered", "injection", "refusal", "smalltalk", "followup", "general")
LANGUAGES = ("en", "zh")
FIXED = {"not_covered": NOT_COVERED, "refusal": REFUSAL}
INJECTION_TOPIC = "injection"  # passages with planted instructions; never drawn as random distractors
OTHER_LANGUAGE_DISTRACTOR = 0.2  # chance that a distractor comes from the other language's documents
PLACEHOLDER = re.compile(r"\[@([A-Za-z0-9_]+)\]")
CITATION = re.compile(r"\[(\d+)\]")
HAN = re.compile(r"[\u4e00-\u9fff]")


def load_source(path: Path) -> tuple[dict[str, dict], list[dict]]:
    passages: dict[str, dict] = {}
    conversations: list[dict] = []
    for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if not document:
            continue
        for key, passage in (document.get("passages") or {}).items():
            if key in passages:
                raise ValueError(f"passage {key!r} is defined twice")
            for field in ("topic", "label", "text"):
                if not str(passage.get(field) or "").strip():
                    raise ValueError(f"passage {key!r} has no {field}")
            passage["lang"] = "zh" if HAN.search(passage["text"]) else "en"
            passages[key] = passage
        conversations.extend(document.get("conversations") or [])
    return passages, conversations


def passage_language(passage: dict) -> str:
    return passage["lang"]


def choose_passages(turn: dict, language: str, passages: dict[str, dict], rng: random.Random) -> list[str]:
    """Keys of the passages this turn shows, in prompt order."""
    relevant = list(turn.get("p") or [])
    shown = list(turn.get("show") or [])
    chosen = relevant + shown
    for key in chosen:
        if key not in passages:
            raise ValueError(f"unknown passage {key!r} in turn {turn['q']!r}")
    count = turn.get("n") or max(rng.choice((2, 3)), len(chosen) + (1 if relevant else 0))
    if count < len(chosen):
        raise ValueError(f"turn {turn['q']!r}: n={count} is fewer than its listed passages")
    banned_topics = {passages[key]["topic"] for key in chosen} | set(turn.get("avoid") or [])
    candidates = sorted(key for key, passage in passages.items()
                        if key not in chosen and passage["topic"] not in banned_topics
                        and passage["topic"] != INJECTION_TOPIC)
    while len(chosen) < count:
        other = "en" if language == "zh" else "zh"
        want = other if rng.random() < OTHER_LANGUAGE_DISTRACTOR else language
        pool = [key for key in candidates if passage_language(passages[key]) == want and key not in chosen]
        pool = pool or [key for key in candidates if key not in chosen]
        if not pool:
            raise ValueError(f"no distractor left for turn {turn['q']!r}")
        taken_topics = {passages[key]["topic"] for key in chosen}
        varied = [key for key in pool if passages[key]["topic"] not in taken_topics]
        chosen.append(rng.choice(varied or pool))
    rng.shuffle(chosen)
    return chosen


def render_reply(turn: dict, language: str, numbers: dict[str, int], relevant: list[str]) -> str:
    text = str(turn.get("a") or "").strip()
    if CITATION.search(text):
        raise ValueError(f"write citations as [@key], not numbers: {text!r}")
    used = set(PLACEHOLDER.findall(text))
    if used - set(relevant):
        raise ValueError(f"reply cites passages that are not relevant in this turn: {used - set(relevant)}")
    if set(relevant) - used:
        raise ValueError(f"relevant passages never cited in {text!r}: {set(relevant) - used}")
    text = PLACEHOLDER.sub(lambda m: f"[{numbers[m.group(1)]}]", text)
    fixed = turn.get("fixed")
    if fixed:
        head = FIXED[fixed][language]
        text = head if not text else head + ("" if language == "zh" else " ") + text
    if not text:
        raise ValueError(f"empty reply to {turn['q']!r}")
    return text


def build(conversation: dict, passages: dict[str, dict]) -> tuple[dict, list[int]]:
    """The JSONL record of one conversation, and the prompt positions of the passages its replies cite."""
    category, language = conversation["category"], conversation["lang"]
    if category not in CATEGORIES or language not in LANGUAGES:
        raise ValueError(f"bad category or language: {category!r}, {language!r}")
    turns = conversation["turns"]
    rng = random.Random(f"{language}:{turns[0]['q']}")
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
    cited_positions: list[int] = []
    detected = "en"
    for turn in turns:
        question = str(turn["q"]).strip()
        # The app picks the reply language like this (a short message keeps the previous one); the data must
        # agree with it, or the model would learn from prompts it never gets.
        detected = detect_language(question, default=detected)
        if detected != language:
            raise ValueError(f"{question!r} is detected as {detected!r}, not {language!r}; rephrase it")
        retrieval = any(field in turn for field in ("p", "show", "n"))
        if retrieval:
            keys = choose_passages(turn, language, passages, rng)
            numbers = {key: index for index, key in enumerate(keys, start=1)}
            shown = [Passage(numbers[key], passages[key]["label"], passages[key]["text"]) for key in keys]
            content = user_turn(question, language, shown)
        else:
            numbers, content = {}, user_turn(question, language)
        relevant = list(turn.get("p") or [])
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": render_reply(turn, language, numbers, relevant)})
        cited_positions.extend(numbers[key] for key in relevant)
    return {"messages": messages}, cited_positions


def check(record: dict, language: str) -> None:
    """The checks every written line must pass."""
    messages = record["messages"]
    assert messages[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    rest = messages[1:]
    assert rest and len(rest) % 2 == 0, "the conversation must end with an assistant reply"
    shown_numbers: set[int] = set()
    for index, message in enumerate(rest):
        assert message["role"] == ("user" if index % 2 == 0 else "assistant"), "roles must alternate"
        assert message["content"].strip(), "empty message"
        if message["role"] == "user":
            shown_numbers = {int(n) for n in re.findall(r"^\[(\d+)\] ", message["content"], flags=re.M)}
        else:
            cited = {int(n) for n in CITATION.findall(message["content"])}
            assert cited <= shown_numbers, f"cites {cited - shown_numbers}, not among this turn's passages"
            has_han = bool(HAN.search(message["content"]))
            assert has_han == (language == "zh"), f"reply not in {language}: {message['content']!r}"


def main() -> None:
    passages, conversations = load_source(SOURCE)
    records: list[str] = []
    by_category: Counter[tuple[str, str]] = Counter()
    multi_turn: Counter[str] = Counter()
    positions: Counter[int] = Counter()
    used_passages: set[str] = set()
    seen_questions: set[tuple[str, ...]] = set()
    for conversation in conversations:
        record, cited = build(conversation, passages)
        check(record, conversation["lang"])
        questions = tuple(str(turn["q"]).strip() for turn in conversation["turns"])
        if questions in seen_questions:
            raise ValueError(f"duplicate conversation: {questions}")
        seen_questions.add(questions)
        records.append(json.dumps(record, ensure_ascii=False))
        by_category[conversation["category"], conversation["lang"]] += 1
        if len(conversation["turns"]) > 1:
            multi_turn[conversation["lang"]] += 1
        positions.update(cited)
        for message in record["messages"]:
            if message["role"] == "user":
                used_passages.update(key for key, passage in passages.items()
                                     if f'\n"""\n{passage["text"].strip()}\n"""' in message["content"])
    OUTPUT.write_text("\n".join(records) + "\n", encoding="utf-8")

    total = len(records)
    print(f"wrote {total} conversations to {OUTPUT.relative_to(ROOT)}")
    print(f"{'category':<12}{'en':>6}{'zh':>6}{'all':>6}")
    for category in CATEGORIES:
        en, zh = by_category[category, "en"], by_category[category, "zh"]
        print(f"{category:<12}{en:>6}{zh:>6}{en + zh:>6}  ({(en + zh) / total:.0%})")
    en_total = sum(v for (_, lang), v in by_category.items() if lang == "en")
    zh_total = total - en_total
    print(f"{'total':<12}{en_total:>6}{zh_total:>6}{total:>6}  (Chinese {zh_total / total:.0%})")
    print(f"multi-turn conversations: {sum(multi_turn.values())} (en {multi_turn['en']}, zh {multi_turn['zh']})")
    print("cited passage positions: " + ", ".join(f"[{n}] {positions[n]}" for n in sorted(positions)))
    print(f"passages written: {len(passages)}, shown at least once: {len(used_passages)}")


if __name__ == "__main__":
    main()
