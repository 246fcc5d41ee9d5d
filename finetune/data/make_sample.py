"""Build the sample fine-tuning set: bilingual (English + Simplified Chinese) dialogues that teach the chat
model how this app wants it to behave.

Run from the repository root:

    python finetune/data/make_sample.py          # or .venv/bin/python finetune/data/make_sample.py

It reads the hand-written content in `finetune/data/sample_source.yaml` and writes two files, one conversation
per line: `finetune/data/sample_dialogues.jsonl` (training) and `finetune/data/sample_heldout.jsonl` (evaluation):

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

The held-out set shares no passage and no topic with the training set, so its figures measure questions over
documents the tuned model has never seen: every conversation about a topic in HELD_OUT_TOPICS is held out, and
distractor passages are drawn only from the conversation's own side of the split. Conversations that show no
passage (general questions, greetings, refusals) are held out by a seeded share per category and language.
`main` checks the written files for any shared passage, topic or question and fails if it finds one.
"""

from __future__ import annotations

import hashlib
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

from chatbot.grounding import cited_numbers  # noqa: E402
from chatbot.prompts import (  # noqa: E402
    DEFAULT_SYSTEM_PROMPT,
    NOT_COVERED,
    REFUSAL,
    Passage,
    shown_passages,
    user_turn,
)
from common.language import HAN, detect_language  # noqa: E402

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "sample_source.yaml"
OUTPUT = HERE / "sample_dialogues.jsonl"
HELD_OUT_OUTPUT = HERE / "sample_heldout.jsonl"
# Whole topics held out, in both languages: about 10% of the conversations, with enough topics (three) that a
# held-out question still gets distractor passages from another held-out topic.
HELD_OUT_TOPICS = frozenset({"history", "home", "pets"})
HELD_OUT_SHARE = 0.1  # of the conversations without passages, per category and language

CATEGORIES = ("grounded", "not_covered", "injection", "refusal", "smalltalk", "followup", "general")
LANGUAGES = ("en", "zh")
FIXED = {"not_covered": NOT_COVERED, "refusal": REFUSAL}
INJECTION_TOPIC = "injection"  # passages with planted instructions; never drawn as random distractors
OTHER_LANGUAGE_DISTRACTOR = 0.2  # chance that a distractor comes from the other language's documents
PLACEHOLDER = re.compile(r"\[@([A-Za-z0-9_]+)\]")


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


def choose_passages(turn: dict, language: str, passages: dict[str, dict], rng: random.Random,
                    side: str = "train") -> list[str]:
    """Keys of the passages this turn shows, in prompt order; distractors come from `side` of the split."""
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
                        and passage["topic"] != INJECTION_TOPIC and topic_side(passage["topic"]) == side)
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


def topic_side(topic: str) -> str:
    return "heldout" if topic in HELD_OUT_TOPICS else "train"


def listed_passages(conversation: dict) -> set[str]:
    """Keys of the passages a conversation names (relevant ones and shown near misses), not its distractors."""
    return {key for turn in conversation["turns"] for key in [*(turn.get("p") or []), *(turn.get("show") or [])]}


def assign_sides(conversations: list[dict], passages: dict[str, dict]) -> list[str]:
    """"train" or "heldout" for each conversation.

    A conversation goes with the topics of its passages; one whose passages are all planted instructions goes
    with the other conversations that show them; one without passages is held out by a seeded share of its
    category and language (the first questions' hashes order each group)."""
    sides: list[str | None] = []
    for conversation in conversations:
        topics = {passages[key]["topic"] for key in listed_passages(conversation)} - {INJECTION_TOPIC}
        found = {topic_side(topic) for topic in topics}
        if len(found) > 1:
            raise ValueError(f"conversation {conversation['turns'][0]['q']!r} mixes held-out and training topics "
                             f"{sorted(topics)}")
        sides.append(found.pop() if found else None)
    side_of_passage = {key: side for conversation, side in zip(conversations, sides, strict=True) if side
                       for key in listed_passages(conversation)}
    groups: dict[tuple[str, str], list[int]] = {}
    for index, conversation in enumerate(conversations):
        if sides[index] is not None:
            continue
        linked = {side_of_passage[key] for key in listed_passages(conversation) if key in side_of_passage}
        if linked:
            sides[index] = linked.pop()
        else:
            groups.setdefault((conversation["category"], conversation["lang"]), []).append(index)
    for members in groups.values():
        members.sort(key=lambda i: hashlib.sha256(str(conversations[i]["turns"][0]["q"]).encode()).hexdigest())
        held = round(HELD_OUT_SHARE * len(members))
        for rank, index in enumerate(members):
            sides[index] = "heldout" if rank < held else "train"
    return [side or "train" for side in sides]


