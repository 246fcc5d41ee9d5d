"""Reading documents into text blocks: .txt .md .html .pdf .docx, and question/answer pairs from .jsonl/.csv.

    doc = load_file(Path("notes/lora.md"), source="lora.md")
    doc.blocks   # [Block(text="# LoRA\n...", page=None, qa=False), ...]

A file that cannot be used raises LoadError with the reason (binary, corrupt, empty, too large, unknown
encoding); `build` reports it with the path and goes on with the other files. Headings stay in the text as
Markdown `#` lines (HTML <h1>, Word "Heading 1" become them) so the chunker can keep them as context.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
SUFFIXES = TEXT_SUFFIXES | {".html", ".htm", ".pdf", ".docx", ".jsonl", ".csv"}
# GB18030 is a superset of GBK and GB2312, so it reads all three; UTF-8 goes first because random bytes
# rarely form valid UTF-8, whereas GB18030 accepts much more.
ENCODINGS = ("utf-8-sig", "gb18030")
QUESTION_KEYS = ("question", "q", "prompt", "instruction", "问题")
ANSWER_KEYS = ("answer", "a", "response", "output", "答案", "回答")


class LoadError(ValueError):
    """A file that cannot be indexed; the message says why."""


@dataclass
class Block:
    text: str
    page: int | None = None  # PDF page number, 1-based
    qa: bool = False  # a question/answer pair: indexed as one chunk, never split or merged


@dataclass
class Document:
    source: str  # the path shown in citations, relative to the folder it was added from
    blocks: list[Block] = field(default_factory=list)


def decode(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise LoadError("binary file (contains NUL bytes)")
    for encoding in ENCODINGS:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise LoadError("unreadable text encoding (not UTF-8 or GB18030/GBK)")


def _read_html(data: bytes) -> list[Block]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(decode(data), "html.parser")
    for tag in soup(["script", "style", "nav", "footer", "head", "button", "form", "template", "noscript"]):
        tag.decompose()
    # A page that marks its content (<main>, role="main", <article>) is read from there only: menus, pop-up help
    # and banners around it are the same on every page of a site and would crowd each page's first chunk.
    soup = soup.find("main") or soup.find(attrs={"role": "main"}) or soup.find("article") or soup
    lines = []
    for element in soup.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "td", "blockquote"]):
        if element.find_parent(["p", "li", "td", "blockquote"]):
            continue
        if element.name == "pre":  # code keeps its lines, fenced as in Markdown (knowledge.chunking keeps it apart)
            code = element.get_text().strip("\n")
            if code.strip():
                lines.append(f"```\n{code}\n```")
            continue
        text = " ".join(element.get_text(" ", strip=True).split())
        if text:
            lines.append("#" * int(element.name[1]) + " " + text if element.name[0] == "h" else text)
    if not lines:  # a page without block tags: take its text as it is
        lines = [soup.get_text("\n", strip=True)]
    return [Block("\n\n".join(lines))]


def _read_pdf(data: bytes) -> list[Block]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise LoadError("encrypted PDF")
        return [Block(page.extract_text() or "", page=number) for number, page in enumerate(reader.pages, 1)]
    except (PdfReadError, ValueError, KeyError, TypeError) as err:
        raise LoadError(f"corrupt PDF ({type(err).__name__}: {err})") from err


def _read_docx(data: bytes) -> list[Block]:
    import zipfile

    from docx import Document as DocxDocument

    try:
        document = DocxDocument(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise LoadError(f"corrupt .docx ({type(err).__name__})") from err
    lines = []
    for paragraph in document.paragraphs:
        text = paragraph.text.strip()
        style = (paragraph.style.name if paragraph.style is not None else "") or ""
        if text and style.startswith("Heading") and style[-1:].isdigit():
            text = "#" * int(style[-1]) + " " + text
        elif text and style == "Title":
            text = "# " + text
        if text:
            lines.append(text)
    return [Block("\n\n".join(lines))]


def _qa_block(record: dict, where: str) -> Block:
    lower = {str(k).strip().lower(): v for k, v in record.items()}
    question = next((lower[k] for k in QUESTION_KEYS if lower.get(k)), None)
    answer = next((lower[k] for k in ANSWER_KEYS if lower.get(k)), None)
    if not question or not answer:
        raise LoadError(f"{where}: expected a question and an answer field ({'/'.join(QUESTION_KEYS)}; "
                        f"{'/'.join(ANSWER_KEYS)}), found {sorted(lower)}")
    return Block(f"Q: {str(question).strip()}\nA: {str(answer).strip()}", qa=True)


def _read_jsonl(data: bytes) -> list[Block]:
    blocks = []
    for number, line in enumerate(decode(data).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LoadError(f"line {number}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise LoadError(f"line {number}: expected a JSON object")
        blocks.append(_qa_block(record, f"line {number}"))
    return blocks


def _read_csv(data: bytes) -> list[Block]:
    rows = csv.DictReader(io.StringIO(decode(data)))
    return [_qa_block(row, f"row {number}") for number, row in enumerate(rows, 2)]


def check_size(path: Path, max_bytes: int) -> None:
    """LoadError for a file larger than `max_bytes`, found from its size alone (nothing is read)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise LoadError(f"too large ({size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB)")


def load_file(path: Path, source: str | None = None, max_bytes: int = 50 * 2**20) -> Document:
    """Read `path` into a Document; raise LoadError for anything that cannot be indexed."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LoadError(f"unsupported file type '{suffix}' (supported: {' '.join(sorted(SUFFIXES))})")
    try:
        check_size(path, max_bytes)
        data = path.read_bytes()
    except OSError as err:
        raise LoadError(f"cannot read ({err.strerror or err})") from err
    if suffix in TEXT_SUFFIXES:
        blocks = [Block(decode(data))]
    else:
        reader = {".html": _read_html, ".htm": _read_html, ".pdf": _read_pdf, ".docx": _read_docx,
                  ".jsonl": _read_jsonl, ".csv": _read_csv}[suffix]
        blocks = reader(data)
    blocks = [b for b in blocks if b.text.strip()]
    if not blocks:
        raise LoadError("no text in it (empty, or a scanned PDF without a text layer)")
    return Document(source=source or path.name, blocks=blocks)


def find_files(paths: list[Path]) -> list[tuple[Path, str]]:
    """(file, source) for every file under `paths`: a folder's files are named relative to the folder,
    a file given directly by its name. Hidden files and folders are skipped; the order is stable."""
    found = []
    for root in paths:
        if root.is_dir():
            for file in sorted(root.rglob("*")):
                relative = file.relative_to(root)
                if file.is_file() and not any(part.startswith(".") for part in relative.parts):
                    found.append((file, relative.as_posix()))
        elif root.exists():
            found.append((root, root.name))
        else:
            raise FileNotFoundError(f"{root} does not exist")
    return found
