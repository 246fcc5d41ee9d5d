"""Scripted dialogue regression tests: YAML conversations with expectations, run in-process or against an app.

    python -m chatbot.regress tests/dialogues                       # every *.yaml under the folder, in-process
    python -m chatbot.regress tests/dialogues --url http://127.0.0.1:7860/ --junit report.xml --json report.json
    python -m chatbot.regress tests/dialogues --model SmolLM2-135M-Instruct   # the same suite, another model

A file holds one dialogue (`turns`) or several (`dialogues: [{name, turns}]`):

    name: LoRA questions
    settings:                 # optional; greedy decoding by default, so results are reproducible
      index: default          # the app's knowledge base | an index folder | a folder of documents | null
      model: null             # the default model, or any --model value
      seed: 0
      temperature: 0
    turns:
      - user: What does LoRA train?
        expect:
          language: en
          cites: [en/lora.md]
          contains_any: [matrices, low-rank]
          max_latency_s: 10

Expectations: contains / not_contains (text or list; case-insensitive), contains_any (list), regex (text or
list), language (en/zh), cites (source names that must be among the turn's sources), no_sources (true),
refusal (true), mode (chat/grounded/extractive/not_covered/refused/help), max_latency_s, similar_to (text, or
{text, threshold}: cosine similarity with the bundled embedder, default threshold 0.6), error (text the refusal of
a request must contain, e.g. for a message over `max_input_chars`; a turn that errs without it fails),
comment (ignored). Settings may also give `on_not_covered` and `max_input_chars`.
Unknown keys are errors reported with file and line. The exit status is 1 when any turn fails. With --url the
app's own model and knowledge base answer: dialogues whose settings name another index are skipped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.paths import chatbot_home

FILE_KEYS = {"name", "settings", "turns", "dialogues", "comment"}
DIALOGUE_KEYS = {"name", "turns", "settings", "comment"}
SETTING_KEYS = {"model", "index", "seed", "temperature", "max_new_tokens", "on_not_covered", "max_input_chars"}
# Settings of the assistant itself: a running app has its own, so dialogues that set them run in-process only.
APP_SETTINGS = ("on_not_covered", "max_input_chars")
TURN_KEYS = {"user", "expect", "comment"}
EXPECT_KEYS = {"contains", "contains_any", "not_contains", "regex", "language", "cites", "no_sources", "refusal",
               "mode", "max_latency_s", "similar_to", "error", "comment"}
DEFAULT_SIMILARITY = 0.6


class DialogueError(ValueError):
    """A dialogue file that does not follow the format; the message has the file and line."""


@dataclass
class Turn:
    user: str
    expect: dict[str, Any]
    line: int


@dataclass
class Dialogue:
    name: str
    file: Path
    line: int
    settings: dict[str, Any]
    turns: list[Turn]

    @property
    def id(self) -> str:
        return f"{self.file.name}::{self.name}"


@dataclass
class TurnResult:
    turn: Turn
    reply: dict[str, Any]  # the /chat shape: answer, sources, language, mode, timings
    latency_s: float
    failures: list[str] = field(default_factory=list)


# ----- reading ------------------------------------------------------------------------------------------------
def _check_keys(node: yaml.MappingNode, allowed: set[str], file: Path, what: str) -> None:
    for key, _ in node.value:
        if key.value not in allowed:
            raise DialogueError(f"{file}:{key.start_mark.line + 1}: unknown {what} key '{key.value}' "
                                f"(allowed: {', '.join(sorted(allowed))})")


def _mapping(node: yaml.Node, file: Path, what: str) -> yaml.MappingNode:
    if not isinstance(node, yaml.MappingNode):
        raise DialogueError(f"{file}:{node.start_mark.line + 1}: {what} must be a mapping")
    return node


def _child(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    return next((value for k, value in node.value if k.value == key), None)


def _turns(node: yaml.Node | None, file: Path, where: int) -> list[Turn]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise DialogueError(f"{file}:{where + 1}: a dialogue needs a non-empty list of turns")
    turns = []
    for turn_node in node.value:
        _check_keys(_mapping(turn_node, file, "a turn"), TURN_KEYS, file, "turn")
        expect_node = _child(turn_node, "expect")
        if expect_node is not None:
            _check_keys(_mapping(expect_node, file, "expect"), EXPECT_KEYS, file, "expectation")
        data = yaml.safe_load(yaml.serialize(turn_node))
        if not isinstance(data.get("user"), str) or not data["user"].strip():
            raise DialogueError(f"{file}:{turn_node.start_mark.line + 1}: a turn needs a non-empty `user` text")
        turns.append(Turn(data["user"], data.get("expect") or {}, turn_node.start_mark.line + 1))
    return turns


def load_dialogues(file: Path) -> list[Dialogue]:
    try:
        root = yaml.compose(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DialogueError(f"{file}: invalid YAML ({err})") from err
    if root is None:
        raise DialogueError(f"{file}: empty file")
    root = _mapping(root, file, "the file")
    _check_keys(root, FILE_KEYS, file, "file")
    settings_node = _child(root, "settings")
    if settings_node is not None:
        _check_keys(_mapping(settings_node, file, "settings"), SETTING_KEYS, file, "settings")
    data = yaml.safe_load(yaml.serialize(root))
    settings = data.get("settings") or {}
    name = data.get("name") or file.stem
    if ("turns" in data) == ("dialogues" in data):
        raise DialogueError(f"{file}:1: give either `turns` (one dialogue) or `dialogues` (several)")
    if "turns" in data:
        return [Dialogue(name, file, 1, settings, _turns(_child(root, "turns"), file, 0))]
    dialogues = []
    for node in _child(root, "dialogues").value:
        _check_keys(_mapping(node, file, "a dialogue"), DIALOGUE_KEYS, file, "dialogue")
        item = yaml.safe_load(yaml.serialize(node))
        own = _child(node, "settings")
        if own is not None:
            _check_keys(_mapping(own, file, "settings"), SETTING_KEYS, file, "settings")
        dialogues.append(Dialogue(f"{name} / {item.get('name') or node.start_mark.line + 1}", file,
                                  node.start_mark.line + 1, settings | (item.get("settings") or {}),
                                  _turns(_child(node, "turns"), file, node.start_mark.line)))
    return dialogues


def find_dialogue_files(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.rglob("*.yaml")) + sorted(path.rglob("*.yml"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return files


# ----- checking -----------------------------------------------------------------------------------------------
def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def check(expect: dict[str, Any], reply: dict[str, Any], latency_s: float,
          similarity: Any = None) -> list[str]:
    """The expectations `reply` does not meet, each as a readable line."""
    text = reply["answer"]
    lower = text.lower()
    if reply.get("error") or "error" in expect:
        wanted = str(expect.get("error", ""))
        if not wanted or wanted.lower() not in str(reply.get("error", "")).lower():
            return [f"error {wanted!r} (got {reply.get('error')!r})"]
    sources = [s["source"] for s in reply.get("sources") or []]
    failures = []
    for needle in _as_list(expect.get("contains", [])):
        if str(needle).lower() not in lower:
            failures.append(f"contains {needle!r}")
    if "contains_any" in expect and not any(str(n).lower() in lower for n in _as_list(expect["contains_any"])):
        failures.append(f"contains_any {expect['contains_any']!r}")
    for needle in _as_list(expect.get("not_contains", [])):
        if str(needle).lower() in lower:
            failures.append(f"not_contains {needle!r}")
    for pattern in _as_list(expect.get("regex", [])):
        if not re.search(pattern, text):
            failures.append(f"regex {pattern!r}")
    if "language" in expect and reply.get("language") != expect["language"]:
        failures.append(f"language {expect['language']!r} (got {reply.get('language')!r})")
    for source in _as_list(expect.get("cites", [])):
        if source not in sources:
            failures.append(f"cites {source!r} (sources: {sources})")
    if expect.get("no_sources") and sources:
        failures.append(f"no_sources (sources: {sources})")
    if "refusal" in expect and (reply.get("mode") == "refused") != bool(expect["refusal"]):
        failures.append(f"refusal {expect['refusal']!r} (mode {reply.get('mode')!r})")
    if "mode" in expect and reply.get("mode") != expect["mode"]:
        failures.append(f"mode {expect['mode']!r} (got {reply.get('mode')!r})")
    if "max_latency_s" in expect and latency_s > float(expect["max_latency_s"]):
        failures.append(f"max_latency_s {expect['max_latency_s']} (took {latency_s:.2f} s)")
    if "similar_to" in expect:
        target = expect["similar_to"]
        target, threshold = (target, DEFAULT_SIMILARITY) if isinstance(target, str) else (
            target["text"], float(target.get("threshold", DEFAULT_SIMILARITY)))
        score = similarity(text, target)
        if score < threshold:
            failures.append(f"similar_to {target!r} >= {threshold} (cosine {score:.2f})")
    return failures


# ----- running ------------------------------------------------------------------------------------------------
class LocalBackend:
    """Answers in this process. Models, indexes and the embedder are loaded once and shared by dialogues."""

    def __init__(self, cache: Path | None = None, model: str | None = None):
        self.model = model  # --model: overrides the dialogues' settings, to compare models on the same suite
        self.engines: dict[str | None, Any] = {}
        self.language_engines: dict[str | None, dict[str, Any]] = {}  # --language-models of each model, as the app
        self.retrievers: dict[Path, Any] = {}
        self._embedder = None
        self.cache = cache  # where folders of documents are indexed (default: the app's data folder)

    @property
    def embedder(self):
        from knowledge.embedder import Embedder

        self._embedder = self._embedder or Embedder()
        return self._embedder

    def _retriever(self, index: str | None, base: Path):
        from knowledge.embedded import KnowledgeBase
        from knowledge.embedder import Embedder
        from knowledge.retriever import Retriever
        from knowledge.store import default_index

        if index is None:
            return None
        if index == "default":  # the app's knowledge base (in this backend's own cache when it has one)
            folder = default_index(self.cache / "default" if self.cache else None, self.embedder)
        else:
            folder = (base / index).resolve()
        if folder not in self.retrievers:
            embedder = self.embedder
            if (folder / "CURRENT").is_file():  # an index folder, searched with the embedder that built it
                kb = KnowledgeBase.open(folder, create=False)
                if kb.embedder_name != embedder.name:  # e.g. MiniLM, an earlier version's default
                    embedder = Embedder.for_index(kb.config, kb.embedder_name)
            else:  # documents: indexed once into the data folder, then kept up to date incrementally
                cache = self.cache or chatbot_home() / "regress-indexes"
                kb = KnowledgeBase.open(cache / re.sub(r"\W+", "_", str(folder)))
                if len(kb) and kb.embedder_name != embedder.name:  # cached by another embedder: built anew
                    kb = KnowledgeBase.fresh(kb.folder)
                kb.add([folder], embedder, progress=False)
            self.retrievers[folder] = Retriever(kb, embedder)
        return self.retrievers[folder]

    def assistant(self, settings: dict[str, Any], base: Path):
        from chatbot.assistant import Assistant
        from chatbot.config import ChatConfig
        config = ChatConfig(seed=int(settings.get("seed", 0)), temperature=float(settings.get("temperature", 0.0)),
                            max_new_tokens=int(settings.get("max_new_tokens", 256)),
                            on_not_covered=str(settings.get("on_not_covered", "answer")),
                            max_input_chars=int(settings.get("max_input_chars", ChatConfig.max_input_chars)))
        # --model wins, then the dialogue's own setting, then ChatConfig's default (CHATBOT_MODEL or the default).
        config.model = self.model or settings.get("model", config.model)
        if config.model not in self.engines:
            self.engines[config.model] = config.load_engine()
            self.language_engines[config.model] = config.load_language_engines()
        return Assistant(self.engines[config.model], config, self._retriever(settings.get("index"), base),
                         self.language_engines[config.model])

    def reply(self, dialogue: Dialogue, history: list[dict], message: str) -> tuple[dict, float]:
        answer = self.assistant(dialogue.settings, dialogue.file.parent).ask(message, history)
        return answer.to_dict(), answer.timings.get("total_s", 0.0)


class RemoteBackend:
    """Answers from a running app through its /chat API, as any client would."""

    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url, verbose=False)

    def reply(self, dialogue: Dialogue, history: list[dict], message: str) -> tuple[dict, float]:
        start = time.perf_counter()
        result = self.client.predict(message, history, api_name="/chat")
        return result, time.perf_counter() - start


def run_dialogue(dialogue: Dialogue, backend: LocalBackend | RemoteBackend, similarity: Any) -> list[TurnResult]:
    history: list[dict] = []
    results = []
    for turn in dialogue.turns:
        try:
            reply, latency = backend.reply(dialogue, history, turn.user)
        except Exception as err:  # a refused request (too long, malformed): its message is what `error` checks
            reply, latency = {"answer": "", "sources": [], "error": str(err)}, 0.0
        results.append(TurnResult(turn, reply, latency, check(turn.expect, reply, latency, similarity)))
        if not reply.get("error"):  # a refused request never enters the conversation, as in the app
            history += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": reply["answer"]}]
    return results


def failure_report(dialogue: Dialogue, results: list[TurnResult]) -> str:
    lines = []
    for number, result in enumerate(results, 1):
        for failure in result.failures:
            lines.append(f"turn {number} ({dialogue.file}:{result.turn.line}) user: {result.turn.user!r}\n"
                         f"    expected: {failure}\n    reply: {result.reply['answer']!r}")
    return "\n".join(lines)


def similarity_function(backend: LocalBackend | None):
    """Cosine similarity of two texts with the bundled embedder (loaded when first needed)."""
    holder = {"backend": backend or LocalBackend()}

    def similarity(a: str, b: str) -> float:
        vectors = holder["backend"].embedder.encode([a, b])
        return float(vectors[0] @ vectors[1])

    return similarity


def write_junit(path: Path, outcomes: list[tuple[Dialogue, list[TurnResult], float]]) -> None:
    from xml.etree import ElementTree as ET

    failed = sum(1 for _, results, _ in outcomes if any(r.failures for r in results))
    suite = ET.Element("testsuite", name="dialogues", tests=str(len(outcomes)), failures=str(failed))
    for dialogue, results, seconds in outcomes:
        case = ET.SubElement(suite, "testcase", classname=dialogue.file.name, name=dialogue.name,
                             time=f"{seconds:.3f}")
        if any(r.failures for r in results):
            ET.SubElement(case, "failure", message="expectation not met").text = failure_report(dialogue, results)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def write_json(path: Path, outcomes: list[tuple[Dialogue, list[TurnResult], float]]) -> None:
    data = [{"dialogue": d.name, "file": str(d.file), "passed": not any(r.failures for r in results),
             "seconds": round(seconds, 3),
             "turns": [{"user": r.turn.user, "line": r.turn.line, "passed": not r.failures, "failures": r.failures,
                        "answer": r.reply["answer"], "mode": r.reply.get("mode"),
                        "sources": [s["source"] for s in r.reply.get("sources") or []],
                        "latency_s": round(r.latency_s, 3)} for r in results]}
            for d, results, seconds in outcomes]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatbot.regress", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="dialogue files or folders of *.yaml")
    parser.add_argument("--url", help="run against a running app (its /chat API) instead of in-process")
    parser.add_argument("--model", help="answer with this model instead of the dialogues' (in-process only)")
    parser.add_argument("--junit", type=Path, help="write a JUnit XML report here")
    parser.add_argument("--json", type=Path, help="write a JSON report here")
    args = parser.parse_args(argv)
    try:
        dialogues = [d for file in find_dialogue_files(args.paths) for d in load_dialogues(file)]
    except (DialogueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    local = None if args.url else LocalBackend(model=args.model)
    backend = RemoteBackend(args.url) if args.url else local
    similarity = similarity_function(local)
    outcomes, skipped = [], []
    for dialogue in dialogues:
        if args.url and (dialogue.settings.get("index", "default") != "default"
                         or any(key in dialogue.settings for key in APP_SETTINGS)):
            # A running app answers from its own knowledge base; a dialogue made for another one cannot run there.
            skipped.append(dialogue)
            print(f"SKIP  {dialogue.id:<60} sets its own index or assistant settings; the app at --url uses its own")
            continue
        start = time.perf_counter()
        results = run_dialogue(dialogue, backend, similarity)
        outcomes.append((dialogue, results, time.perf_counter() - start))
        passed = sum(not r.failures for r in results)
        status = "PASS" if passed == len(results) else "FAIL"
        print(f"{status}  {dialogue.id:<60} {passed}/{len(results)} turns  {outcomes[-1][2]:6.2f} s", flush=True)
        if status == "FAIL":
            print("      " + failure_report(dialogue, results).replace("\n", "\n      "))
    failed = [d for d, results, _ in outcomes if any(r.failures for r in results)]
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} dialogues passed"
          + (f", {len(skipped)} skipped" if skipped else "")
          + (f"; failed: {', '.join(d.id for d in failed)}" if failed else ""))
    if args.junit:
        write_junit(args.junit, outcomes)
    if args.json:
        write_json(args.json, outcomes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
