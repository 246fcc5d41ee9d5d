"""The dialogue regression runner: format errors with file and line, checks, reports, exit status, --url."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from chatbot.regress import DialogueError, check, load_dialogues

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "d.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_loads_single_and_multiple_dialogues(tmp_path):
    single = load_dialogues(write(tmp_path, "name: one\nturns:\n  - user: hi\n    expect: {contains: [x]}\n"))
    assert [(d.name, len(d.turns), d.turns[0].line) for d in single] == [("one", 1, 3)]
    many = load_dialogues(write(tmp_path, "name: f\nsettings: {index: null}\ndialogues:\n"
                                          "  - name: a\n    turns: [{user: hi}]\n  - name: b\n"
                                          "    settings: {seed: 3}\n    turns: [{user: yo}, {user: ok}]\n"))
    assert [d.name for d in many] == ["f / a", "f / b"]
    assert many[1].settings == {"index": None, "seed": 3} and len(many[1].turns) == 2


@pytest.mark.parametrize("text,message", [
    ("name: x\nturns:\n  - user: hi\n    expect:\n      contians: [a]\n",
     r"d.yaml:5: unknown expectation key 'contians'"),
    ("name: x\nturn:\n  - user: hi\n", r"d.yaml:2: unknown file key 'turn'"),
    ("name: x\nsettings:\n  modle: y\nturns: [{user: hi}]\n", r"d.yaml:3: unknown settings key 'modle'"),
    ("name: x\nturns:\n  - usr: hi\n", r"d.yaml:3: unknown turn key 'usr'"),
    ("name: x\nturns: []\n", r"non-empty list of turns"),
    ("name: x\nturns:\n  - user: '  '\n", r"d.yaml:3: a turn needs a non-empty `user`"),
    ("name: [unclosed\n", r"invalid YAML"),
])
def test_format_errors_name_file_and_line(tmp_path, text, message):
    with pytest.raises(DialogueError, match=message):
        load_dialogues(write(tmp_path, text))


def reply(answer: str, **fields) -> dict:
    return {"answer": answer, "sources": [], "language": "en", "mode": "chat"} | fields


def test_each_expectation_can_fail():
    good = reply("Paris is the capital [1].", sources=[{"source": "fr.md"}], mode="grounded")
    expect = {"contains": ["paris"], "contains_any": ["capital", "x"], "not_contains": ["berlin"],
              "regex": r"\[1\]", "language": "en", "cites": ["fr.md"], "refusal": False, "mode": "grounded",
              "max_latency_s": 5}
    assert check(expect, good, latency_s=1.0) == []
    bad = reply("Berlin.", language="de")
    failures = check(expect, bad, latency_s=9.0)
    assert [f.split(" ")[0] for f in failures] == ["contains", "contains_any", "not_contains", "regex", "language",
                                                    "cites", "mode", "max_latency_s"]
    assert check({"no_sources": True}, good, 0) == ["no_sources (sources: ['fr.md'])"]
    assert check({"refusal": True}, good, 0) == ["refusal True (mode 'grounded')"]
    similar = check({"similar_to": {"text": "x", "threshold": 0.9}}, good, 0, similarity=lambda a, b: 0.5)
    assert similar == ["similar_to 'x' >= 0.9 (cosine 0.50)"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatbot.regress", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})


def test_a_wrong_expectation_fails_with_a_readable_report(tmp_path, tiny_model_dir):
    # The tiny model answers, so the real one is not loaded; the report is what is tested here.
    result = run(str(FIXTURES / "wrong_expectation.yaml"), "--model", str(tiny_model_dir),
                 "--junit", str(tmp_path / "r.xml"), "--json", str(tmp_path / "r.json"))
    assert result.returncode == 1
    assert "FAIL  wrong_expectation.yaml::a deliberately wrong expectation" in result.stdout
    assert "expected: contains 'this phrase is never in a greeting'" in result.stdout
    assert "wrong_expectation.yaml:5" in result.stdout and "reply: " in result.stdout
    suite = ElementTree.parse(tmp_path / "r.xml").getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "1"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report[0]["passed"] is False and report[0]["turns"][0]["failures"]


def test_an_unknown_key_is_an_error_before_anything_runs(tmp_path):
    result = run(str(write(tmp_path, "name: x\nturns:\n  - user: hi\n    expect: {contain: [a]}\n")))
    assert result.returncode == 2 and "d.yaml:4: unknown expectation key 'contain'" in result.stderr


@pytest.mark.slow
def test_the_project_dialogues_pass_against_a_running_app(tmp_path):
    from tests.test_app import free_port

    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "CHATBOT_HOME": str(tmp_path / "home")}
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for line in process.stdout:
            if "Running on" in line:
                break
        result = run("tests/dialogues", "--url", f"http://127.0.0.1:{port}/")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SKIP  injection.yaml" in result.stdout, "dialogues made for other indexes cannot run there"
        passed = re.search(r"^(\d+) of (\d+) dialogues passed", result.stdout, re.MULTILINE)
        assert passed and passed.group(1) == passed.group(2) and int(passed.group(1)) >= 30, result.stdout
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_document_folder_cached_by_another_embedder_is_indexed_anew(tmp_path):
    """The suite's cached index of a dialogue's documents, built by an earlier default embedder, is rebuilt with
    today's rather than refused as built by another one."""
    from chatbot.regress import LocalBackend
    from knowledge.embedded import KnowledgeBase
    from tests.docs import write_docs
    from tests.tiny import TinyEmbedder

    class Earlier(TinyEmbedder):
        name = "all-MiniLM-L6-v2"

    docs = write_docs(tmp_path / "dialogues" / "docs")
    earlier = LocalBackend(cache=tmp_path / "cache")
    earlier._embedder = Earlier()
    assert earlier._retriever("docs", docs.parent).kb.embedder_name == "all-MiniLM-L6-v2"
    today = LocalBackend(cache=tmp_path / "cache")
    today._embedder = TinyEmbedder()
    retriever = today._retriever("docs", docs.parent)
    assert retriever.kb.embedder_name == "tiny-hash" and len(retriever.kb) == 6
    (cached,) = (tmp_path / "cache").iterdir()
    assert KnowledgeBase.open(cached, create=False).embedder_name == "tiny-hash", "the cache itself was replaced"
