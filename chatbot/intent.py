"""What kind of message this is, before any retrieval: a harmful request (judged by `chatbot.safety`), small
talk, or a question. (What a document says is judged where passages are prepared:
`chatbot.grounding.looks_like_injection`.) Both work with any model: a 135M model does not refuse reliably by
itself.
"""

from __future__ import annotations

import re

from chatbot.safety import SafetyGuard, judge
from knowledge.chunking import count_tokens

_SMALL_TALK = [
    r"^(hi|hello|hey|good (morning|afternoon|evening)|greetings)\b",
    r"^(thanks|thank you|thx|cheers)\b",
    r"^(bye|goodbye|see you)\b",
    r"^(who are you|what are you|what can you do|how are you)\b",
    r"^(你好|您好|嗨|哈喽|早上好|下午好|晚上好)",
    r"^(谢谢|多谢|感谢)",
    r"^(再见|拜拜)",
    r"^(你是谁|你是什么|你能做什么|你会什么|你好吗)",
]


def _any(patterns: list[str], text: str) -> bool:
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def classify(text: str, guard: SafetyGuard | None = None) -> str:
    """"harmful", "self_harm", "help_lines" (asks for a crisis line), "small_talk" or "question"; `guard` adds the
    learned classifiers (and a guard model) to the safety patterns."""
    text = text.strip()
    verdict = guard.judge(text) if guard else judge(text)
    if verdict.harmful:
        return "self_harm" if verdict.self_harm else "harmful"
    if verdict.help_lines:
        return "help_lines"
    # Small talk is short: "hello, what is LoRA?" is a question that happens to start with a greeting.
    if _any(_SMALL_TALK, text) and count_tokens(text) <= 6:
        return "small_talk"
    return "question"
