"""What the packages share (common/): data folders, dataclass flags for every CLI, the default knowledge base,
and the one citation and passage parser that serving, evaluation and the sample data all use."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chatbot.config import ChatConfig
from chatbot.grounding import cited_numbers
from chatbot.prompts import Passage, shown_passages, user_turn
from common.cli import ConfigError, add_arguments, resolve, run
from common.paths import chatbot_home, feedback_log, index_dir, models_dir
from knowledge.config import KnowledgeConfig
from knowledge.embedded import KnowledgeBase
from knowledge.embedder import EMBEDDED_NAME
from knowledge.store import BUNDLED_CORPUS, bundled_sources, default_index
from tests.tiny import TinyEmbedder


@dataclass
class Settings:
    name: str | None = field(default=None, metadata={"help": "a name"})
    steps: int = field(default=3, metadata={"help": "how many"})
    limit: int | None = None
    rate: float = 0.5
    fast: bool = False
    modules: list[str] = field(default_factory=lambda: ["all"])
    method: str = field(default="a", metadata={"choices": ("a", "b")})


def parse(*argv: str, yaml_path: str | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Settings)
    return resolve(parser.parse_args(list(argv)), Settings, yaml_path)


def test_every_field_is_a_typed_flag():
    assert parse() == Settings()
    given = parse("--name", "x", "--steps", "7", "--limit", "2", "--rate", "0.1", "--fast", "--modules", "q", "v",
                  "--method", "b")
    assert given == Settings("x", 7, 2, 0.1, True, ["q", "v"], "b")
    assert parse("--no-fast").fast is False
    with pytest.raises(SystemExit):
        parse("--steps", "many")
    with pytest.raises(SystemExit):
        parse("--method", "c")


def test_flags_win_over_the_yaml_file_which_wins_over_defaults(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("steps: 5\nrate: 2e-4\nmodules: q, v\n")
    assert parse(yaml_path=str(path)) == Settings(steps=5, rate=2e-4, modules=["q", "v"])
    assert parse("--steps", "9", yaml_path=str(path)).steps == 9
    path.write_text("fast: maybe\n")
    with pytest.raises(ConfigError, match="fast: expected bool"):
        parse(yaml_path=str(path))


def test_the_apps_configs_all_parse_through_the_same_helper():
    for cls, argv, expected in ((ChatConfig, ["--temperature", "0.7", "--max-new-tokens", "9"],
                                 {"temperature": 0.7, "max_new_tokens": 9}),
                                (KnowledgeConfig, ["--chunk-tokens", "64", "--max-file-mb", "1.5"],
                                 {"chunk_tokens": 64, "max_file_mb": 1.5})):
        parser = argparse.ArgumentParser()
        add_arguments(parser, cls)
        config = resolve(parser.parse_args(argv), cls)
        assert {key: getattr(config, key) for key in expected} == expected


def test_run_turns_expected_errors_into_one_line_and_status_2(capsys):
    assert run(lambda: None) == 0 and run(lambda: 1) == 1

    def fails():
        raise ValueError("the question is empty")

    assert run(fails, ValueError) == 2
    assert capsys.readouterr().err == "error: the question is empty\n"
    with pytest.raises(KeyError):
        run(lambda: {}["x"], ValueError)  # anything else is a bug and keeps its traceback


def test_data_folders_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATBOT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CHATBOT_MODELS_DIR")
    assert chatbot_home() == tmp_path / "home"
    assert (models_dir(), index_dir(), feedback_log()) == (
        tmp_path / "home" / "models", tmp_path / "home" / "index", tmp_path / "home" / "feedback.jsonl")
    monkeypatch.setenv("CHATBOT_MODELS_DIR", str(tmp_path / "models"))
    assert models_dir() == tmp_path / "models"
    monkeypatch.delenv("CHATBOT_HOME")
    assert chatbot_home() == Path(os.path.expanduser("~/.cache/bilingual-chatbot"))


def test_the_default_knowledge_base_is_built_once_from_the_bundled_documents(tmp_path, capsys):
    folder = default_index(tmp_path / "index", TinyEmbedder())
    kb = KnowledgeBase.open(folder, create=False)
    bundled = {str(p.relative_to(BUNDLED_CORPUS)) for p in BUNDLED_CORPUS.rglob("*.md")}
    assert set(kb.sources) == bundled and "Building the default knowledge base" in capsys.readouterr().err
    kb.remove(["en/lora.md"])
    assert default_index(tmp_path / "index", TinyEmbedder()) == folder  # found, not rebuilt
    assert "en/lora.md" not in KnowledgeBase.open(folder, create=False).sources
    assert capsys.readouterr().err == ""


def test_a_default_knowledge_base_built_with_minilm_is_rebuilt_once_unless_the_user_changed_it(tmp_path, capsys):
    class OldDefault(TinyEmbedder):  # stands in for all-MiniLM-L6-v2, the default embedder before bilingual
        name = EMBEDDED_NAME

    untouched, changed = tmp_path / "untouched", tmp_path / "changed"
    for folder in (untouched, changed):
        default_index(folder, OldDefault())
    KnowledgeBase.open(changed).remove(["en/lora.md"])
    capsys.readouterr()
    assert default_index(untouched, TinyEmbedder()) == untouched
    assert "Rebuilding the default knowledge base" in capsys.readouterr().err
    rebuilt = KnowledgeBase.open(untouched, create=False)
    assert rebuilt.embedder_name == TinyEmbedder.name and set(rebuilt.sources) == bundled_sources()
    default_index(untouched, TinyEmbedder())
    assert capsys.readouterr().err == "", "once"
    default_index(changed, TinyEmbedder())
    assert "rebuilds it with tiny-hash" in capsys.readouterr().err
    kept = KnowledgeBase.open(changed, create=False)
    assert kept.embedder_name == EMBEDDED_NAME and "en/lora.md" not in kept.sources, "what the user did is kept"
    chosen = tmp_path / "chosen"  # MiniLM named by the user: not the default of an earlier version
    KnowledgeBase.open(chosen, KnowledgeConfig(embedding_model=EMBEDDED_NAME)).add([BUNDLED_CORPUS], OldDefault(),
                                                                                 progress=False)
    default_index(chosen, TinyEmbedder())
    assert capsys.readouterr().err == "" and KnowledgeBase.open(chosen).embedder_name == EMBEDDED_NAME
    before = tmp_path / "before"  # today's embedder, but built before sentence vectors
    KnowledgeBase.open(before, KnowledgeConfig(sentence_vectors=False)).add([BUNDLED_CORPUS], TinyEmbedder(),
                                                                           progress=False)
    generation = before / (before / "CURRENT").read_text().strip()
    saved = json.loads(generation.read_text())
    del saved["config"]["sentence_vectors"]  # as an earlier version saved it
    generation.write_text(json.dumps(saved))
    default_index(before, TinyEmbedder())
    assert "without sentence vectors" in capsys.readouterr().err
    assert all(segment.units is not None for segment in KnowledgeBase.open(before).state.segments)


def test_citations_and_shown_passages_are_parsed_in_one_place():
    assert cited_numbers("A [2], B [1] and A again [2]; not [x] or [123].") == [2, 1]
    passages = [Passage(1, "a.md › Intro", 'He said "yes".\nSecond line.'), Passage(2, "b.md", "短文。")]
    prompt = user_turn("Why?", "en", passages)
    assert shown_passages(prompt) == passages
    assert shown_passages(user_turn("Why?", "en")) == []


ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"common": set(), "knowledge": {"common"}, "chatbot": {"common", "knowledge"},
           "finetune": {"common", "knowledge", "chatbot"}}


def imported_packages(file: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_dependencies_point_one_way_and_only_app_py_imports_gradio():
    for package, allowed in ALLOWED.items():
        for file in (ROOT / package).rglob("*.py"):
            used = imported_packages(file) & (set(ALLOWED) | {"gradio", "app"})
            assert used <= allowed | {package}, f"{file.relative_to(ROOT)} imports {sorted(used - allowed)}"
    assert "gradio" in imported_packages(ROOT / "app.py")


def test_the_readme_front_matter_configures_a_space_that_matches_the_pins():
    import re

    import yaml

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("---\n")
    settings = yaml.safe_load(readme.split("---\n")[1])
    pins = dict(re.findall(r"^([\w.-]+)==([\w.]+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE))
    assert settings["sdk"] == "gradio" and settings["sdk_version"] == pins["gradio"]
    assert (ROOT / settings["app_file"]).is_file() and settings["python_version"] in ("3.10", "3.12")
    assert len(settings["short_description"]) <= 60
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in settings["models"]


def test_built_beside_renames_a_finished_build_and_leaves_nothing_of_a_failed_one(tmp_path):
    from common.paths import built_beside

    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError), built_beside(target, "config.json") as folder:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("the build failed half way")
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []
    with built_beside(target, "config.json") as folder:
        (folder / "config.json").write_text("{}")
    assert (target / "config.json").is_file()
    with built_beside(target, "config.json") as folder:  # another process got there first: ours is dropped
        (folder / "config.json").write_text('{"late": true}')
    assert (target / "config.json").read_text() == "{}" and [p.name for p in target.parent.iterdir()] == ["m"]
