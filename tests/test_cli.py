"""`python -m chatbot` as users run it: a subprocess, a model folder on disk, JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1"} | env
    return subprocess.run([sys.executable, "-m", "chatbot", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_ask_json_prints_one_object(tiny_model_dir):
    result = run_cli("ask", "What is the capital of France?", "--json", "--model", str(tiny_model_dir),
                     "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= {"answer", "sources", "language", "timings"}
    assert data["language"] == "en" and data["sources"] == []
    assert data["timings"]["total_s"] >= data["timings"]["first_token_s"] >= 0


def test_terminal_chat_keeps_going_until_exit(tiny_model_dir):
    result = run_cli("--model", str(tiny_model_dir), "--max-new-tokens", "4", stdin="hello\n你好\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("bot> ") == 2


@pytest.mark.parametrize("model", ["no-such-org/no-such-model", "/no/such/folder.gguf"])
def test_missing_model_is_one_clear_line(model):
    result = run_cli("ask", "hello", "--model", model)
    assert result.returncode == 2
    assert model in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_question_is_an_error_not_a_traceback():
    result = run_cli("ask", "  ")
    assert result.returncode == 2
    assert "empty" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_embedded_model_knows_the_capital_of_france(tmp_path):
    # A fresh models folder: the first run converts and compiles the model, and says so on stderr only.
    result = run_cli("ask", "What is the capital of France?", "--json", CHATBOT_MODELS_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Converting" in result.stderr and "Compiling" in result.stderr
    data = json.loads(result.stdout)  # stdout is the JSON alone
    assert "Paris" in data["answer"]
    assert data["model"] == "SmolLM2-135M-Instruct+sample-LoRA"  # the default: the embedded model + shipped LoRA
