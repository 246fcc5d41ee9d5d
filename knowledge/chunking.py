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
from functools import lru_cache

from common.language import CJK_RANGES, detect_language
from knowledge.loaders import Document

_CJK = re.compile(f"[{CJK_RANGES}]")
_TOKEN = re.compile(f"[{CJK_RANGES}]|[^\\W_{CJK_RANGES}]+")
# What MiniLM's WordPiece makes at least one token of: a CJK character, a word, a punctuation mark or symbol. Their
# number is 1.04-1.08x its tokens on the three evaluation corpora (1.2-1.9x for words alone, in code and reference
# text full of symbols), so a chunk of at most WINDOW of them fits the embedder's 256 tokens, heading included.
_PIECE = re.compile(f"[{CJK_RANGES}]|[^\\W_{CJK_RANGES}]+|[^\\w\\s]|_")
WINDOW = 224
# A Markdown heading: at most three spaces before its "#"s (CommonMark); a "#" line indented further is
# code or text (a shell comment, a config file's "# comment" line), not a heading.
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")  # a line that opens or closes a Markdown code block
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


@lru_cache(maxsize=4096)
def _size(part: str) -> tuple[int, int]:
    """(words, pieces) of a sentence or line, measured once however often packing weighs it."""
    return count_tokens(part), len(_PIECE.findall(part))


def _fits(parts: list[str], budget: int) -> bool:
    """Whether `parts` together keep to `budget` words and to the embedder's window (`WINDOW`)."""
    sizes = [_size(p) for p in parts]
    return sum(w for w, _ in sizes) <= budget and sum(p for _, p in sizes) <= WINDOW


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


def sentence_units(chunk: Chunk) -> list[str]:
    """What a chunk of several sentences is also embedded as, one vector each: each sentence under the chunk's
    heading. A question that paraphrases one sentence of a long chunk is nearer that sentence than the chunk's
    average (`knowledge.segment.Segment.search` ranks a chunk by both). A chunk of one sentence has none."""
    sentences = split_sentences(chunk.text)
    if len(sentences) < 2:
        return []
    return [f"{chunk.heading}\n{s}" if chunk.heading else s for s in sentences]


def sections(text: str) -> list[tuple[str, str]]:
    """(heading path, body) pairs: Markdown headings start sections; the path joins the title and section. A "#"
    line inside a fenced code block, or indented four spaces or more, is code or text, not a heading."""
    path: list[tuple[int, str]] = []
    result, body = [], []
    fenced = False
    for line in text.splitlines():
        fenced ^= bool(_FENCE.match(line))
        match = None if fenced else _HEADING.match(line.rstrip())
        if match:
            result.append((" › ".join(t for _, t in path), "\n".join(body)))
            level = len(match.group(1))
            path = [(lv, t) for lv, t in path if lv < level] + [(level, match.group(2))]
            body = []
        else:
            body.append(line)
    result.append((" › ".join(t for _, t in path), "\n".join(body)))
    return [(heading, body) for heading, body in result if body.strip()]


def runs(body: str) -> list[tuple[bool, str]]:
    """(is code, text) runs of a section: its fenced code blocks (without the fences) apart from the prose around
    them."""
    out: list[tuple[bool, list[str]]] = []
    fenced = False
    for line in body.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            out.append((fenced, []))
        elif out and out[-1][0] == fenced:
            out[-1][1].append(line)
        else:
            out.append((fenced, [line]))
    return [(code, "\n".join(lines)) for code, lines in out if "".join(lines).strip()]


def pack_code(code: str, budget: int) -> list[str]:
    """A code block in chunks of whole lines of <= budget tokens (a longer line is cut), its line breaks kept."""
    chunks: list[list[str]] = [[]]
    for line in code.strip("\n").splitlines():
        while not _fits([line], budget):
            head, line = _cut(line, budget)
            chunks += [[head], []]
        if chunks[-1] and not _fits(chunks[-1] + [line], budget):
            chunks.append([])
        chunks[-1].append(line)
    return ["\n".join(lines) for lines in chunks if "".join(lines).strip()]


def pack(sentences: list[str], budget: int, overlap: int) -> list[str]:
    """Greedy packing of sentences into chunks of <= budget tokens that fit the embedder's window, with
    sentence-level overlap."""
    chunks: list[list[str]] = []
    current: list[str] = []
    for sentence in sentences:
        while not _fits([sentence], budget):  # one very long "sentence": cut it by tokens
            head, sentence = _cut(sentence, budget)
            if current:
                chunks.append(current)
                current = []
            chunks.append([head])
        if current and not _fits(current + [sentence], budget):
            chunks.append(current)
            carried: list[str] = []
            for previous in reversed(current):  # (what is carried over leaves room for the sentence)
                if (sum(_size(p)[0] for p in [previous, *carried]) > overlap
                        or not _fits([previous, *carried, sentence], budget)):
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
    """The longest head of `sentence` that fits (`_fits`), and the rest."""
    words = end = 0
    for number, piece in enumerate(_PIECE.finditer(sentence), 1):
        words += bool(_TOKEN.fullmatch(piece.group()))
        if words > budget or number > WINDOW:
            break
        end = piece.end()
    return sentence[:end].strip(), sentence[end:].strip()


def chunk_document(document: Document, budget: int = 160, overlap: int = 30) -> list[Chunk]:
    chunks, seen = [], set()
    for block in document.blocks:
        pieces: list[tuple[str, str, str | None]] = []  # (heading, text, language; None: detect it from the text)
        if block.qa:
            pieces.append(("", block.text, None))
        else:
            # A section's code blocks are chunks of their own, packed together after its prose, which is packed
            # as if they were not there: a question in words is answered by the prose, and a chunk that mixes
            # both would match it through the words repeated in the code and its comments. Code is in the
            # language of the prose around it (a Chinese page's examples are for Chinese readers).
            for heading, body in sections(block.text):
                prose = pack(split_sentences("\n\n".join(run for code, run in runs(body) if not code)), budget,
                             overlap)
                code = pack_code("\n\n".join(run for code, run in runs(body) if code), budget)
                language = detect_language(prose[0]) if prose and code else None
                pieces += [(heading, text, None) for text in prose] + [(heading, text, language) for text in code]
        for heading, text, language in pieces:
            cid = chunk_id(document.source, f"{block.page}\n{heading}\n{text}")
            if cid not in seen:  # the same text twice in one file is indexed once
                seen.add(cid)
                chunks.append(Chunk(cid, document.source, text, heading, block.page,
                                    language or detect_language(text)))
    return chunks
