"""Fine-tuning data: format conversion, validation messages with file and line, the split, the loss mask,
truncation, and the config file (unknown keys, flag overrides). Runs in a few seconds, no model needed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from chatbot.chat_format import render_conversation, render_prompt
from chatbot.prompts import DEFAULT_SYSTEM_PROMPT
from common.cli import ConfigError, read_yaml
from finetune.config import FinetuneConfig
from finetune.data import (
    IGNORE,
    DataError,
    DataReport,
    Dialogue,
    check_problems,
    passages_shown,
    read_dialogues,
    split,
    to_messages,
    tokenize,
)
from finetune.train import load_dialogues
from finetune.train import main as train_main

DATA = Path(__file__).resolve().parents[1] / "finetune" / "data"


def chat(*turns: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def test_sharegpt_and_alpaca_become_chat_messages():
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello!"}]}
    assert to_messages(sharegpt, "unused") == chat("Hi", "Hello!", system="Be brief.")
    alpaca = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    assert to_messages(alpaca, "") == chat("Translate to French.\n\ncat", "chat")
    assert to_messages({"instruction": "Say hi.", "input": "", "output": "Hi"}, "Sys") == chat("Say hi.", "Hi",
                                                                                                 system="Sys")


def test_every_bad_line_is_reported_with_file_and_line(tmp_path):
    good = json.dumps({"messages": chat("Hi", "Hello!")})
    lines = [
        good.encode(),
        b'{"messages": [',                                                                     # 2 invalid JSON
        b'{"messages": []}',                                                          # 3 empty list
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(),                 # 4 unknown role
        json.dumps({"messages": chat("Hi", "Hello!") + [{"role": "assistant", "content": "Again"}]}).encode(),  # 5
        json.dumps({"messages": chat("Hi", "  ")}).encode(),                                  # 6 empty content
        json.dumps({"messages": chat("Hi")}).encode(),                                        # 7 ends with user
        b'{"messages": "caf\xe9"}',                                                            # 8 invalid UTF-8
        b"",                                                                                   # blank: ignored
        json.dumps({"text": "no known fields"}).encode(),                                     # 10
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = DataReport()
    dialogues = read_dialogues(str(path), DEFAULT_SYSTEM_PROMPT, report)
    assert [d.source for d in dialogues] == [f"{path}:1"]
    assert dialogues[0].messages[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    expected = {2: "invalid JSON", 3: "invalid record", 4: "unknown role", 5: "wrong turn order",
                6: "empty content", 7: "wrong turn order", 8: "invalid UTF-8", 10: "invalid record"}
    assert report.problems == [p for p in report.problems if p.startswith(f"{path}:")]
    assert {int(p.split(":")[1]): p.split(": ")[1].split(":")[0] for p in report.problems} == expected
    assert report.records == 9 and report.counts()["skipped"] == 8 and report.kinds["wrong turn order"] == 2
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON.*and 7 more problems.*--skip-invalid"):
        check_problems(report, skip_invalid=False)
    check_problems(report, skip_invalid=True)  # prints them instead


def test_turn_order_messages_name_the_message():
    with pytest.raises(ValueError, match="message 3 is user, expected assistant"):
        to_messages({"messages": chat("a", system="s") + [{"role": "user", "content": "b"}]}, "")
    with pytest.raises(ValueError, match="message 1 is assistant, expected user"):
        to_messages({"messages": [{"role": "assistant", "content": "a"}]}, "")


def test_split_is_seeded_and_disjoint():
    dialogues = [Dialogue(chat(f"q{i}", f"a{i}"), f"f:{i}") for i in range(50)]
    train, held = split(dialogues, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert {d.source for d in train}.isdisjoint(d.source for d in held)
    assert [d.source for d in split(dialogues, 0.1, seed=3)[1]] == [d.source for d in held]
    assert [d.source for d in split(dialogues, 0.1, seed=4)[1]] != [d.source for d in held]
    assert split(dialogues, 0.0, seed=3) == (dialogues, [])


def make_sample():
    """finetune/data/make_sample.py, a script in a folder that a module (finetune/data.py) shadows."""
    spec = importlib.util.spec_from_file_location("make_sample", DATA / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_held_out_set_shares_no_passage_topic_or_question_with_training():
    report = DataReport()
    train = read_dialogues(str(DATA / "sample_dialogues.jsonl"), "", report)
    held = read_dialogues(str(DATA / "sample_heldout.jsonl"), "", report)
    assert len(held) >= 40 and len(train) > 5 * len(held) and not report.problems
    assert passages_shown(held) and passages_shown(train).isdisjoint(passages_shown(held))
    assert {d.messages[1]["content"] for d in train}.isdisjoint(d.messages[1]["content"] for d in held)
    sample = make_sample()
    passages, _ = sample.load_source(sample.SOURCE)
    topic = {p["text"].strip(): p["topic"] for p in passages.values()}
    held_topics = {topic[text] for text in passages_shown(held)} - {sample.INJECTION_TOPIC}
    assert held_topics == set(sample.HELD_OUT_TOPICS)
    assert held_topics.isdisjoint(topic[text] for text in passages_shown(train))


def test_the_split_check_catches_a_shared_passage():
    sample = make_sample()
    passages, conversations = sample.load_source(sample.SOURCE)
    sides = sample.assign_sides(conversations, passages)
    records = {side: [sample.build(c, passages, side)[0] for c, s in zip(conversations, sides, strict=True)
                      if s == side][:40] for side in ("train", "heldout")}
    sample.check_split(records["train"], records["heldout"], passages)  # the real split passes
    with pytest.raises(ValueError, match="the held-out set shares [0-9]+ passages"):
        sample.check_split(records["train"] + records["heldout"][:1], records["heldout"], passages)


def test_training_warns_when_held_out_dialogues_show_training_passages(tmp_path, capsys):
    lines = (DATA / "sample_dialogues.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:30]) + "\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[20:40]) + "\n", encoding="utf-8")
    report = DataReport()
    load_dialogues(FinetuneConfig(data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "eval.jsonl")), report)
    assert report.shared_passages > 0 and report.counts()["shared_passages"] == report.shared_passages
    assert f"{report.shared_passages} passages appear in both" in capsys.readouterr().err
    report = DataReport()
    load_dialogues(FinetuneConfig(data=str(DATA / "sample_dialogues.jsonl"),
                                  eval_data=str(DATA / "sample_heldout.jsonl")), report)
    assert report.shared_passages == 0 and "warning" not in capsys.readouterr().err


def test_loss_mask_covers_replies_and_their_end_of_turn_token(tokenizer):
    messages = chat("What is the capital of France?", "Paris.", "And of China?", "北京。", system="Be brief.")
    ids, mask = render_conversation(tokenizer, messages)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    first_prompt = render_prompt(tokenizer, messages[:2])
    second_prompt = render_prompt(tokenizer, messages[:4])
    reply1 = tokenizer("Paris.", add_special_tokens=False)["input_ids"] + [im_end]
    reply2 = tokenizer("北京。", add_special_tokens=False)["input_ids"] + [im_end]
    # Serving's prompts are exact prefixes: the model is trained on what it is served.
    assert ids[:len(first_prompt)] == first_prompt and ids[:len(second_prompt)] == second_prompt
    start1, start2 = len(first_prompt), len(second_prompt)
    assert ids[start1:start1 + len(reply1)] == reply1 and ids[start2:start2 + len(reply2)] == reply2
    expected = [0] * len(ids)
    for start, reply in ((start1, reply1), (start2, reply2)):
        expected[start:start + len(reply)] = [1] * len(reply)
    assert mask == expected
    assert ids[start2 + len(reply2):] == newline, "only the newline after the last <|im_end|> is left, unmasked"
    assert [i for i, m in zip(ids, mask, strict=True) if m].count(im_end) == 2


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    template = tokenizer.chat_template
    # This template shows only the last message, so growing the conversation changes earlier text.
    tokenizer.chat_template = "{{ messages[-1]['content'] }}"
    try:
        with pytest.raises(ValueError, match="incrementally"):
            render_conversation(tokenizer, chat("Hi", "Hello!"))
    finally:
        tokenizer.chat_template = template


def test_long_dialogues_keep_whole_turns_or_are_reported(tokenizer):
    short = Dialogue(chat("Hi", "Hello!", "Tell me everything.", "x " * 200), "f.jsonl:1")
    long = Dialogue(chat("y " * 300, "z"), "f.jsonl:2")
    report = DataReport()
    examples = tokenize([short, long], tokenizer, max_length=120, report=report)
    assert len(examples) == 1 and report.truncated == 1
    assert report.problems == [report.problems[0]] and report.problems[0].startswith("f.jsonl:2: too long:")
    ids, mask = render_conversation(tokenizer, short.messages[:3])
    labels = examples[0]["labels"]
    assert examples[0]["input_ids"] == ids[:len(labels)]
    assert labels[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>"), "ends with the first reply's end of turn"
    assert [t for t in labels if t != IGNORE] == [t for t, m in zip(ids, mask, strict=True) if m]


def test_config_file_keys_are_checked_and_flags_win(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data: d.jsonl\nlearning_rate: 2e-4\nlora_target_modules: q_proj, v_proj\npacking: true\n")
    assert read_yaml(str(path), FinetuneConfig) == {"data": "d.jsonl", "learning_rate": 2e-4,
                                                   "lora_target_modules": ["q_proj", "v_proj"], "packing": True}
    path.write_text("data: d.jsonl\nlora_rank: 8\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'lora_rank'"):
        read_yaml(str(path), FinetuneConfig)
    assert train_main(["--config", str(path)]) == 2
    assert "unknown key 'lora_rank'" in capsys.readouterr().err
    path.write_text("data: d.jsonl\nmax_steps: many\n")
    assert train_main(["--config", str(path)]) == 2
    assert "max_steps: expected int" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such.jsonl"], "data file /no/such.jsonl does not exist"),
    (["--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
    ([], "no training data"),
    (["--data", "x.jsonl", "--eval-fraction", "1.5"], "eval_fraction must be in [0, 1)"),
    (["--data", "x.jsonl", "--resume-from", "/no/checkpoint-4"], "checkpoint folder /no/checkpoint-4 does not exist"),
    pytest.param(["--data", "x.jsonl", "--bf16"], "--bf16 needs a GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 may work on this GPU")),
])
def test_bad_input_is_one_line_without_traceback(argv, message, capsys, tmp_path):
    assert train_main([*argv, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
