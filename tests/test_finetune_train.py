"""Fine-tuning end to end on the tiny random model: LoRA training lowers the loss and changes the adapter,
the run folder serves in the chat engine, resume, full fine-tuning, packing, export --merge and evaluate.
The real model is exercised by the slow test at the end; bf16 / QLoRA by the GPU tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import DataCollatorForSeq2Seq

from chatbot.chat_format import render_prompt
from chatbot.engine import GenerationOptions, Usage
from chatbot.hf_engine import TransformersEngine as Engine
from chatbot.models import DEFAULT_NAME, EMBEDDED_NAME, ModelProfile, load_model, model_profile
from common.cli import ConfigError
from finetune.config import EvaluateConfig, FinetuneConfig
from finetune.data import IGNORE, DataReport, Dialogue, tokenize
from finetune.evaluate import MixedTokenizer, cases_of, evaluate, score
from finetune.export import export
from finetune.train import ReplyLogitsCollator, train
from finetune.train import main as train_main
from tests.tiny import tiny_model

# The output layer is a LoRA target in these tests (see tiny_config), which peft mentions on every save.
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTS = [("What is the capital of France?", "Paris is the capital of France."),
         ("What does LoRA train?", "LoRA trains two small matrices."),
         ("你好", "你好！有什么可以帮你？"),
         ("What is 2+2?", "2+2 is 4.")]


def write_dialogues(path, count: int = 40) -> str:
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                        ensure_ascii=False) for q, a in (FACTS[i % len(FACTS)] for i in range(count))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def tiny_config(model_dir, data, output, **overrides) -> FinetuneConfig:
    # The random model's output layer is adapted too: its logits are nearly uniform, and the LoRA layers
    # inside could not move them far in a few steps.
    settings = dict(model=str(model_dir) if model_dir else None, data=data, output_dir=str(output), max_length=128,
                    max_steps=12, eval_steps=6, logging_steps=1, learning_rate=2e-2, lora_r=8,
                    gradient_accumulation_steps=2, batch_size=2, warmup=0,
                    lora_target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    return FinetuneConfig(**settings | overrides)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    return train(tiny_config(tiny_model_dir, write_dialogues(folder / "data.jsonl"), folder / "run"))


def test_lora_training_lowers_the_loss_and_changes_the_adapter(lora_run):
    metrics = json.loads((lora_run / "metrics.json").read_text())
    losses = [row["loss"] for row in metrics["train_log"]]
    assert metrics["steps"] == 12 and len(losses) >= 10
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    assert [row["step"] for row in metrics["eval_log"]] == [6, 12]
    assert metrics["eval_log"][-1]["eval_loss"] < metrics["eval_log"][0]["eval_loss"]
    assert metrics["best_checkpoint"] == "checkpoint-12" and metrics["data"]["records"] == 40
    assert (metrics["device"], metrics["precision"], metrics["peak_gpu_memory_gib"]) == ("cpu", "fp32", None)
    assert metrics["train_tokens_per_second"] > 0
    weights = load_file(lora_run / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b), "LoRA B starts at zero; training must move it"
    for name in ("config.yaml", "eval.jsonl", "chatbot_model.json", "loss_curve.png"):
        assert (lora_run / name).stat().st_size > 0, name
    assert len((lora_run / "eval.jsonl").read_text().splitlines()) == 4


def test_the_run_folder_serves_in_the_chat_engine(lora_run, tiny_model_dir):
    assert json.loads((lora_run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir.resolve())
    engine = Engine.load(str(lora_run))
    base = Engine.load(str(tiny_model_dir))
    assert engine.profile == base.profile  # the base's profile, copied into chatbot_model.json
    # Trained on replies that end in <|im_end|>, the tiny model may stop at once: the reply can be empty, so
    # compare it with the merged model's own greedy generate() on the run folder's prompt.
    messages = [{"role": "user", "content": "What is 2+2?"}]
    usage = Usage()
    reply = "".join(engine.stream(messages, GenerationOptions(max_new_tokens=8), usage=usage))
    ids = render_prompt(engine.tokenizer, messages)
    assert usage.prompt_tokens == len(ids) and 1 <= usage.completion_tokens <= 8
    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                    eos_token_id=engine.eos_token_ids, pad_token_id=engine.eos_token_ids[0])
    assert reply == engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.inference_mode():
        assert not torch.allclose(engine.model(ids).logits, base.model(ids).logits), "the adapter was not applied"


def test_export_merge_writes_a_standalone_model(lora_run, tmp_path):
    merged = export(str(lora_run), str(tmp_path / "merged"), merge=True)
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer_config.json").is_file()
    assert not (merged / "adapter_config.json").exists() and (merged / "chatbot_model.json").is_file()
    adapter = export(str(lora_run), str(tmp_path / "adapter"), merge=False)
    assert sorted(p.name for p in adapter.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "chatbot_model.json", "config.yaml", "metrics.json",
         "loss_curve.png", "eval.jsonl"])
    ids = torch.tensor([[1, 5, 9, 30]])
    logits = [load_model(str(folder), "cpu")[0](ids).logits for folder in (lora_run, merged, adapter)]
    assert torch.allclose(logits[0], logits[1], atol=1e-5) and torch.allclose(logits[0], logits[2], atol=1e-5)


def test_evaluate_compares_base_and_tuned(lora_run, tmp_path, capsys):
    output = tmp_path / "eval.json"
    result = evaluate(EvaluateConfig(model=str(lora_run), data=str(lora_run / "eval.jsonl"), limit=3,
                                     max_new_tokens=4, output=str(output)))
    assert set(result["results"]) == {"base", "tuned"}
    tuned, base = result["results"]["tuned"], result["results"]["base"]
    assert tuned["perplexity"] < base["perplexity"], "trained on the same facts, the tuned model must be surer"
    assert len(result["replies"]) == 3 and json.loads(output.read_text())["table"] == result["table"]
    assert "| perplexity on assistant tokens (lower is better) (n=3) |" in capsys.readouterr().out


def test_reply_logits_collator_gives_the_same_loss(tokenizer):
    model = tiny_model(tokenizer)
    dialogues = [Dialogue([{"role": "user", "content": "What is the capital of France? " * 3},
                           {"role": "assistant", "content": "Paris."}], "f:1"),
                 Dialogue([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there!"},
                           {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}], "f:2")]
    examples = tokenize(dialogues, tokenizer, 512, DataReport())
    for batch in (examples, examples[:1]):
        full = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)(batch)
        cut = ReplyLogitsCollator(tokenizer)(batch)
        assert cut["logits_to_keep"] < full["input_ids"].shape[1]
        with torch.inference_mode():
            assert torch.allclose(model(**full).loss, model(**cut).loss, atol=1e-6)


def test_generation_metrics_and_grounded_cases():
    passages = "Passages ...\n\n[1] a.md\n\"\"\"\nx\n\"\"\"\n\n[2] b.md\n\"\"\"\ny\n\"\"\"\n\nQuestion: q"
    dialogue = type("D", (), {"source": "f:1", "messages": [
        {"role": "user", "content": passages}, {"role": "assistant", "content": "LoRA trains small matrices [2]."},
        {"role": "user", "content": passages}, {"role": "assistant", "content": "知识库中没有涉及这个问题的内容。"},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]})()
    cases = cases_of(dialogue)
    assert [(c.kind, c.language) for c in cases] == [("grounded", "en"), ("not_covered", "zh"), ("other", "en")]
    assert MixedTokenizer().tokenize("LoRA 训练两个小矩阵") == ["lora", "训练", "两个", "小", "矩阵"]
    perfect = score(cases, [c.reference for c in cases])
    assert perfect["rougeL_en"] == 1.0 and perfect["citations_en"] == 1.0 and perfect["not_covered_zh"] == 1.0
    assert perfect["bleu_zh"] == pytest.approx(100.0)
    wrong = score(cases, ["LoRA trains small matrices [1].", "巴黎。", "Hello!"])
    assert wrong["citations_en"] == 0.0 and wrong["not_covered_zh"] == 0.0 and wrong["rougeL_zh"] == 0.0


def test_resume_continues_from_the_latest_checkpoint(tiny_model_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "data.jsonl", 16)
    flags = ["--model", str(tiny_model_dir), "--data", data, "--output-dir", str(tmp_path / "run"),
             "--max-length", "128", "--eval-steps", "2", "--gradient-accumulation-steps", "1", "--batch-size", "4"]
    assert train_main([*flags, "--max-steps", "2"]) == 0
    assert train_main([*flags, "--max-steps", "4"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert train_main([*flags, "--max-steps", "4", "--resume"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and [row["step"] for row in metrics["eval_log"]] == [2, 4]


def test_init_adapter_goes_on_from_a_tuned_adapter(lora_run, tmp_path):
    """A second stage starts from the adapter's weights on the adapter's own base, not from a fresh LoRA."""
    data = write_dialogues(tmp_path / "data.jsonl", 16)
    config = tiny_config(None, data, tmp_path / "second", init_adapter=str(lora_run), max_steps=2, eval_fraction=0,
                         learning_rate=1e-6)
    assert config.model == json.loads((lora_run / "adapter_config.json").read_text())["base_model_name_or_path"]
    second = train(config)
    fresh = train(tiny_config(config.model, data, tmp_path / "fresh", max_steps=2, eval_fraction=0,
                              learning_rate=1e-6))
    first_loss = {run: json.loads((run / "metrics.json").read_text())["train_log"][0]["loss"]
                  for run in (second, fresh)}
    assert first_loss[second] < first_loss[fresh] - 1.0, first_loss
    before, after = load_file(lora_run / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-3) for k in before)  # a tiny learning rate: near its start
    with pytest.raises(ConfigError, match="adapter_config.json"):
        tiny_config(None, data, tmp_path / "none", init_adapter=str(tmp_path))
    with pytest.raises(ConfigError, match="full"):
        tiny_config(None, data, tmp_path / "full", init_adapter=str(lora_run), method="full")


def test_full_fine_tuning_with_packing_and_checkpointing(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, write_dialogues(tmp_path / "data.jsonl", 12), tmp_path / "run",
                         method="full", packing=True, gradient_checkpointing=True, max_steps=2, eval_fraction=0,
                         learning_rate=1e-3)
    run = train(config)
    assert not (run / "adapter_config.json").exists() and not (run / "eval.jsonl").read_text()
    tuned, base = load_model(str(run), "cpu")[0], load_model(str(tiny_model_dir), "cpu")[0]
    changed = [not torch.equal(p, base.state_dict()[n]) for n, p in tuned.state_dict().items()]
    assert all(changed), "every weight trains in full fine-tuning"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_and_qlora_on_gpu(method, tiny_model_dir, tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    run = train(tiny_config(tiny_model_dir, write_dialogues(tmp_path / "data.jsonl"), tmp_path / "run",
                            method=method, max_steps=4, eval_steps=2))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_log"][-1]["loss"] < metrics["train_log"][0]["loss"]
    assert metrics["device"].startswith("cuda: ") and metrics["peak_gpu_memory_gib"] > 0
    assert metrics["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    engine = Engine.load(str(run))
    usage = Usage()
    "".join(engine.stream([{"role": "user", "content": "hi"}], GenerationOptions(max_new_tokens=4), usage=usage))
    assert engine.device.type == "cuda" and usage.completion_tokens >= 1
    if method == "lora":
        assert engine.model.dtype == torch.bfloat16, "served in bf16 on a GPU that supports it"


@pytest.mark.slow
def test_two_steps_of_the_real_model_on_the_sample_data(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    eval_data = tmp_path / "eval.jsonl"
    lines = open(os.path.join(ROOT, "finetune/data/sample_dialogues.jsonl"), encoding="utf-8").read().splitlines()
    eval_data.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "finetune", "train", "--config", "finetune/configs/sample.yaml",
                             "--max-steps", "2", "--gradient-accumulation-steps", "1", "--max-length", "512",
                             "--eval-data", str(eval_data), "--output-dir", str(run)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "adapter_model.safetensors").is_file() and (run / "loss_curve.png").is_file()
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    answer = subprocess.run([sys.executable, "-m", "chatbot", "ask", "What is the capital of France?", "--json",
                             "--model", str(run), "--max-new-tokens", "16"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr[-2000:]
    reply = json.loads(answer.stdout)
    assert "Paris" in reply["answer"] and reply["mode"] == "chat", "two small steps must not break general answers"


@pytest.mark.slow
def test_the_default_model_is_the_embedded_model_with_the_shipped_adapter():
    tuned, _, name = load_model(None, "cpu")
    plain, _, plain_name = load_model(EMBEDDED_NAME, "cpu")
    assert (name, plain_name) == (DEFAULT_NAME, EMBEDDED_NAME)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert not torch.allclose(tuned(ids).logits, plain(ids).logits)
    # The evaluation (README, "Fine-tuning") found its grounded English answers not yet reliable.
    assert model_profile(name) == ModelProfile(chat=("en",), grounded=())
