"""Language detection: deterministic, with rules for short and mixed CJK input."""

from __future__ import annotations

import pytest

from chatbot.assistant import conversation_language
from common.language import detect_language


@pytest.mark.parametrize("text,code", [
    ("What is the capital of France?", "en"),
    ("How do I stop a model from over-fitting its training data?", "en"),
    ("法国的首都是哪里？", "zh"),
    ("你好", "zh"),
    ("用LoRA微调", "zh"),
    ("什么是 retrieval-augmented generation？", "zh"),
    ("Quelle est la capitale de la France et pourquoi ?", "fr"),
    ("日本の首都はどこですか", "ja"),
    ("한국의 수도는 어디입니까", "ko"),
])
def test_detects_language(text, code):
    assert detect_language(text) == code


def test_short_latin_text_keeps_the_default():
    assert detect_language("ok", default="zh") == "zh"
    assert detect_language("12345 !!", default="en") == "en"


def test_detection_is_deterministic():
    text = "Das ist ein kurzer deutscher Satz über Sprachmodelle."
    assert {detect_language(text) for _ in range(20)} == {"de"}


def test_a_short_follow_up_keeps_the_conversation_language():
    history = [{"role": "user", "content": "什么是过拟合？"}, {"role": "assistant", "content": "..."}]
    assert conversation_language(history, "ok") == "zh"
    assert conversation_language(history, "And what about dropout in neural networks?") == "en"


def test_english_sentence_quoting_chinese_stays_english():
    assert detect_language("How do you say 你好 in English, and what does it mean?") == "en"
