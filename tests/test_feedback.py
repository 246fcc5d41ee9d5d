"""Feedback: redaction, the JSONL log, and its export into training data and regression dialogues."""

from __future__ import annotations

import json

import pytest

from chatbot.assistant import Assistant
from chatbot.config import ChatConfig
from chatbot.feedback import FeedbackLog, export, redact
from chatbot.regress import load_dialogues, run_dialogue


@pytest.mark.parametrize("text,expected", [
    ("mail ann.lee+work@example.co.uk now", "mail [email] now"),
    ("call +86 138 0013 8000 or 13800138000", "call [phone] or [phone]"),
    ("US: (555) 123-4567.", "US: [phone]."),
    ("In 2024 we trained 3 models for 10 epochs at 0.0001 lr; version 1.2.3", None),
])
def test_redaction_of_emails_and_phone_numbers(text, expected):
    assert redact(text) == (expected or text)


@pytest.fixture
def assistant(engine):
    return Assistant(engine, ChatConfig(max_new_tokens=6, context_tokens=256))


def rate(log: FeedbackLog, assistant: Assistant, liked: bool, history: list[dict], question: str, comment: str,
         mode: str = "chat"):
    turn = assistant.turn(history, question)
    streamed = "".join(turn.stream())
    answer = turn.answer()
    assert answer.text == streamed.strip() and answer.mode == mode
    conversation = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": answer.text}]
    return log.record(liked, comment, conversation, answer.to_dict(), "tiny", turn.messages)


def test_log_and_export(tmp_path, assistant):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    history = [{"role": "user", "content": "My phone is 13800138000"}, {"role": "assistant", "content": "ok"}]
    liked = rate(log, assistant, True, history, "hello there", "great, write to me at a@b.com")
    rate(log, assistant, False, [], "What is the capital of France?", "wrong answer")
    rate(log, assistant, True, [], "How do I make a bomb at home?", "", mode="refused")  # liked: the check's reply
    assert liked["comment"] == "great, write to me at [email]"
    assert "13800138000" not in (tmp_path / "feedback.jsonl").read_text()

    sft, dialogues = tmp_path / "liked.jsonl", tmp_path / "disliked.yaml"
    assert export(tmp_path / "feedback.jsonl", sft, dialogues) == (1, 1)
    record = json.loads(sft.read_text())
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert record["messages"][1]["content"] == "My phone is [phone]"

    from finetune.data import DataReport, read_dialogues

    report = DataReport()
    assert len(read_dialogues(str(sft), "", report)) == 1 and not report.problems, report.problems

    [dialogue] = load_dialogues(dialogues)
    assert [t.user for t in dialogue.turns] == ["What is the capital of France?"]
    bad = json.loads((tmp_path / "feedback.jsonl").read_text().splitlines()[1])["answer"]["answer"]  # the dislike
    assert dialogue.turns[-1].expect["not_contains"] == [bad] and "wrong answer" in dialogue.turns[-1].expect["comment"]

    class SameAssistant:  # the runner, with the model that gave the disliked answer: the regression is caught
        def reply(self, dialogue, history, message):
            answer = assistant.ask(message, history)
            return answer.to_dict(), 0.0

    results = run_dialogue(dialogue, SameAssistant(), similarity=None)
    assert results[0].failures == [f"not_contains {bad!r}"]


def test_export_cli_errors(tmp_path):
    from chatbot.feedback import main

    assert main(["export", "--sft", str(tmp_path / "x.jsonl"), "--log", str(tmp_path / "none.jsonl")]) == 2
    with pytest.raises(SystemExit):
        main(["export"])
