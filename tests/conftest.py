"""Shared fixtures: a tiny random chat model (fast, offline) and an isolated app data folder."""

from __future__ import annotations

import pytest

from chatbot.engine import Engine
from chatbot.models import models_dir
from tests.tiny import save_tiny_model, tiny_model, tiny_tokenizer


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
    """The real embedded all-MiniLM-L6-v2, loaded once for the whole session."""
    from knowledge.embedder import Embedder

    return Embedder()