def check_split(train: list[dict], heldout: list[dict], passages: dict[str, dict]) -> None:
    """Fail if the held-out records share a passage, a topic or a first question with the training records."""
    topic_of = {passage["text"].strip(): passage["topic"] for passage in passages.values()}

    def contents(records: list[dict]) -> tuple[set[str], set[str], set[str]]:
        texts = {p.text for record in records for message in record["messages"] if message["role"] == "user"
                 for p in shown_passages(message["content"])}
        questions = {record["messages"][1]["content"] for record in records}
        return texts, {topic_of[text] for text in texts} - {INJECTION_TOPIC}, questions

    (train_texts, train_topics, train_questions), (held_texts, held_topics, held_questions) = \
        contents(train), contents(heldout)
    for what, shared in (("passages", train_texts & held_texts), ("topics", train_topics & held_topics),
                         ("questions", train_questions & held_questions)):
        if shared:
            raise ValueError(f"the held-out set shares {len(shared)} {what} with the training set: "
                             f"{sorted(shared)[:3]}")


def render_reply(turn: dict, language: str, numbers: dict[str, int], relevant: list[str]) -> str:
    text = str(turn.get("a") or "").strip()
    if cited_numbers(text):
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


def build(conversation: dict, passages: dict[str, dict], side: str = "train") -> tuple[dict, list[int]]:
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
            keys = choose_passages(turn, language, passages, rng, side)
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
            shown_numbers = {passage.number for passage in shown_passages(message["content"])}
        else:
            cited = set(cited_numbers(message["content"]))
            assert cited <= shown_numbers, f"cites {cited - shown_numbers}, not among this turn's passages"
            has_han = bool(HAN.search(message["content"]))
            assert has_han == (language == "zh"), f"reply not in {language}: {message['content']!r}"


def main() -> None:
    passages, conversations = load_source(SOURCE)
    sides = assign_sides(conversations, passages)
    records: dict[str, list[dict]] = {"train": [], "heldout": []}
    by_category: Counter[tuple[str, str, str]] = Counter()
    multi_turn: Counter[str] = Counter()
    positions: Counter[int] = Counter()
    seen_questions: set[tuple[str, ...]] = set()
    for conversation, side in zip(conversations, sides, strict=True):
        record, cited = build(conversation, passages, side)
        check(record, conversation["lang"])
        questions = tuple(str(turn["q"]).strip() for turn in conversation["turns"])
        if questions in seen_questions:
            raise ValueError(f"duplicate conversation: {questions}")
        seen_questions.add(questions)
        records[side].append(record)
        by_category[conversation["category"], conversation["lang"], side] += 1
        if len(conversation["turns"]) > 1:
            multi_turn[conversation["lang"]] += 1
        positions.update(cited)
    check_split(records["train"], records["heldout"], passages)
    for side, path in (("train", OUTPUT), ("heldout", HELD_OUT_OUTPUT)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[side]), encoding="utf-8")
        print(f"wrote {len(records[side])} conversations to {path.relative_to(ROOT)}")

    total = len(conversations)
    print(f"{'category':<12}{'train en':>9}{'zh':>5}{'held-out en':>13}{'zh':>5}")
    for category in CATEGORIES:
        counts = [by_category[category, language, side] for side in ("train", "heldout") for language in LANGUAGES]
        print(f"{category:<12}{counts[0]:>9}{counts[1]:>5}{counts[2]:>13}{counts[3]:>5}")
    zh_total = sum(v for (_, language, _), v in by_category.items() if language == "zh")
    print(f"total {total} (Chinese {zh_total / total:.0%}); held-out topics: {', '.join(sorted(HELD_OUT_TOPICS))}")
    print(f"multi-turn conversations: {sum(multi_turn.values())} (en {multi_turn['en']}, zh {multi_turn['zh']})")
    print("cited passage positions: " + ", ".join(f"[{n}] {positions[n]}" for n in sorted(positions)))
    shown = {p.text for side in records.values() for r in side for m in r["messages"] if m["role"] == "user"
             for p in shown_passages(m["content"])}
    print(f"passages written: {len(passages)}, shown at least once: {len(shown)}")


if __name__ == "__main__":
    main()
