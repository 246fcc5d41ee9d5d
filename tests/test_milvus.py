"""The Milvus store on Milvus Lite (an embedded `.db` file, as `--milvus-uri ./kb.db` runs it): the same operations
as the embedded store, through the store itself, the retriever, the CLI and the app's real server."""

from __future__ import annotations

import json

import httpx
import pytest

from knowledge.embedder import EMBEDDED_NAME
from knowledge.milvus import MilvusStore
from knowledge.retriever import Retriever
from knowledge.store import IndexError_, bundled_sources, default_collection, open_store
from tests.docs import DOCS, write_docs
from tests.test_retriever import run_cli
from tests.tiny import TinyEmbedder


def texts(store: MilvusStore, query: str) -> list[str]:
    return [hit.chunk.text for hit in store.search(query, None, 10, "lexical")]


def test_build_add_change_remove_and_search(tmp_path, docs, tiny_embedder):
    uri = str(tmp_path / "kb.db")
    with pytest.raises(IndexError_, match="has no collection"):
        MilvusStore.open(uri, create=False)
    report = open_store(None, uri).add([docs], tiny_embedder, progress=False)
    assert sorted(report.added) == ["lora.md", "rag.md"] and report.chunks == 3

    store = MilvusStore.open(uri, create=False)
    assert store.embedder_name == "tiny-hash" and {s: m["chunks"] for s, m in store.sources.items()} == {
        "lora.md": 2, "rag.md": 1}
    assert sorted(store.add([docs], tiny_embedder, progress=False).unchanged) == ["lora.md", "rag.md"]
    (docs / "lora.md").write_text("# LoRA\n\nLoRA freezes the base weights.\n\n## Size\n\nAdapters are tiny.")
    embedded: list[str] = []

    class Counting:  # the same vectors, and a record of which texts needed them
        name, dimension = tiny_embedder.name, tiny_embedder.dimension

        def encode(self, texts, **options):
            embedded.extend(texts)
            return tiny_embedder.encode(texts)

    assert store.add([docs], Counting(), progress=False).updated == ["lora.md"]
    assert embedded == ["LoRA › Size\nAdapters are tiny."], "the unchanged chunk of the changed file keeps its vector"
    assert texts(store, "adapters tiny") == ["Adapters are tiny."], "the old version of a changed file is gone"
    assert len(store) == 3 and store.lexical.df("lora") == 2 and store.lexical.df("adapter") == 1

    retriever = Retriever(MilvusStore.open(uri), tiny_embedder, "*")
    fused = retriever.search("LoRA base weights", k=2)
    assert fused[0].chunk.source == "lora.md" and fused[0].chunk.heading == "LoRA" and 0 < fused[0].relevance <= 1
    assert fused[0].dense is not None, "the cosine of a fused hit comes back with it"
    assert retriever.search("检索 回答", k=1, mode="lexical")[0].chunk.source == "rag.md"
    assert retriever.search("LoRA", k=1, mode="dense")[0].dense > 0
    assert store.remove(["lora.md", "nope.md"]) == ["lora.md"]
    assert texts(store, "LoRA weights") == [] and list(MilvusStore.open(uri).sources) == ["rag.md"]
    assert retriever.kb.reload() and list(retriever.kb.sources) == ["rag.md"], "another copy sees the removal"


def test_build_replaces_and_the_embedder_is_kept(tmp_path, docs, tiny_embedder):
    uri = str(tmp_path / "kb.db")
    open_store(None, uri).add([docs], tiny_embedder, progress=False)
    open_store(None, uri, fresh=True).add([docs / "rag.md"], tiny_embedder, progress=False)
    assert list(MilvusStore.open(uri).sources) == ["rag.md"], "build replaces the collection"

    class Other:
        name, dimension = "other-embedder", 64
        encode = tiny_embedder.encode

    with pytest.raises(IndexError_, match="built with the embedder 'tiny-hash'"):
        MilvusStore.open(uri).add([docs / "lora.md"], Other(), progress=False)


