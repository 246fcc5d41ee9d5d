"""A conversation turn: prompt assembly, language instruction, answer record and timings."""

from __future__ import annotations

import pytest

from chatbot.assistant import Assistant
from chatbot.config import ChatConfig
from chatbot.prompts import DEFAULT_SYSTEM_PROMPT
from tests.tiny import slow_down


@pytest.fixture
def assistant(engine):
    return Assistant(engine, ChatConfig(max_new_tokens=8, context_tokens=256))


def test_turn_builds_system_history_and_question(assistant):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]
    turn = assistant.turn(history, "  What is the capital of France?  ")
    assert turn.messages == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert turn.language == "en"


def test_chinese_question_asks_for_a_chinese_reply(assistant):
    turn = assistant.turn([], "法国的首都是哪里？")
    assert turn.language == "zh"
    assert "Simplified Chinese" in turn.messages[-1]["content"]


def test_answer_has_text_language_and_timings(assistant):
    answer = assistant.ask("hello")
    data = answer.to_dict()
    assert set(data) == {"answer", "sources", "language", "mode", "timings", "query", "usage", "answered_by"}
    assert data["answered_by"] == assistant.engine.name
    assert data["mode"] == "chat" and data["query"] is None
    assert data["sources"] == []
    assert 0 <= data["timings"]["first_token_s"] <= data["timings"]["total_s"]


def test_empty_question_is_rejected(assistant):
    with pytest.raises(ValueError, match="empty"):
        assistant.turn([], "   ")


def test_requests_are_bounded_before_any_work(assistant, monkeypatch):
    from chatbot.assistant import InputError

    monkeypatch.setattr("chatbot.assistant.classify", lambda *a: pytest.fail("checked after the bounds"))
    with pytest.raises(InputError, match="at most 8,000"):
        assistant.turn([], "x" * 8001)
    with pytest.raises(InputError, match="不正确"):
        assistant.turn({"role": "user"}, "你好")
    with pytest.raises(InputError, match="message 2 is longer"):
        assistant.turn([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 9000}], "hi")


def test_an_answer_is_cut_off_at_the_time_limit(engine):
    calls = slow_down(engine.model, 0.05)  # 50 ms a token, so a 10 ms limit ends generation within a token or two
    Assistant(engine, ChatConfig(max_new_tokens=40, context_tokens=512)).ask("hello")
    unlimited, calls[:] = len(calls), []
    Assistant(engine, ChatConfig(max_new_tokens=40, context_tokens=512, time_limit=0.01)).ask("hello")
    assert unlimited > 5 and len(calls) <= 3, (unlimited, len(calls))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        ChatConfig(temperature=-1)
    with pytest.raises(ValueError, match="context_tokens"):
        ChatConfig(max_new_tokens=512, context_tokens=256)
