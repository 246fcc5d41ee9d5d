"""The web UI in a real browser (headless Chromium driven by Playwright): ask, see sources, rate, upload.

Needs Debian's chromium (`apt-get install chromium`, done by .ci/run) and the playwright package; skipped
with the reason when either is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app import build_app
from chatbot.assistant import Assistant
from chatbot.config import ChatConfig
from chatbot.feedback import FeedbackLog
from chatbot.hf_engine import TransformersEngine as Engine
from chatbot.models import ModelProfile
from chatbot.regress import load_dialogues
from knowledge.embedded import KnowledgeBase
from knowledge.retriever import Retriever
from tests.docs import write_docs
from tests.test_app import free_port
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-dev.txt)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium")
# As root and offline: no sandbox, and none of Chromium's background calls home.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
MESSAGE_BOX = "Type a message and press Enter · 输入消息后按回车"


@pytest.fixture
def page(tokenizer, tmp_path, embedder):
    KnowledgeBase.open(tmp_path / "index").add([write_docs(tmp_path / "docs")], embedder, progress=False)
    engine = Engine(tiny_model(tokenizer), tokenizer, "tiny", 512, ModelProfile(chat=("en",), grounded=()))
    assistant = Assistant(engine, ChatConfig(max_new_tokens=8, context_tokens=512),
                          Retriever(KnowledgeBase.open(tmp_path / "index"), embedder))
    demo = build_app(assistant, FeedbackLog(tmp_path / "feedback.jsonl"))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        tab = browser.new_page(viewport={"width": 1200, "height": 1100})
        tab.goto(f"http://127.0.0.1:{port}/")
        yield tab
        browser.close()
    demo.close()


def ask(page, question: str) -> None:
    box = page.get_by_placeholder(MESSAGE_BOX)
    box.fill(question)
    box.press("Enter")


def test_answer_with_sources_and_a_dislike_with_comment(page, tmp_path):
    ask(page, "困惑度怎么计算？")
    answer = page.locator("[data-testid=bot]").first
    answer.wait_for()
    page.get_by_text("Sources · 来源").first.wait_for()
    assert "困惑度等于平均交叉熵损失的指数" in answer.inner_text() and "[1]" in answer.inner_text()
    page.get_by_text("Sources · 来源").first.click()
    page.get_by_text("zh/困惑度.md").first.wait_for()  # the expanded box names the cited file

    page.get_by_placeholder("Optional comment", exact=False).fill("Too short. Mail me at ann@example.com")
    page.get_by_role("button", name="Dislike", exact=True).first.click()
    page.get_by_text("Thanks for the feedback", exact=False).wait_for()
    entries = [json.loads(line) for line in (tmp_path / "feedback.jsonl").read_text().splitlines()]
    assert len(entries) == 1
    assert entries[0]["rating"] == "dislike" and entries[0]["comment"] == "Too short. Mail me at [email]"
    assert entries[0]["answer"]["sources"][0]["source"] == "zh/困惑度.md"
    assert entries[0]["conversation"][0] == {"role": "user", "content": "困惑度怎么计算？"}


def test_liked_and_disliked_answers_become_training_data_and_a_dialogue(page, tmp_path, tiny_model_dir):
    """The feedback loop end to end: rate in the browser, export, fine-tune on it, run it as a regression."""
    ask(page, "How does LoRA work?")
    page.get_by_text("Sources · 来源").first.wait_for()
    page.get_by_role("button", name="Like", exact=True).first.click()
    page.get_by_text("Thanks for the feedback", exact=False).wait_for()
    page.get_by_role("button", name="New conversation · 新对话").click()
    ask(page, "中文怎么算BLEU？")
    page.get_by_text("Sources · 来源").first.wait_for()
    page.get_by_placeholder("Optional comment", exact=False).fill("should say to segment with jieba")
    page.get_by_role("button", name="Dislike", exact=True).first.click()
    page.get_by_text("Thanks for the feedback", exact=False).wait_for()
    entries = [json.loads(line) for line in (tmp_path / "feedback.jsonl").read_text().splitlines()]
    assert [(e["rating"], e["conversation"][0]["content"]) for e in entries] == [
        ("like", "How does LoRA work?"), ("dislike", "中文怎么算BLEU？")], "a new conversation starts afresh"

    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    export = subprocess.run([sys.executable, "-m", "chatbot.feedback", "export", "--log",
                             str(tmp_path / "feedback.jsonl"), "--sft", str(tmp_path / "liked.jsonl"),
                             "--regress", str(tmp_path / "disliked.yaml")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr
    train = subprocess.run([sys.executable, "-m", "finetune", "train", "--data", str(tmp_path / "liked.jsonl"),
                            "--model", str(tiny_model_dir), "--eval-fraction", "0", "--max-steps", "1",
                            "--output-dir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    [dialogue] = load_dialogues(tmp_path / "disliked.yaml")
    assert dialogue.turns[0].user == "中文怎么算BLEU？"
    assert "should say to segment with jieba" in dialogue.turns[0].expect["comment"]


def test_upload_a_document_then_ask_about_it(page, tmp_path):
    document = tmp_path / "upload" / "garden.md"
    document.parent.mkdir()
    document.write_text("# Garden\n\nTomatoes need six hours of direct sunlight every day.")
    page.get_by_role("tab", name="Knowledge base · 知识库").click()
    page.locator("input[type=file][multiple]").set_input_files(str(document))
    page.get_by_role("button", name="Add to the knowledge base · 加入知识库").click()
    playwright.expect(page.get_by_label("Status")).to_have_value(re.compile(r"^1 added"), timeout=60_000)
    page.get_by_text("garden.md").first.wait_for()  # listed in the table
    page.get_by_role("tab", name="Chat · 聊天").click()
    ask(page, "How many hours of sunlight do tomatoes need?")
    page.get_by_text("six hours of direct sunlight", exact=False).first.wait_for()


def test_an_over_long_message_is_refused_in_the_page_and_never_answered(page):
    ask(page, "长" * 9000)
    page.get_by_text("消息太长：共 9,000 个字符", exact=False).first.wait_for(timeout=10_000)
    assert page.locator("[data-testid=bot]").count() == 0, "the validator stops it before the model is asked"
    ask(page, "困惑度怎么计算？")  # and the page goes on working
    page.get_by_text("Sources · 来源").first.wait_for()
