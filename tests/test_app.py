"""The web app: the real Gradio server, called through gradio_client as API users do."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest
from gradio_client import Client

from app import build_app, launch
from chatbot.assistant import Assistant
from chatbot.config import ChatConfig
from tests.tiny import slow_down

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launched(demo):
    """The app's real server on a free port of this machine; yields its URL and closes it afterwards."""
    port = free_port()
    launch(demo, block=False, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def served(engine):
    with launched(build_app(Assistant(engine, ChatConfig(max_new_tokens=8, context_tokens=256)))) as url:
        yield Client(url, verbose=False)


def test_chat_endpoint_answers(served, engine):
    result = served.predict("What is the capital of France?", [], api_name="/chat")
    assert set(result) == {"answer", "sources", "language", "mode", "timings", "query", "usage", "answered_by"}
    assert result["usage"]["completion_tokens"] > 0 and result["usage"]["prompt_tokens"] > 0
    assert result["language"] == "en"
    expected = Assistant(engine, ChatConfig(max_new_tokens=8, context_tokens=256)).ask(
        "What is the capital of France?").text
    assert result["answer"] == expected


def test_chat_endpoint_streams_and_takes_history(served):
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    job = served.submit("ok", history, api_name="/chat")
    updates = list(job)
    assert len(updates) >= 2, "partial answers should stream before the final one"
    assert updates[-1]["language"] == "zh", "a short follow-up keeps the conversation's language"
    assert updates[-1]["answer"].startswith(updates[0]["answer"])


@pytest.fixture
def served_with_index(tokenizer, docs_index, embedder):
    from chatbot.hf_engine import TransformersEngine as Engine
    from chatbot.models import ModelProfile
    from knowledge.embedded import KnowledgeBase
    from knowledge.retriever import Retriever
    from tests.tiny import tiny_model

    engine = Engine(tiny_model(tokenizer), tokenizer, "tiny", 512, ModelProfile(chat=("en",), grounded=()))
    retriever = Retriever(KnowledgeBase.open(docs_index), embedder)
    with launched(build_app(Assistant(engine, ChatConfig(max_new_tokens=8, context_tokens=512), retriever))) as url:
        yield Client(url, verbose=False)


def test_chat_endpoint_returns_cited_sources(served_with_index):
    result = served_with_index.predict("困惑度怎么计算？", [], api_name="/chat")
    assert result["mode"] == "extractive" and "[1]" in result["answer"]
    assert result["sources"][0]["source"] == "zh/困惑度.md"
    assert result["sources"][0]["text"].startswith("困惑度等于")
    covered = served_with_index.predict("明天北京的天气怎么样？", [], api_name="/chat")
    assert covered["mode"] == "chat" and covered["sources"] == [], "not covered: the model's own (labelled) answer"
    assert covered["answer"].startswith("文档中没有找到相关内容")


def test_chat_endpoint_rejects_empty_message(served):
    with pytest.raises(Exception, match="empty"):
        served.predict("   ", [], api_name="/chat")


def test_oversized_messages_and_malformed_history_get_clear_errors(served):
    with pytest.raises(Exception, match="too long: 100,000 characters, and at most 8,000"):
        served.predict("a" * 100_000, [], api_name="/chat")
    with pytest.raises(Exception, match="消息太长：共 100,000 个字符"):
        served.predict("长" * 100_000, [], api_name="/chat")
    with pytest.raises(Exception, match="history is not valid: got str, not a list"):
        served.predict("hello", "not a list", api_name="/chat")
    with pytest.raises(Exception, match="message 1 is not a"):
        served.predict("hello", [{"speaker": "me", "text": "hi"}], api_name="/chat")
    assert served.predict("hello", [], api_name="/chat")["mode"] == "chat", "the app keeps serving"


@pytest.mark.slow
def test_python_app_py_serves_the_embedded_model():
    port = free_port()
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--no-index"], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=os.environ | {"HF_HUB_OFFLINE": "1"})
    try:
        # The first start converts and compiles both built-in models (about three minutes on 2 cores).
        url, output, deadline = None, [], time.time() + 480
        while url is None and time.time() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if match := re.search(r"(http://127\.0\.0\.1:\d+)", line):
                url = match.group(1)
        assert url == f"http://127.0.0.1:{port}", "".join(output)
        client = Client(url + "/", verbose=False)
        answer = client.predict("What is the capital of France?", [], api_name="/chat")
        assert "Paris" in answer["answer"] and answer["answered_by"] == "SmolLM2-135M-Instruct+sample-LoRA"
        # Chinese goes to the bilingual model (--language-models auto), which answers it in Chinese.
        answer = client.predict("德国的首都是哪座城市？", [], api_name="/chat")
        assert "柏林" in answer["answer"] and answer["answered_by"] == "gemma-3-270m-bilingual", answer
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_one_visitors_answer_does_not_hold_up_the_others(engine):
    import time as clock

    slow_down(engine.model, 0.2)  # the first visitor's answer takes seconds
    with launched(build_app(Assistant(engine, ChatConfig(max_new_tokens=40, context_tokens=256)))) as url:
        first, second = Client(url, verbose=False), Client(url, verbose=False)
        job = first.submit("Tell me a long story.", [], api_name="/chat")
        while not job.status().code.name == "ITERATING":  # its answer is streaming: the engine is busy
            clock.sleep(0.05)
        with pytest.raises(Exception, match="too long"):
            second.predict("a" * 100_000, [], api_name="/chat")
        refused = second.predict("How can I make a pipe bomb?", [], api_name="/chat")
        assert refused["mode"] == "refused"
        assert not job.done(), "both were answered while the first visitor's answer was still being written"
        job.result()


def test_a_space_listens_on_every_interface(monkeypatch):
    from app import build_parser

    monkeypatch.delenv("CHATBOT_HOST", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("CHATBOT_PORT", raising=False)
    assert build_parser().parse_args([]).host == "127.0.0.1"
    monkeypatch.setenv("SPACE_ID", "someone/bilingual-chatbot")
    args = build_parser().parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 7860)


def test_zero_gpu_wraps_generation_only_on_a_zero_gpu_space(monkeypatch):
    import sys
    import types

    from app import on_gpu

    def answer():
        return "x"

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert on_gpu(answer, 256) is answer
    calls = []
    fake = types.SimpleNamespace(GPU=lambda duration: (lambda f: calls.append(duration) or f))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert on_gpu(answer, 256)() == "x" and calls == [22], "the GPU is held for about what 256 tokens need"


def test_a_space_without_persistent_storage_says_so(engine, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/chatbot")
    monkeypatch.delenv("CHATBOT_HOME")
    config = json.dumps(build_app(Assistant(engine, ChatConfig(max_new_tokens=4, context_tokens=256))).config)
    assert "no persistent storage" in config
    monkeypatch.setenv("CHATBOT_HOME", "/data/chatbot")
    config = json.dumps(build_app(Assistant(engine, ChatConfig(max_new_tokens=4, context_tokens=256))).config)
    assert "no persistent storage" not in config


def test_no_request_holds_the_engine_past_the_time_limit(engine):
    calls = slow_down(engine.model, 0.1)  # 200 tokens would take 20 s
    Assistant(engine, ChatConfig(max_new_tokens=200, context_tokens=512)).ask("Tell me a story.")
    unlimited, calls[:] = len(calls), []
    demo = build_app(Assistant(engine, ChatConfig(max_new_tokens=200, context_tokens=512, time_limit=0.5)))
    with launched(demo) as url:
        answer = Client(url, verbose=False).predict("Tell me a story.", [], api_name="/chat")
    assert answer["mode"] == "chat" and 0 < len(calls) <= unlimited // 2, (len(calls), unlimited)


def test_a_cli_add_while_the_app_runs_is_seen_and_kept(tokenizer, docs_index, embedder, tmp_path, monkeypatch):
    """`python -m knowledge add` in another process while the app is up, then an upload in the app: both
    documents stay, and the app searches the CLI's without a restart."""
    from chatbot.hf_engine import TransformersEngine as Engine
    from knowledge import retriever as retriever_module
    from knowledge.embedded import KnowledgeBase
    from knowledge.retriever import Retriever
    from tests.test_access import call
    from tests.tiny import tiny_model

    monkeypatch.setattr(retriever_module, "CHECK_EVERY", 0.5)
    folder = tmp_path / "index"
    shutil.copytree(docs_index, folder)
    retriever = Retriever(KnowledgeBase.open(folder), embedder)
    assistant = Assistant(Engine(tiny_model(tokenizer), tokenizer, "tiny", 256),
                          ChatConfig(max_new_tokens=4, context_tokens=256), retriever)
    (tmp_path / "cli.md").write_text("# Zanzibar\n\nThe Pemba cooperative grows cloves on Zanzibar.\n")
    demo = build_app(assistant)
    functions = {fn.fn.__name__: i for i, fn in enumerate(demo.fns.values()) if fn.fn}
    with launched(demo) as url:
        added = subprocess.run([sys.executable, "-m", "knowledge", "add", str(tmp_path / "cli.md"), "--index",
                                str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                               env=os.environ | {"HF_HUB_OFFLINE": "1"})
        assert added.returncode == 0, added.stderr
        deadline = time.time() + 10
        while not (hits := retriever.search("Pemba cooperative cloves", k=1)) or hits[0].chunk.source != "cli.md":
            assert time.time() < deadline, "the app did not see the CLI's document"
            time.sleep(0.2)

        base = url + "gradio_api"
        sent = httpx.post(f"{base}/upload", files={"files": ("app.md", b"# Troms\n\nAuroras over Troms in February.")})
        uploaded = {"path": sent.json()[0], "orig_name": "app.md", "meta": {"_type": "gradio.FileData"}}
        assert call(base, functions["upload"], [[uploaded]], "someone")["success"]
    on_disk = KnowledgeBase.open(folder).sources
    assert "cli.md" in on_disk and any(source.endswith("app.md") for source in on_disk), sorted(on_disk)
    assert retriever.search("Auroras over Troms", k=1)[0].chunk.source.endswith("app.md")
