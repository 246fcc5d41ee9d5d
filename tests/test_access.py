"""Who may change the shared knowledge base: everyone locally; on a deployment others can reach, only an admin —
checked on the server, so a direct HTTP call that bypasses the page is refused too (tried here)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from app import Access, ChatApp, build_app
from chatbot.assistant import Assistant
from chatbot.config import ChatConfig
from chatbot.feedback import FeedbackLog
from chatbot.hf_engine import TransformersEngine as Engine
from knowledge.embedded import KnowledgeBase
from knowledge.retriever import Retriever
from tests.docs import DOCS, write_docs
from tests.test_app import free_port, launched
from tests.tiny import TinyEmbedder, tiny_model


@pytest.fixture
def serve(tokenizer, tmp_path):
    KnowledgeBase.open(tmp_path / "index").add([write_docs(tmp_path / "docs")], TinyEmbedder(), progress=False)
    demos = []

    def start(access: Access):
        assistant = Assistant(Engine(tiny_model(tokenizer), tokenizer, "tiny", 256),
                              ChatConfig(max_new_tokens=4, context_tokens=256),
                              Retriever(KnowledgeBase.open(tmp_path / "index"), TinyEmbedder()))
        demo = build_app(assistant, FeedbackLog(tmp_path / "feedback.jsonl"), access)
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        demos.append(demo)
        functions = {fn.fn.__name__: i for i, fn in enumerate(demo.fns.values()) if fn.fn}
        return assistant, f"http://127.0.0.1:{port}/gradio_api", functions

    yield start
    for demo in demos:
        demo.close()


def call(base: str, fn_index: int, data: list, session: str) -> dict:
    """What a script would send instead of the page: join the queue for a function by number, read the result."""
    joined = httpx.post(f"{base}/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                     "event_data": None, "trigger_id": None})
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", f"{base}/queue/data", params={"session_hash": session}, timeout=60) as events:
        for line in events.iter_lines():
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                return message
    raise AssertionError("no result")


def test_a_visitor_cannot_change_a_public_knowledge_base_even_by_direct_http_calls(serve, tmp_path):
    assistant, base, functions = serve(Access(public=True, password="s3cret"))
    removed = call(base, functions["remove"], [["zh/隐私.md"]], "visitor")
    assert not removed["success"] and "Only an admin" in removed["output"]["error"]
    sent = httpx.post(f"{base}/upload", files={"files": ("new.md", b"# New\n\nA document a visitor adds.")})
    uploaded = {"path": sent.json()[0], "orig_name": "new.md", "meta": {"_type": "gradio.FileData"}}
    added = call(base, functions["upload"], [[uploaded]], "visitor")
    assert not added["success"] and "Only an admin" in str(added["output"].get("error")), added
    assert sorted(assistant.retriever.kb.sources) == sorted(DOCS)

    wrong = call(base, functions["login"], ["guess"], "visitor")
    assert "Wrong password" in wrong["output"]["data"][0]
    assert not call(base, functions["remove"], [["zh/隐私.md"]], "visitor")["success"]
    assert "Signed in as admin" in call(base, functions["login"], ["s3cret"], "admin")["output"]["data"][0]
    assert call(base, functions["remove"], [["zh/隐私.md"]], "admin")["success"]
    assert "zh/隐私.md" not in assistant.retriever.kb.sources
    assert not call(base, functions["remove"], [["zh/早停.md"]], "visitor")["success"], "per session"


def test_locally_everyone_may_change_it(serve):
    assistant, base, functions = serve(Access(public=False))
    assert call(base, functions["remove"], [["zh/隐私.md"]], "anyone")["success"]
    assert "zh/隐私.md" not in assistant.retriever.kb.sources
    assert "login" not in functions, "no sign-in where none is needed"


def test_who_is_an_admin(monkeypatch):
    for variable in ("SPACE_ID", "CHATBOT_ADMINS", "CHATBOT_ADMIN_PASSWORD"):
        monkeypatch.delenv(variable, raising=False)
    assert Access.from_environment("127.0.0.1") == Access(public=False, requests_per_minute=0)
    public = Access.from_environment("0.0.0.0")
    assert public.public and public.requests_per_minute == 20, "reachable by others: limits and no admin"
    assert Access.from_environment("0.0.0.0", requests_per_minute=0).requests_per_minute == 0
    monkeypatch.setenv("SPACE_ID", "someone/chatbot")
    monkeypatch.setenv("CHATBOT_ADMINS", "alice, bob")
    access = Access.from_environment("127.0.0.1")
    assert access.public and access.admins == {"alice", "bob"} and access.password is None
    app = ChatApp(None, None, access)
    request = SimpleNamespace(session_hash="s")
    assert app.is_admin(request, SimpleNamespace(username="alice"))
    assert not app.is_admin(request, SimpleNamespace(username="mallory")) and not app.is_admin(request, None)


def test_each_session_may_send_only_so_many_messages_a_minute(engine):
    from gradio_client import Client

    demo = build_app(Assistant(engine, ChatConfig(max_new_tokens=4, context_tokens=256)),
                     access=Access(requests_per_minute=2))
    with launched(demo) as url:
        first, second = Client(url, verbose=False), Client(url, verbose=False)
        for _ in range(2):
            assert first.predict("hello", [], api_name="/chat")["mode"] == "chat"
        with pytest.raises(Exception, match="at most 2 a minute"):
            first.predict("hello", [], api_name="/chat")
        assert second.predict("hello", [], api_name="/chat")["mode"] == "chat", "another session is not limited"


def test_uploads_are_limited_on_the_server(serve):
    assistant, base, functions = serve(Access(max_upload_files=2, max_upload_mb=0.001))

    def upload(*files: tuple[str, bytes]) -> dict:
        paths = httpx.post(f"{base}/upload", files=[("files", f) for f in files]).json()
        data = [{"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}
                for path, (name, _) in zip(paths, files, strict=True)]
        return call(base, functions["upload"], [data], "admin")

    small = b"# Note\n\nShort."
    assert "At most 2 files" in upload(("a.md", small), ("b.md", small), ("c.md", small))["output"]["error"]
    refused = upload(("tool.exe", b"MZ"))["output"]["error"]  # Gradio's own check of file_types comes first
    assert "Invalid file type" in refused or "not a supported type" in refused
    assert "larger than 0.001 MB" in upload(("big.md", b"x" * 2000))["output"]["error"]
    assert upload(("a.md", small))["success"] and "a.md" in assistant.retriever.kb.sources
