"""chatbot.routing: which messages the documents answer and which the model answers by itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatbot.routing import MAX_UNKNOWN, MIN_VOCABULARY, ROUTER, ROUTER_FILE, Router, decide, is_task, unknown_share
from chatbot.routing_fit import features, fit, messages, sent_to_documents
from knowledge.chunking import Chunk
from knowledge.lexical import LexicalIndex, tokenize
from knowledge.retriever import Hit

TEXTS = ["LoRA trains two small low-rank matrices.", "Dropout zeroes activations during training.",
         "困惑度等于平均交叉熵损失的指数。"]


def index(texts: list[str]) -> LexicalIndex:
    return LexicalIndex.of([tokenize(t) for t in texts], texts)


def hit(relevance: float, meaning: float | None = None) -> Hit:
    return Hit(Chunk("id", "a.md", "text"), relevance, relevance, meaning=meaning)


@pytest.mark.parametrize("text", [
    "Write a haiku about autumn leaves.", "Translate 'good morning' into Chinese.", "What is 17 * 23?",
    "Tell me a joke about penguins.", "写一句生日祝福。", "把“早上好”翻译成英文。", "十七乘以二十三等于多少？",
    "讲一个关于熊猫的笑话。", "帮我写封辞职信，语气客气一点", "算算离春节还有几天", "请帮我起草一条请假消息",
    "写一段开场白，周五之前发我", "帮我写个周报，写完以后再润色一下",
])
def test_tasks_are_recognised(text):
    assert is_task(text)


@pytest.mark.parametrize("text", [
    "Why are attention scores divided by the square root of the key dimension?", "What does LoRA train?",
    "注意力分数为什么要除以一个数？", "Summarize what the documents say about LoRA.",
    "根据文档，写一段关于困惑度的总结。",
    # a task verb's character opening another word: 编译器 (compiler), 编辑 (edit), 写后端 (writing a back end)
    "编译器会对没用到的函数给出警告吗？", "编辑密钥时可以删掉自签名吗？", "写后端接口时，怎样避免注入漏洞",
    # a task verb opening a clause of time or sequence: when writing, after writing
    "写代码时括号一多就看花眼，有没有办法直接跳到配对的那一个？", "写作业的时候能听音乐吗？", "写完代码以后怎么提交？",
    "讲课前需要准备哪些材料？",
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


def test_the_unknown_words_limit_is_the_question_languages():
    """English paraphrases use words a small corpus lacks: the same share of unknown words stops a Chinese question
    and not an English one, and a clearly foreign one stops both."""
    large = index(TEXTS * (MIN_VOCABULARY // len(TEXTS) + 1))
    english, chinese = "Why does LoRA train small matrices for my spider?", "困惑度等于指数吗？蜘蛛呢"
    for question in (english, chinese):
        assert MAX_UNKNOWN["zh"] <= unknown_share(question, large) < MAX_UNKNOWN["en"], question
    assert decide(english, [hit(0.4)], large, 0.35).kind == "documents"
    assert decide(chinese, [hit(0.4)], large, 0.35).reason == "unknown words"
    assert decide(english, [hit(0.4)], large, 0.35, max_unknown=0.5).reason == "unknown words"
    assert decide("Does LoRA training help a spider?", [hit(0.4)], large, 0.35).reason == "unknown words"


def test_the_router_asks_for_closeness_in_meaning_where_the_embedder_read_the_question():
    router = Router(meaning=10.0, words=20.0, bias=-12.0, threshold=0.5)  # documents when 10 c + 20 r >= 12
    small = index(TEXTS)
    question = "What does LoRA train?"
    assert decide(question, [hit(0.6, meaning=0.6)], small, 0.35, router=router).kind == "documents"
    # Relevance from shared words alone ("is it fewer people or less people"): far in meaning, not the documents.
    assert decide(question, [hit(0.5, meaning=0.1)], small, 0.35, router=router).reason == "irrelevant"
    assert decide(question, [hit(0.5, meaning=0.1)], small, 0.35, router=None).kind == "documents"
    # Where the embedder did not read the question (no closeness), relevance alone decides, as before the router.
    assert decide(question, [hit(0.5)], small, 0.35, router=router).kind == "documents"
    # The best closeness among the passages counts, whichever passage has it.
    assert decide(question, [hit(0.5, meaning=0.1), hit(0.4, meaning=0.7)], small, 0.35, router=router).kind \
        == "documents"


def test_the_router_is_a_logistic_regression_fitted_on_labelled_messages(tmp_path):
    rng = np.random.default_rng(0)
    # (relevance, closeness): document questions are close in meaning; other requests share words at best.
    questions = np.column_stack([rng.uniform(0.4, 0.8, 40), rng.uniform(0.4, 0.8, 40)])
    requests = np.column_stack([rng.uniform(0.35, 0.7, 40), rng.uniform(0.0, 0.3, 40)])
    router = fit(np.vstack([questions, requests]), np.array([True] * 40 + [False] * 40))
    assert router.meaning > 0 and router.answers(0.6, 0.6) and not router.answers(0.15, 0.6)
    router.write(tmp_path / "router.json", figures={})
    assert Router.read(tmp_path / "router.json") == router
    assert Router.read(tmp_path / "absent.json") is None


def test_the_shipped_router_is_loaded_and_keeps_its_recorded_document_questions():
    shipped = json.loads(ROUTER_FILE.read_text(encoding="utf-8"))
    recorded = shipped["figures"]
    assert ROUTER is not None and ROUTER == Router.read()
    for language in ("en", "zh"):
        row = recorded[f"document questions {language}"]
        if shipped.get("threshold_chosen", "").startswith("the highest"):
            assert row["with the router"] == row["relevance alone"] > 0
        else:  # a given threshold: README "The router" says what it gives up, at most one question in 50
            assert row["relevance alone"] > 0 and row["with the router"] >= 0.98 * row["relevance alone"]
        fresh = recorded[f"fresh {language}"]
        assert fresh["with the router"] < fresh["relevance alone"]


def test_the_shipped_router_reproduces_its_recorded_figures(embedder, tmp_path):
    """The bundled document questions it keeps and the fresh requests it lets through, as
    `python -m chatbot.routing_fit` recorded them (slow: the real embedder builds the bundled knowledge base)."""
    from chatbot.config import ChatConfig
    from knowledge.embedded import KnowledgeBase
    from knowledge.retriever import Retriever
    from knowledge.store import BUNDLED_CORPUS

    config = ChatConfig()
    rows = [r for r in messages() if r["set"] in ("document questions", "fresh")]
    kb = KnowledgeBase.open(tmp_path / "index")
    kb.add([BUNDLED_CORPUS], embedder, progress=False)
    table = features(Retriever(kb, embedder), rows, config.min_relevance, config.passages)
    recorded = json.loads(ROUTER_FILE.read_text(encoding="utf-8"))["figures"]
    for name in ("document questions", "fresh"):
        for language in ("en", "zh"):
            judged = table[:, 2] > 0
            mask = judged & np.array([r["set"] == name and r["language"] == language for r in rows])
            row = recorded[f"{name} {language}"]
            assert (sent_to_documents(None, table, mask), sent_to_documents(ROUTER, table, mask)) == \
                (row["relevance alone"], row["with the router"]), f"{name} {language}"
