"""Dialogue data for fine-tuning: reading and checking JSONL, the train/eval split, tokenisation.

Accepted records, one JSON object per line (the last two are converted to the first):

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}          ShareGPT
    {"instruction": "...", "input": "...", "output": "..."}                                 Alpaca

A dialogue is an optional system message, then user and assistant messages in turn, ending with the assistant.
Every problem (invalid UTF-8 or JSON, an unknown role, a wrong turn order, empty content, a dialogue too long
for max_length) is reported as `file:line: what`; with skip_invalid the record is skipped and counted instead.
Tokenisation goes through `chatbot.chat_format.render_conversation`, the function serving shares.

Tested by tests/test_finetune_data.py.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from chatbot.chat_format import ROLES, Message, render_conversation
from chatbot.prompts import shown_passages

SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
IGNORE = -100  # the label of tokens that carry no loss (what transformers' loss functions skip)


class DataError(ValueError):
    """Bad training data; the message is one line naming the file and line."""


@dataclass
class Dialogue:
    messages: list[Message]
    source: str  # "file.jsonl:12", for messages about it


@dataclass
class DataReport:
    """What happened to the records on the way to training, for the log and metrics.json."""
    records: int = 0
    problems: list[str] = field(default_factory=list)  # "file:line: kind: details"
    kinds: Counter[str] = field(default_factory=Counter)  # problems by kind ("unknown role", "too long" ...)
    truncated: int = 0  # dialogues that lost their last turns to max_length
    shared_passages: int = 0  # passages shown in both training and held-out prompts (the figures would flatter)
    tokens: int = 0
    loss_tokens: int = 0

    def problem(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")
        self.kinds[what.split(":")[0]] += 1

    def counts(self) -> dict[str, int]:
        return {"records": self.records, "skipped": len(self.problems), "truncated": self.truncated,
                "shared_passages": self.shared_passages,
                "tokens": self.tokens, "loss_tokens": self.loss_tokens} | dict(self.kinds)


def to_messages(record: object, system_prompt: str) -> list[Message]:
    """The messages of one record in any accepted format; ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("invalid record: expected a JSON object")
    if "messages" in record:
        messages = _message_list(record["messages"], "messages", "role", "content", {r: r for r in ROLES})
    elif "conversations" in record:
        messages = _message_list(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    elif "instruction" in record and "output" in record:
        prompt = "\n\n".join(str(record[k]).strip() for k in ("instruction", "input") if str(record.get(k) or ""))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"])}]
    else:
        raise ValueError("invalid record: expected `messages`, `conversations` or `instruction` + `output`")
    if system_prompt and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    check_messages(messages)
    return messages


def _message_list(items: object, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[Message]:
    if not isinstance(items, list) or not items:
        raise ValueError(f"invalid record: `{key}` must be a non-empty list")
    messages = []
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict) or not isinstance(item.get(text_key), str):
            raise ValueError(f"invalid record: message {number} needs a string `{text_key}`")
        if item.get(role_key) not in roles:
            raise ValueError(f"unknown role: message {number} has {role_key} {item.get(role_key)!r} "
                             f"(expected {', '.join(roles)})")
        messages.append({"role": roles[item[role_key]], "content": item[text_key]})
    return messages


def check_messages(messages: Sequence[Message]) -> None:
    """Raise ValueError unless: optional system first, then user/assistant alternating, assistant last."""
    for number, message in enumerate(messages, 1):
        if not message["content"].strip():
            raise ValueError(f"empty content: message {number} ({message['role']}) is empty")
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for number, message in enumerate(messages[start:], start + 1):
        expected = "user" if (number - start) % 2 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"wrong turn order: message {number} is {message['role']}, expected {expected} "
                             "(an optional system message, then user and assistant in turn)")
    if len(messages) == start or messages[-1]["role"] != "assistant":
        raise ValueError("wrong turn order: the dialogue must end with an assistant message")


def read_dialogues(path: str, system_prompt: str, report: DataReport) -> list[Dialogue]:
    """The valid dialogues of a JSONL file; each bad line adds a "file:line: what" to report.problems."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file {path} does not exist")
    dialogues = []
    for number, raw in enumerate(file.read_bytes().splitlines(), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            report.records += 1
            report.problem(where, f"invalid UTF-8: byte {err.start + 1} of the line")
            continue
        if not line.strip():
            continue
        report.records += 1
        try:
            dialogues.append(Dialogue(to_messages(json.loads(line), system_prompt), where))
        except json.JSONDecodeError as err:
            report.problem(where, f"invalid JSON: {err.msg} at column {err.colno}")
        except ValueError as err:
            report.problem(where, str(err))
    return dialogues


def check_problems(report: DataReport, skip_invalid: bool) -> None:
    """Fail on the first problem unless skipping; when skipping, list what was skipped."""
    if not report.problems:
        return
    if not skip_invalid:
        more = len(report.problems) - 1
        raise DataError(report.problems[0] + (f" (and {more} more problems)" if more else "")
                        + "; fix the data or pass --skip-invalid to skip bad records")
    for problem in report.problems[:20]:
        print(f"skipped {problem}")
    if len(report.problems) > 20:
        print(f"... and {len(report.problems) - 20} more skipped records")


def split(dialogues: list[Dialogue], fraction: float, seed: int) -> tuple[list[Dialogue], list[Dialogue]]:
    """(train, eval): a seeded random `fraction` held out, at least one dialogue when fraction > 0."""
    if fraction <= 0:
        return list(dialogues), []
    order = list(range(len(dialogues)))
    random.Random(seed).shuffle(order)
    count = max(1, round(fraction * len(dialogues)))
    if count >= len(dialogues):
        raise DataError(f"{len(dialogues)} dialogues are too few to hold out {fraction:.0%} for evaluation")
    held = set(order[:count])
    return ([d for i, d in enumerate(dialogues) if i not in held], [d for i, d in enumerate(dialogues) if i in held])


def passages_shown(dialogues: Sequence[Dialogue]) -> set[str]:
    """Texts of the retrieved passages that the dialogues' user turns show (the serving prompt's format)."""
    return {passage.text for dialogue in dialogues for message in dialogue.messages if message["role"] == "user"
            for passage in shown_passages(message["content"])}


def write_dialogues(dialogues: Sequence[Dialogue], path: Path) -> None:
    lines = [json.dumps({"messages": d.messages}, ensure_ascii=False) for d in dialogues]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def tokenize(dialogues: Sequence[Dialogue], tokenizer: PreTrainedTokenizerBase, max_length: int,
             report: DataReport) -> list[dict[str, list[int]]]:
    """Training examples {"input_ids", "labels"}: labels are the ids on assistant tokens, IGNORE elsewhere.

    A dialogue longer than max_length keeps its whole turns up to the last reply that ends within it (a reply
    cut in half would teach the model to stop mid-sentence); one whose first reply does not fit is a problem.
    """
    examples = []
    for dialogue in dialogues:
        ids, mask = render_conversation(tokenizer, dialogue.messages)
        if len(ids) > max_length:
            ends = [i + 1 for i in range(max_length) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
            if not ends:
                report.problem(dialogue.source, f"too long: {len(ids)} tokens, and its first reply does not "
                                                f"end within max_length {max_length}")
                continue
            report.truncated += 1
            ids, mask = ids[:ends[-1]], mask[:ends[-1]]
        report.tokens += len(ids)
        report.loss_tokens += sum(mask)
        examples.append({"input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]})
    return examples
