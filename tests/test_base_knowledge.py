"""benchmarks/base_knowledge.py asks the factual check as a few-shot completion: its solved examples must not give
away an answer, and every Chinese question must have an English wording and an English answer to score it by."""

from __future__ import annotations

from benchmarks.base_knowledge import SHOTS, check, english_answers, prompt
from benchmarks.quality import FACTUAL, correct
from chatbot.evaluate import read_jsonl

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
