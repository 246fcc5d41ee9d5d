"""chatbot.routing: which messages the documents answer and which the model answers by itself."""

from __future__ import annotations

import pytest

from chatbot.routing import MIN_VOCABULARY, decide, is_task, unknown_share
from knowledge.chunking import Chunk
from knowledge.lexical import LexicalIndex, tokenize
from knowledge.retriever import Hit

TEXTS = ["LoRA trains two small low-rank matrices.", "Dropout zeroes activations during training.",
         "困惑度等于平均交叉熵损失的指数。"]


def index(texts: list[str]) -> LexicalIndex:
    return LexicalIndex.of([tokenize(t) for t in texts], texts)


def hit(relevance: float) -> Hit:
    return Hit(Chunk("id", "a.md", "text"), relevance, relevance)


@pytest.mark.parametrize("text", [
    "Write a haiku about autumn leaves.", "Translate 'good morning' into Chinese.", "What is 17 * 23?",
    "Tell me a joke about penguins.", "写一句生日祝福。", "把“早上好”翻译成英文。", "十七乘以二十三等于多少？",
    "讲一个关于熊猫的笑话。", "帮我写封辞职信，语气客气一点", "算算离春节还有几天", "请帮我起草一条请假消息",
])
def test_tasks_are_recognised(text):
    assert is_task(text)


@pytest.mark.parametrize("text", [
    "Why are attention scores divided by the square root of the key dimension?", "What does LoRA train?",
    "注意力分数为什么要除以一个数？", "Summarize what the documents say about LoRA.",
    "根据文档，写一段关于困惑度的总结。",
    # a task verb's character opening another word: 编译器 (compiler), 编辑 (edit), 写后端 (writing a back end)
    "编译器会对没用到的函数给出警告吗？", "编辑密钥时可以删掉自签名吗？", "写后端接口时，怎样避免注入漏洞",
])
def test_questions_and_requests_about_the_documents_are_not_tasks(text):
    assert not is_task(text)


def test_unknown_share_weighs_words_the_documents_never_use():
    lexical = index(TEXTS)
    assert unknown_share("What does LoRA train?", lexical) == 0.0
    assert unknown_share("How many legs does a spider have?", lexical) == 1.0
    assert 0 < unknown_share("Does LoRA help a spider?", lexical) < 1


def test_the_documents_answer_only_when_every_signal_agrees():
    small, large = index(TEXTS), index(TEXTS * (MIN_VOCABULARY // len(TEXTS) + 1))
    assert decide("What does LoRA train?", [hit(0.8)], small, 0.35).kind == "documents"
    assert decide("Write a poem about LoRA.", [hit(0.8)], small, 0.35).reason == "task"
    assert decide("What does LoRA train?", [], small, 0.35).reason == "irrelevant"
    assert decide("What does LoRA train?", [hit(0.3)], small, 0.35).reason == "irrelevant"
    spider = "How many legs does a spider have, LoRA?"
    assert decide(spider, [hit(0.4)], large, 0.35).reason == "unknown words"
    assert decide(spider, [hit(0.4)], small, 0.35).kind == "documents", "a small collection's vocabulary is narrow"
    assert decide(spider, [hit(0.6)], large, 0.35).kind == "documents", "a clearly relevant passage is trusted"
