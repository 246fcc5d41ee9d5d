"""Chunking by language: sentence boundaries, token budget, overlap, headings, deterministic ids."""

from __future__ import annotations

from knowledge.chunking import chunk_document, count_tokens, split_sentences
from knowledge.loaders import Block, Document


def doc(text: str, source: str = "doc.md") -> Document:
    return Document(source, [Block(text)])


def test_chinese_sentences_split_at_chinese_punctuation():
    assert split_sentences("第一句。第二句！第三句？第四句；“引号。”最后") == [
        "第一句。", "第二句！", "第三句？", "第四句；", "“引号。”", "最后"]


def test_english_sentences_split_at_sentence_ends_not_semicolons_or_decimals():
    text = "Dropout is on in training; off at inference. The rate is 0.1 here! Really?\n\nNew paragraph"
    assert split_sentences(text) == ["Dropout is on in training; off at inference.", "The rate is 0.1 here!",
                                     "Really?", "New paragraph"]


def test_chunks_respect_the_budget_with_overlap():
    sentences = [f"Sentence number {i} talks about topic {i}." for i in range(40)]
    chunks = chunk_document(doc(" ".join(sentences)), budget=30, overlap=8)
    assert len(chunks) > 5
    assert all(count_tokens(c.text) <= 30 for c in chunks)
    for before, after in zip(chunks, chunks[1:], strict=False):
        last = split_sentences(before.text)[-1]
        assert after.text.startswith(last), "each chunk repeats the previous chunk's last sentence"
    assert "Sentence number 39" in chunks[-1].text


def test_chinese_chunks_are_joined_without_spaces():
    text = "。".join(f"第{i}句讲的是检索增强生成的一个细节" for i in range(30)) + "。"
    chunks = chunk_document(doc(text), budget=60, overlap=10)
    assert len(chunks) > 3
    assert all(c.language == "zh" and " " not in c.text and count_tokens(c.text) <= 60 for c in chunks)


def test_headings_are_kept_as_context_and_chunks_do_not_cross_sections():
    text = "# Guide\n\n## Install\n\nRun make run.\n\n## Evaluate\n\nRun python -m knowledge evaluate."
    chunks = chunk_document(doc(text))
    assert [(c.heading, c.text) for c in chunks] == [
        ("Guide › Install", "Run make run."), ("Guide › Evaluate", "Run python -m knowledge evaluate.")]
    assert chunks[0].label == "doc.md › Guide › Install"
    assert chunks[0].indexed_text.startswith("Guide › Install\n")


def test_a_hash_line_indented_four_spaces_is_text_not_a_heading():
    text = ("# Config\n\n## Format\n\nThe file holds these lines:\n\n       # comment Lines that start with # are "
            "ignored.\n\n   ## Keys\n\nEach key is set once.")
    chunks = chunk_document(doc(text))
    assert [(c.heading, c.text) for c in chunks] == [
        ("Config › Format", "The file holds these lines: # comment Lines that start with # are ignored."),
        ("Config › Keys", "Each key is set once.")]


def test_a_sentence_longer_than_the_budget_is_cut():
    chunks = chunk_document(doc(" ".join(f"w{i}" for i in range(100))), budget=40, overlap=0)
    assert [count_tokens(c.text) for c in chunks] == [40, 40, 20]
    assert chunks[-1].text.endswith("w99")


def test_chunk_ids_are_deterministic_and_depend_on_source_and_text():
    first = chunk_document(doc("# T\n\nSame text here."))
    again = chunk_document(doc("# T\n\nSame text here."))
    other_source = chunk_document(doc("# T\n\nSame text here.", source="other.md"))
    changed = chunk_document(doc("# T\n\nDifferent text here."))
    assert [c.id for c in first] == [c.id for c in again]
    assert first[0].id != other_source[0].id and first[0].id != changed[0].id


def test_question_answer_pairs_stay_whole():
    document = Document("faq.jsonl", [Block("Q: What is LoRA?\nA: Low-rank adaptation. It is small.", qa=True)])
    assert [c.text for c in chunk_document(document)] == ["Q: What is LoRA?\nA: Low-rank adaptation. It is small."]


def test_pdf_page_numbers_reach_the_citation():
    document = Document("r.pdf", [Block("Page one text.", page=1), Block("Page two text.", page=2)])
    assert [c.label for c in chunk_document(document)] == ["r.pdf, page 1", "r.pdf, page 2"]


def test_code_blocks_are_chunks_of_their_own_and_their_comments_are_not_headings():
    text = ("# Loops\n\nA loop repeats its body.\n\n```python\n# count to three\nfor i in range(3):\n    print(i)\n```"
            "\n\nIt stops when the range is exhausted.\n\n## Next\n\nMore prose.")
    chunks = chunk_document(doc(text), budget=100, overlap=10)
    assert [(c.heading, c.text) for c in chunks] == [
        ("Loops", "A loop repeats its body. It stops when the range is exhausted."),  # the prose around the code
        ("Loops", "# count to three\nfor i in range(3):\n    print(i)"),  # its lines kept, the comment no heading
        ("Loops › Next", "More prose.")]
    code = "```\nfor i in 0..3 {\n    println!(\"{}\", i);\n}\n```"
    chinese = chunk_document(doc(f"# 循环\n\n循环会重复执行它的代码块。\n\n{code}"))
    assert [c.language for c in chinese] == ["zh", "zh"], "code is in the language of the prose around it"


def test_chunks_fit_the_embedders_window_in_text_full_of_symbols():
    from knowledge.chunking import _PIECE, WINDOW

    table = "\n".join("| +-----------+--------------------+ | row | value |" for _ in range(40))
    code = "```\n" + "\n".join(f"x[{i}] = f(y[{i}], z[{i}]) * {i};" for i in range(200)) + "\n```"
    for text in (table, "Intro sentence. " + table, code):
        chunks = chunk_document(doc(text), budget=160, overlap=30)
        assert len(chunks) > 1
        assert all(len(_PIECE.findall(c.indexed_text)) <= WINDOW for c in chunks), "MiniLM would truncate them"
    # Words alone would allow all of the table in one chunk: the punctuation is what WordPiece spends tokens on.
    assert count_tokens(table) <= 160
