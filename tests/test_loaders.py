"""Loaders: every supported format, Chinese encodings, and bad files reported with a reason."""

from __future__ import annotations

import json

import pytest

from knowledge.loaders import LoadError, find_files, load_file
from tests.docs import make_docx, make_pdf


def test_text_in_utf8_and_gbk(tmp_path):
    (tmp_path / "utf8.txt").write_text("检索增强生成会引用来源。", encoding="utf-8")
    (tmp_path / "gbk.txt").write_bytes("检索增强生成会引用来源。".encode("gbk"))
    (tmp_path / "gb18030.md").write_bytes("# 标题\n\n𠀀 是扩展区汉字。".encode("gb18030"))
    assert load_file(tmp_path / "utf8.txt").blocks[0].text == "检索增强生成会引用来源。"
    assert load_file(tmp_path / "gbk.txt").blocks[0].text == "检索增强生成会引用来源。"
    assert "𠀀" in load_file(tmp_path / "gb18030.md").blocks[0].text


def test_html_keeps_headings_and_drops_scripts(tmp_path):
    (tmp_path / "page.html").write_text(
        "<html><head><title>x</title><script>var secret = 1;</script></head><body>"
        "<h1>LoRA</h1><p>LoRA trains <b>small</b> matrices.</p><ul><li>rank 8</li></ul></body></html>")
    text = load_file(tmp_path / "page.html").blocks[0].text
    assert text.splitlines()[0] == "# LoRA"
    assert "LoRA trains small matrices." in text and "rank 8" in text
    assert "secret" not in text


def test_html_with_a_main_element_is_read_from_it_alone(tmp_path):
    (tmp_path / "page.html").write_text(
        "<html><body><div id='help'><h2>Keyboard shortcuts</h2><p>Press S to search</p></div>"
        "<ul role='menu'><li>Light</li><li>Navy</li></ul><h1 class='site'>The Book</h1>"
        "<main><h1>借用</h1><p>对象可以通过引用传递。</p><button>Copy</button></main></body></html>")
    text = load_file(tmp_path / "page.html").blocks[0].text
    assert text == "# 借用\n\n对象可以通过引用传递。", text


def test_pdf_pages_are_numbered(tmp_path):
    make_pdf(tmp_path / "report.pdf", ["Perplexity is the exponential of the loss.", "BLEU counts n-grams."])
    blocks = load_file(tmp_path / "report.pdf").blocks
    assert [b.page for b in blocks] == [1, 2]
    assert "exponential of the loss" in blocks[0].text and "n-grams" in blocks[1].text


def test_docx_headings_become_markdown(tmp_path):
    make_docx(tmp_path / "notes.docx", "Early stopping", ["Stop when the validation loss rises.", "保留最佳检查点。"])
    text = load_file(tmp_path / "notes.docx").blocks[0].text
    assert text.startswith("# Early stopping")
    assert "validation loss rises" in text and "保留最佳检查点" in text


def test_question_answer_pairs_from_jsonl_and_csv(tmp_path):
    rows = [{"question": "What is LoRA?", "answer": "Low-rank adaptation."},
            {"问题": "什么是困惑度？", "答案": "损失的指数。"}]
    (tmp_path / "faq.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    (tmp_path / "faq.csv").write_text("question,answer\nWhat is BLEU?,An n-gram precision metric.\n")
    jsonl = load_file(tmp_path / "faq.jsonl").blocks
    assert [b.qa for b in jsonl] == [True, True]
    assert jsonl[1].text == "Q: 什么是困惑度？\nA: 损失的指数。"
    assert load_file(tmp_path / "faq.csv").blocks[0].text == "Q: What is BLEU?\nA: An n-gram precision metric."


@pytest.mark.parametrize("name,content,reason", [
    ("binary.txt", b"\x00\x01\x02PNG\x00", "binary"),
    ("broken.pdf", b"%PDF-1.4\nthis is not a pdf", "corrupt PDF"),
    ("broken.docx", b"PK\x03\x04 not really a zip", "corrupt .docx"),
    ("empty.md", b"   \n\n", "no text"),
    ("latin1.txt", "café naïve".encode("latin-1") + b"\xff\xfe\xff", "encoding"),
    ("bad.jsonl", b'{"question": "a", "answer": "b"}\n{not json', "line 2: invalid JSON"),
    ("fields.csv", b"title,body\nx,y\n", "expected a question and an answer"),
    ("image.png", b"\x89PNG\r\n", "unsupported file type"),
])
def test_bad_files_raise_with_a_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LoadError, match=reason):
        load_file(tmp_path / name)


def test_files_over_the_size_limit_are_refused(tmp_path):
    (tmp_path / "big.txt").write_text("word " * 1000)
    with pytest.raises(LoadError, match="too large"):
        load_file(tmp_path / "big.txt", max_bytes=1000)


def test_find_files_names_sources_relative_to_the_folder(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.md").write_text("a")
    (tmp_path / "docs" / "sub" / "b.txt").write_text("b")
    (tmp_path / "docs" / ".hidden.md").write_text("h")
    (tmp_path / "single.txt").write_text("s")
    found = find_files([tmp_path / "docs", tmp_path / "single.txt"])
    assert [source for _, source in found] == ["a.md", "sub/b.txt", "single.txt"]
    with pytest.raises(FileNotFoundError):
        find_files([tmp_path / "missing"])


def test_html_code_keeps_its_lines_in_a_fenced_block(tmp_path):
    (tmp_path / "page.html").write_text(
        "<main><h1>发散函数</h1><p>发散函数永不返回。</p><pre><code>fn foo() -> ! {\n    panic!(\"永不返回\");\n}\n"
        "</code></pre></main>")
    text = load_file(tmp_path / "page.html").blocks[0].text
    assert text == "# 发散函数\n\n发散函数永不返回。\n\n```\nfn foo() -> ! {\n    panic!(\"永不返回\");\n}\n```", text
