"""Splitting documents into chunks that fit the embedder, by language, with headings kept for citations.

Chinese is split at sentence punctuation (。！？；), English at paragraphs and then sentences. Sentences are
packed into chunks of at most `budget` tokens; each chunk repeats the last `overlap` tokens of sentences of
the one before it, so an answer that straddles a boundary is still found whole. A chunk never spans two
sections: its `heading` ("Title › Section") goes into citations and into the indexed text.

Chunk ids hash the source and the text, so re-indexing an unchanged file gives the same ids.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass

from common.language import CJK_RANGES, detect_language
from knowledge.loaders import Document

_CJK = re.compile(f"[{CJK_RANGES}]")
_TOKEN = re.compile(f"[{CJK_RANGES}]|[^\\W_{CJK_RANGES}]+")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
# A sentence ends after 。！？； (and any closing quote) or at .!? followed by a space; an English ";" does not
# end one.
_SENTENCE_END = re.compile(r"(?<=[。！？；])(?![”’」』）)\]])|(?<=[。！？；][”’」』）)\]])|(?<=[.!?])\s+(?=\S)")


@dataclass(frozen=True)
class Chunk:
    id: str
    source: str
    text: str
    heading: str = ""
    page: int | None = None
    language: str = "en"  # common.language.detect_language of the text: "zh" for Chinese

    @property
    def indexed_text(self) -> str:
        """What the dense and lexical indexes see: the heading gives a passage its topic."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text

    @property
    def label(self) -> str:
        """Where the chunk is from, as a citation shows it."""
        where = self.source + (f", page {self.page}" if self.page else "")
        return f"{where} › {self.heading}" if self.heading else where

    def to_dict(self) -> dict:
        return asdict(self)


def count_tokens(text: str) -> int:
    """A tokenizer-free length: one per CJK character, one per word. MiniLM's WordPiece gives about 1.3
    tokens per English word and 1 per Chinese character, which the default budget allows for."""
    return len(_TOKEN.findall(text))


def language_counts(chunks: list[Chunk]) -> dict[str, int]:
    """How many of `chunks` are in each language."""
    counts: dict[str, int] = {}
    for chunk in chunks:
        counts[chunk.language] = counts.get(chunk.language, 0) + 1
    return counts


def chunk_id(source: str, text: str) -> str:
    return hashlib.sha1(f"{source}\n{text}".encode()).hexdigest()[:16]


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, whether Chinese, English or mixed; paragraphs always end a sentence."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(line.strip() for line in paragraph.splitlines() if line.strip())
        sentences += [s.strip() for s in _SENTENCE_END.split(paragraph) if s and s.strip()]
    return sentences


def sections(text: str) -> list[tuple[str, str]]:
    """(heading path, body) pairs: Markdown headings start sections; the path joins the title and section."""
    path: list[tuple[int, str]] = []
    result, body = [], []
    for line in text.splitlines():
        match = _HEADING.match(line.strip())
        if match:
            result.append((" › ".join(t for _, t in path), "\n".join(body)))
            level = len(match.group(1))
            path = [(lv, t) for lv, t in path if lv < level] + [(level, match.group(2))]
            body = []
        else:
            body.append(line)
    result.append((" › ".join(t for _, t in path), "\n".join(body)))
    return [(heading, body) for heading, body in result if body.strip()]


def pack(sentences: list[str], budget: int, overlap: int) -> list[str]:
    """Greedy packing of sentences into chunks of <= budget tokens, with sentence-level overlap."""
    chunks: list[list[str]] = []
    current: list[str] = []
    for sentence in sentences:
        while count_tokens(sentence) > budget:  # one very long "sentence": cut it by tokens
            head, sentence = _cut(sentence, budget)
            if current:
                chunks.append(current)
                current = []
            chunks.append([head])
        if current and sum(map(count_tokens, current)) + count_tokens(sentence) > budget:
            chunks.append(current)
            carried: list[str] = []
            for previous in reversed(current):
                if sum(map(count_tokens, carried)) + count_tokens(previous) > overlap:
                    break
                carried.insert(0, previous)
            current = carried
        current.append(sentence)
    if current:
        chunks.append(current)
    return [join_sentences(parts) for parts in chunks]


def join_sentences(parts: list[str]) -> str:
    """Sentences back into text: a space after Western punctuation, none after Chinese."""
    text = parts[0]
    for part in parts[1:]:
        text += part if _CJK.match(text[-1]) or text[-1] in "。！？；”’」』）" else " " + part
    return text


def _cut(sentence: str, budget: int) -> tuple[str, str]:
    tokens = list(_TOKEN.finditer(sentence))
    end = tokens[budget - 1].end()
    return sentence[:end].strip(), sentence[end:].strip()


def chunk_document(document: Document, budget: int = 160, overlap: int = 30) -> list[Chunk]:
    chunks, seen = [], set()
    for block in document.blocks:
        if block.qa:
            pieces = [("", block.text)]
        else:
            pieces = [(heading, text) for heading, body in sections(block.text)
                      for text in pack(split_sentences(body), budget, overlap)]
        for heading, text in pieces:
            cid = chunk_id(document.source, f"{block.page}\n{heading}\n{text}")
            if cid not in seen:  # the same text twice in one file is indexed once
                seen.add(cid)
                chunks.append(Chunk(cid, document.source, text, heading, block.page, detect_language(text)))
    return chunks