def test_a_default_collection_filled_with_minilm_is_refilled_once_unless_the_user_changed_it(tmp_path, capsys):
    class OldDefault(TinyEmbedder):  # stands in for all-MiniLM-L6-v2, the default embedder before bilingual
        name = EMBEDDED_NAME

    untouched, changed = str(tmp_path / "untouched.db"), str(tmp_path / "changed.db")
    for uri in (untouched, changed):
        default_collection(uri, "knowledge", embedder=OldDefault())
    assert "Filling" in capsys.readouterr().err
    MilvusStore.open(changed).remove(["en/lora.md"])
    default_collection(untouched, "knowledge", embedder=TinyEmbedder())
    assert "Refilling" in capsys.readouterr().err
    refilled = MilvusStore.open(untouched, create=False)
    assert refilled.embedder_name == TinyEmbedder.name and set(refilled.sources) == bundled_sources()
    default_collection(untouched, "knowledge", embedder=TinyEmbedder())
    assert capsys.readouterr().err == "", "once"
    default_collection(changed, "knowledge", embedder=TinyEmbedder())
    assert "rebuilds it with tiny-hash" in capsys.readouterr().err
    kept = MilvusStore.open(changed, create=False)
    assert kept.embedder_name == EMBEDDED_NAME and "en/lora.md" not in kept.sources, "what the user did is kept"


@pytest.mark.slow
def test_the_cli_on_milvus_lite(tmp_path):
    docs = write_docs(tmp_path / "docs")
    uri = str(tmp_path / "kb.db")
    built = run_cli("build", str(docs), "--milvus-uri", uri)
    assert built.returncode == 0 and "6 added" in built.stdout, built.stderr
    hits = json.loads(run_cli("search", "困惑度怎么计算？", "--milvus-uri", uri, "--k", "2", "--json").stdout)
    assert len(hits) == 2 and hits[0]["source"] == "zh/困惑度.md"
    listed = json.loads(run_cli("list", "--milvus-uri", uri, "--json").stdout)
    assert sorted(row["source"] for row in listed) == sorted(DOCS)
    assert run_cli("remove", "zh/困惑度.md", "--milvus-uri", uri).returncode == 0
    stats = json.loads(run_cli("stats", "--milvus-uri", uri, "--json").stdout)
    assert stats["chunks"] == 5 and stats["store"] == "milvus"
    missing = run_cli("search", "x", "--milvus-uri", str(tmp_path / "none.db"))
    assert missing.returncode == 2 and "has no collection" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_the_app_answers_uploads_and_removes_on_milvus(tokenizer, embedder, tmp_path):
    from app import build_app
    from chatbot.assistant import Assistant
    from chatbot.config import ChatConfig
    from chatbot.hf_engine import TransformersEngine as Engine
    from chatbot.models import ModelProfile
    from tests.test_access import call
    from tests.test_app import launched
    from tests.tiny import tiny_model

    uri = str(tmp_path / "kb.db")
    open_store(None, uri).add([write_docs(tmp_path / "docs")], embedder, progress=False)
    engine = Engine(tiny_model(tokenizer), tokenizer, "tiny", 512, ModelProfile(chat=("en",), grounded=()))
    assistant = Assistant(engine, ChatConfig(max_new_tokens=8, context_tokens=512),
                          Retriever.open(None, milvus_uri=uri))
    demo = build_app(assistant)
    functions = {fn.fn.__name__: i for i, fn in enumerate(demo.fns.values()) if fn.fn}
    with launched(demo) as url:
        base = url + "gradio_api"
        answer = call(base, functions["chat"], ["困惑度怎么计算？", []], "someone")["output"]["data"][0]
        assert answer["sources"] and answer["sources"][0]["source"] == "zh/困惑度.md", answer
        sent = httpx.post(f"{base}/upload", files={"files": ("app.md", b"# Troms\n\nAuroras over Troms in February.")})
        uploaded = {"path": sent.json()[0], "orig_name": "app.md", "meta": {"_type": "gradio.FileData"}}
        assert call(base, functions["upload"], [[uploaded]], "someone")["success"]
        source = next(s for s in MilvusStore.open(uri).sources if s.endswith("app.md"))
        assert assistant.retriever.search("Auroras over Troms", k=1)[0].chunk.source == source
        assert call(base, functions["remove"], [[source]], "someone")["success"]
    assert source not in MilvusStore.open(uri).sources
