"""Which language a text is in, and which script its characters belong to: one definition for the whole project.

langdetect is seeded (it is random otherwise) and is only trusted on Latin-script text long enough to judge;
scripts that identify a language by themselves (Han, kana, hangul) are decided by counting characters,
because langdetect often calls short Chinese "ko" or "ja". Used for messages (the reply language) and for
document chunks (which passages match the question's language).
"""

from __future__ import annotations

import re

from langdetect import DetectorFactory, LangDetectException, detect

DetectorFactory.seed = 0  # deterministic results

LANGUAGE_NAMES = {
    "en": "English", "zh": "Simplified Chinese (简体中文)", "ja": "Japanese", "ko": "Korean",
    "fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "ru": "Russian", "nl": "Dutch", "ar": "Arabic", "vi": "Vietnamese",
}

# CJK Unified Ideographs, Extension A and the compatibility ideographs: the characters of written Chinese.
HAN_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
KANA_RANGES = "\u3040-\u30ff"
HANGUL_RANGES = "\uac00-\ud7af"
CJK_RANGES = HAN_RANGES + KANA_RANGES + HANGUL_RANGES  # scripts written without spaces between words
HAN = re.compile(f"[{HAN_RANGES}]")
_KANA = re.compile(f"[{KANA_RANGES}]")
_HANGUL = re.compile(f"[{HANGUL_RANGES}]")
_LETTER = re.compile(r"[^\W\d_]")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")
_ENGLISH_FUNCTION_WORDS = frozenset(
    "the what how is does do did can could should would which when why who whose are was were you your my i an to "
    "of and with this that these those there it its from about me for please have has will".split())
MIN_LETTERS = 12  # below this, langdetect guesses ("hi" -> "so"); keep the conversation's language


def detect_language(text: str, default: str = "en") -> str:
    """ISO 639-1 code of `text` ("en", "zh", ...); `default` when the text is too short to tell."""
    letters = _LETTER.findall(text)
    if not letters:
        return default
    kana, hangul, han = len(_KANA.findall(text)), len(_HANGUL.findall(text)), len(HAN.findall(text))
    if kana:
        return "ja"
    if hangul > han:
        return "ko"
    # A Han character carries about a word, and Chinese users mix in English terms ("什么是 retrieval-augmented
    # generation？"): Chinese unless Latin words clearly outnumber Han characters ("How do I say 你好?").
    if han and han * 2 >= len(_LATIN_WORD.findall(text)):
        return "zh"
    if len(letters) < MIN_LETTERS:
        return default
    # langdetect misreads short English questions with full confidence ("What is underfitting?" -> de,
    # "How does LoRA work?" -> af); two English function words settle it first.
    words = _LATIN_WORD.findall(text.lower())
    if sum(word in _ENGLISH_FUNCTION_WORDS for word in words) >= 2:
        return "en"
    try:
        code = detect(text)
    except LangDetectException:
        return default
    return "zh" if code.startswith("zh") else code


def letters(text: str) -> str:
    """The letters and digits of `text`, lower-cased: how two phrasings of one request are compared."""
    return "".join(c for c in text.lower() if c.isalnum())


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)
