"""The multilingual base model and its fine-tuning into a chat model (issue 21): the turn format a base model gets,
training a tiny base model without a chat template into one that serves and stops at the end of its turn, the
bilingual data set's split, and (slow) the real Gemma 3 270M recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatbot.chat_format import TURN_TEMPLATE, add_turn_format, render_conversation, render_prompt
from chatbot.engine import GenerationOptions, Usage
from chatbot.hf_engine import TransformersEngine
from chatbot.models import ModelProfile, load_model, model_profile
from chatbot.prompts import gives_refusal
from finetune.train import train
from tests.test_finetune_train import tiny_config, write_dialogues
from tests.tiny import save_tiny_base_model, tiny_tokenizer, turn_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DIALOGUE = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
            {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 is 4."}]


def test_a_tokenizer_with_turn_tokens_gets_the_turn_format_and_learns_each_reply_with_its_end():
    tokenizer = turn_tokenizer()
    assert tokenizer.chat_template is None
    assert add_turn_format(tokenizer)
    assert tokenizer.chat_template == TURN_TEMPLATE and tokenizer.eos_token == "<end_of_turn>"
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end in tokenizer.all_special_ids
    ids, mask = render_conversation(tokenizer, DIALOGUE)
    assert ids[0] == tokenizer.bos_token_id
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(learned) == "你好！有什么可以帮你？<end_of_turn>2+2 is 4.<end_of_turn>"
    prompt = render_prompt(tokenizer, DIALOGUE[:2])
    assert ids[:len(prompt)] == prompt, "training renders exactly the prompt serving renders"
    assert tokenizer.decode(prompt).endswith("<start_of_turn>user\n你好<end_of_turn>\n<start_of_turn>model\n")


def test_a_tokenizer_without_turn_tokens_is_left_alone():
    tokenizer = tiny_tokenizer()
    template = tokenizer.chat_template
    assert not add_turn_format(tokenizer)
    assert tokenizer.chat_template == template and tokenizer.eos_token == "<|im_end|>"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    model_dir = save_tiny_base_model(folder / "base")
    config = tiny_config(model_dir, write_dialogues(folder / "data.jsonl"), folder / "run", languages=["en", "zh"],
                         lora_target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], max_steps=40, eval_steps=20)
    return model_dir, train(config)


def test_a_base_model_without_a_chat_template_loads_with_the_turn_format(base_run):
    model_dir, _ = base_run
    model, tokenizer, _ = load_model(str(model_dir), "cpu")
    assert tokenizer.chat_template == TURN_TEMPLATE
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in model.generation_config.eos_token_id


def test_the_tuned_base_model_writes_its_languages_and_stops_at_the_end_of_its_turn(base_run):
    _, run = base_run
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [row["loss"] for row in metrics["train_log"]]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    assert json.loads((run / "chatbot_model.json").read_text()) == {"chat": ["en", "zh"], "grounded": ["en", "zh"]}
    assert model_profile(str(run), str(run)) == ModelProfile(chat=("en", "zh"), grounded=("en", "zh"))
    engine = TransformersEngine.load(str(run))
    end = engine.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end in engine.eos_token_ids
    messages = [{"role": "user", "content": "What is 2+2?"}]
    usage = Usage()
    reply = "".join(engine.stream(messages, GenerationOptions(max_new_tokens=24), usage=usage))
    ids = render_prompt(engine.tokenizer, messages)
    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=engine.eos_token_ids, pad_token_id=engine.tokenizer.pad_token_id)
    generated = out[0, len(ids):].tolist()
    # Trained on replies that end in <end_of_turn>, the tiny model ends its turn by itself, and the engine stops there.
    assert generated[-1] == end and len(generated) < 24, generated
    assert reply == engine.tokenizer.decode(generated, skip_special_tokens=True)
    assert usage.completion_tokens == len(generated)


def test_the_bilingual_data_holds_out_whole_topics_in_both_languages():
    def read(name):
        return [json.loads(line)["messages"] for line in (ROOT / "finetune/data" / name).read_text().splitlines()]

    train_set, held = read("bilingual_train.jsonl"), read("bilingual_heldout.jsonl")
    asked = {m["content"] for d in train_set for m in d if m["role"] == "user"}
    assert not [m["content"] for d in held for m in d if m["role"] == "user" and m["content"] in asked]
    chinese = sum(any("\u4e00" <= c <= "\u9fff" for c in d[-1]["content"]) for d in train_set)
    assert 0.4 < chinese / len(train_set) < 0.6, "English and Chinese in balance"
    assert len(held) >= 50 and len(train_set) >= 1500
    sources = json.loads((ROOT / "chatbot/eval/factual.jsonl").read_text().splitlines()[0])  # a held-out fact
    assert not [d for d in train_set if sources["question"] in d[1]["content"]]


def test_the_bilingual_data_teaches_no_refusal():
    # The safety check refuses before the model runs; a model taught the app's refusal gave it to harmless requests.
    train_set = [json.loads(line)["messages"] for line in (ROOT / "finetune/data/bilingual_train.jsonl").open()]
    refusing = [m["content"] for d in train_set for m in d if m["role"] == "assistant"
                and gives_refusal(m["content"])]
    assert not refusing, refusing[:3]


def test_the_refusal_benchmark_counts_the_models_refusals_only_where_the_check_let_a_request_through():
    from benchmarks.refusals import table, tally

    rows = [{"set": "test", "language": "zh", "unsafe": unsafe} for unsafe in (False, False, False, True, True)]
    counts = tally(rows, checked=[False, True, False, True, False], modelled=[True, True, False, True, True])
    assert (counts[("test", "zh", False), "check"], counts[("test", "zh", False), "model"]) == (1, 1)
    assert (counts[("test", "zh", True), "check"], counts[("test", "zh", True), "model"]) == (1, 1)
    assert "| test | zh | 1 / 1 of 2 / 2 of 3 (67%) | 1 / 1 of 1 / 2 of 2 (100%) |" in table("m", counts)


@pytest.mark.slow
def test_two_steps_of_the_bilingual_recipe_on_the_gemma_base(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "finetune", "train", "--config", "finetune/configs/bilingual.yaml",
                             "--max-steps", "2", "--gradient-accumulation-steps", "1", "--eval-steps", "2",
                             "--output-dir", str(run)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == "gemma-3-270m"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["best_eval_loss"] < 10


@pytest.mark.slow
def test_the_shipped_bilingual_model_answers_chinese_in_chinese_and_english_in_english():
    from chatbot.engine import load_engine
    from chatbot.models import BILINGUAL_NAME
    from chatbot.prompts import DEFAULT_SYSTEM_PROMPT, user_turn
    from common.language import detect_language

    engine = load_engine(BILINGUAL_NAME, "onnx", "cpu")
    assert engine.profile.writes("zh", grounded=False) and engine.profile.writes("en", grounded=False)
    replies = {}
    for question, language in (("德国的首都是哪座城市？", "zh"), ("What is the capital of Germany?", "en")):
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                    {"role": "user", "content": user_turn(question, language)}]
        usage = Usage()
        replies[language] = "".join(engine.stream(messages, GenerationOptions(max_new_tokens=40), usage=usage))
        assert detect_language(replies[language]) == language, replies
        assert usage.completion_tokens < 40, "it ends its turn by itself"
    engine.close()
    assert "柏林" in replies["zh"] and "Berlin" in replies["en"], replies

