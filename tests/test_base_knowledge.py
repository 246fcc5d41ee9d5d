"""benchmarks/base_knowledge.py asks the factual check as a few-shot completion: its solved examples must not give
away an answer, and every Chinese question must have an English wording and an English answer to score it by. Its
validation set, on which other prompts are compared, asks no fact of the check and nothing the fine-tuning data asks."""

from __future__ import annotations

import json
from difflib import SequenceMatcher
from pathlib import Path

from benchmarks.base_knowledge import SHOTS, check, english_answers, prompt
from benchmarks.quality import FACTUAL, correct
from chatbot.evaluate import read_jsonl
from chatbot.prompts import question_of
from common.language import letters

ROOT = Path(__file__).resolve().parents[1]

ROWS = read_jsonl(FACTUAL)


def test_the_solved_examples_answer_nothing_the_check_asks():
    for shots in SHOTS.values():
        for question, answer in shots:
            assert question not in {r["question"] for r in ROWS} | {r.get("question_en") for r in ROWS}
            given_away = [r["question"] for r in ROWS if correct(answer, r["answers"] + r.get("answers_en", []))]
            assert not given_away, (answer, given_away)


def test_every_chinese_question_can_be_asked_and_scored_in_english():
    chinese = [r for r in ROWS if r["language"] == "zh"]
    assert len(chinese) == 40
    for row in chinese:
        assert row["question_en"].isascii() and row["question_en"].endswith("?"), row
        assert english_answers(row) and all(a.isascii() for a in english_answers(row)), row


def test_the_prompt_ends_with_the_question_in_the_examples_format():
    text = prompt("太阳系中最大的行星是哪一颗？", "zh")
    assert text.count("问：") == 4 and text.endswith("问：太阳系中最大的行星是哪一颗？\n答：")
    assert prompt("Why?", "en").endswith("Q: Why?\nA:") and "Lisbon" in prompt("Why?", "en")


def test_a_chat_model_that_answers_an_english_question_in_chinese_is_scored_by_either_form():
    row = next(r for r in ROWS if r["language"] == "zh" and not r["answers"][0].isascii())
    def replies_in_chinese(question: str, language: str) -> str:  # knows the fact, always says it in Chinese
        return row["answers"][0] if question in (row["question"], row["question_en"]) else "不知道"

    few_shot = check(replies_in_chinese, [row])
    chat = check(replies_in_chinese, [row], either_language=True)
    assert few_shot["zh"]["correct"] == chat["zh"]["correct"] == 1
    assert few_shot["zh_in_english"]["correct"] == 0 and chat["zh_in_english"]["correct"] == 1
    assert chat["zh_either"] == 1 and check(lambda question, language: "不知道", [row])["zh_either"] == 0


def test_the_validation_set_asks_other_facts_than_the_check_and_its_examples_give_none_away():
    from benchmarks.base_knowledge import VALIDATION, solved_turns

    validation = read_jsonl(VALIDATION)
    assert len(validation) == 60 and {r["language"] for r in validation} == {"zh"}
    check_answers = {a.lower() for r in ROWS for a in r["answers"] + r.get("answers_en", [])}
    for row in validation:
        assert row["question"] not in {r["question"] for r in ROWS}, row
        assert not check_answers & {a.lower() for a in row["answers"]}, row  # a fact the check asks
    trained = [json.loads(line)["messages"] for line in (ROOT / "finetune/data/bilingual_train.jsonl").open()]
    asked = {letters(question_of(m["content"])) for d in trained for m in d if m["role"] == "user"}
    near = [(r["question"], q) for r in validation for q in asked  # make_bilingual's SAME_REQUEST: ratio 0.9
            if (same := SequenceMatcher(None, q, letters(r["question"]))).quick_ratio() >= 0.9 and same.ratio() >= 0.9]
    assert not near, near
    shown = " ".join(turn["content"] for turn in solved_turns(3))
    assert len(solved_turns(3)) == 6 and not [r["question"] for r in validation if correct(shown, r["answers"])]
