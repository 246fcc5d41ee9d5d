"""What kind of message this is, before any retrieval: a harmful request, small talk, or a question. (What a
document says is judged where passages are prepared: `chatbot.grounding.looks_like_injection`.)

Deliberately small and readable pattern lists, in English and Chinese. They are a first line of defence that
works with any model (a 135M model does not refuse reliably by itself), not a complete safety system: the
README says what they do not cover.
"""

from __future__ import annotations

import re

from knowledge.chunking import count_tokens

_HARMFUL = [
    # weapons and explosives
    r"\b(make|build|assemble|synthesi[sz]e|manufacture)\b.{0,40}\b(bomb|explosive|pipe ?bomb|nerve agent|"
    r"bioweapon|chemical weapon|gun silencer|untraceable gun)",
    r"(制作|制造|自制|合成|组装).{0,12}(炸弹|炸药|爆炸物|毒气|神经毒剂|生化武器|枪支)",
    # malware and intrusion
    r"\b(write|create|make|code)\b.{0,40}\b(ransomware|keylogger|malware|virus|trojan|botnet)\b",
    r"\b(hack|break) into\b.{0,40}\b(account|email|server|network|phone|computer)",
    r"\bsteal\b.{0,40}\b(password|credentials?|credit card|identity|data)",
    r"(编写|写|制作|开发).{0,10}(勒索软件|木马|病毒|键盘记录器|恶意软件)",
    r"(盗取|窃取|偷).{0,10}(密码|账号|信用卡|身份|数据)",
    r"(入侵|黑进|破解).{0,10}(账户|账号|邮箱|服务器|网站|手机|电脑)",
    # doxxing and stalking
    r"\b(find|get|track)\b.{0,30}\b(home address|location|phone number) of\b",
    r"(人肉|查到|找到).{0,10}(家庭住址|住址|手机号|行踪)",
    # drugs
    r"\b(make|cook|synthesi[sz]e)\b.{0,30}\b(meth|methamphetamine|heroin|fentanyl|cocaine)\b",
    r"(制作|合成|提炼).{0,10}(冰毒|海洛因|芬太尼|可卡因|毒品)",
]
_SELF_HARM = [
    r"\b(kill|hurt) myself\b", r"\b(suicide|end my life)\b",
    r"(自杀|结束自己的生命|伤害自己|不想活)",
]
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


def classify(text: str) -> str:
    """"harmful", "self_harm", "small_talk" or "question"."""
    text = text.strip()
    if _any(_SELF_HARM, text):
        return "self_harm"
    if _any(_HARMFUL, text):
        return "harmful"
    # Small talk is short: "hello, what is LoRA?" is a question that happens to start with a greeting.
    if _any(_SMALL_TALK, text) and count_tokens(text) <= 6:
        return "small_talk"
    return "question"
