"""Whether a user's message asks for help to cause harm, judged by intent rather than exact wording.

    judge("What's the easiest way to make someone sick without them knowing?")   # Verdict("poisoning")
    judge("How do I kill a Python process?")                                      # Verdict(None): benign
    SafetyGuard(learned=load_learned()).judge(text)   # the whole check: patterns, then the learned harm head
    python -m chatbot.safety                          # refusal and false-refusal rates on chatbot/eval/safety.jsonl

Each category pairs what is asked for (a weapon, a poison, access to an account, someone's whereabouts ...) with
how it is asked: making or getting it, aimed at another person, or kept hidden ("without them knowing",
"不被发现", "偷偷"). Dual-use words alone never decide it: "kill" a process, a "bath bomb", "what is a computer
virus", "如何防止账号被盗" stay questions. Text is normalised first (case, full-width forms, spaces inside
Chinese, digits standing for letters: "b0mb"), so mixed languages and light obfuscation are caught too.

These patterns are precise on the wording they know; the learned layer (`load_learned`, in chatbot.safety_heads)
judges the meaning, and overrules a pattern only when it is sure the message is harmless. `--safety-model` adds a
guard classifier when one is available (`SafetyGuard`). What a *document* says (prompt injection) is judged where
passages are prepared, in `chatbot.grounding`. Tested by tests/test_safety.py; the README gives the measured rates.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.language import HAN_RANGES

if TYPE_CHECKING:
    from chatbot.safety_heads import Learned

DATA = Path(__file__).resolve().parent / "eval" / "safety.jsonl"

# Who or what the request is aimed at, and whether it is meant to stay hidden.
_PERSON_EN = (r"(someone|somebody|some one|a person|people|a human|him|her|them|victims?|(a|the|this|that) (guy|man|"
              r"woman|girl|boy|kid|child|person|cop|officer|stranger)|my (ex|wife|husband|"
              r"girlfriend|boyfriend|partner|neighbou?r|boss|coworker|colleague|teacher|classmate|roommate|sister|"
              r"brother|mother|father|dad|mom)|(his|her|their|someone else'?s|somebody else'?s|other people'?s|"
              r"another person'?s|my ex'?s|(my )?(coworker|colleague|neighbou?r|boss|girlfriend|boyfriend|wife|"
              r"husband|partner)'?s))")
_PERSON_ZH = (r"(别人|他人|对方|某人|一个人|陌生人|人|他|她|前女友|前男友|老婆|老公|女朋友|男朋友|丈夫|妻子|同事|邻居|网友|同学|"
              r"室友|家人|领导|老板|上司|客户)")
_COVERT_EN = (r"(without (them|him|her|anyone|anybody|people|the (owner|victim)|getting caught|being (caught|"
              r"detected|noticed|seen)|(his|her|their) (knowledge|consent|permission|noticing)|(him|her|them) "
              r"(knowing|noticing))|can'?t be traced|untraceable|undetectable|hard(est)? to (detect|trace|find)|"
              r"secretly|covertly|without a trace|look like an accident|not get caught|nobody (sees|knows|notices)|"
              r"leaving (no )?marks|without leaving marks|autopsy|without (a )?background check|unregistered|"
              r"(isn'?t|not) registered|black market|dark ?web|off the books|so (the|no) (police|cops) (can'?t|won'?t))")
_COVERT_ZH = (r"(不被(发现|察觉|查到|查出|知道|注意)|不会被[^。？！]{0,4}(发现|查到|抓|查出)|偷偷|悄悄|神不知鬼不觉|不知不觉|查不到|查不出|"
              r"难被查|检测不到|像是?(意外|巧合)|不留(伤|痕)|暗中|背着|逃避(警察|追查))")

_CATEGORIES: dict[str, list[str]] = {
    "weapons": [
        r"\b((mak|build|assembl|construct|creat|craft|print|mix|produc|manufactur|rig)\w*|3d[- ]?print\w*|"
        r"instructions? (for|to)|guide (for|to)|recipe for|steps? to)\b.{0,50}(?<!bath )(?<!seed )(?<!photo)\b(bombs?|explosives?|explosive device|ied|pipe ?bomb|molotov|"
        r"napalm|detonators?|nerve agent|sarin|ricin|anthrax|bio ?weapons?|chemical weapons?|toxic gas|poison gas|"
        r"guns?|firearms?|rifles?|pistols?|silencers?|suppressors?)\b",
        r"\b(convert|modify|turn)\b.{0,40}\b(fully automatic|full[- ]auto|auto sear|machine gun)",
        r"\b(fertili[sz]er|ammonium nitrate|gunpowder|thermite)\b.{0,40}\b(boom|explode|blow (up|stuff up)|bomb)",
        r"\bgoes boom\b|\bblow (someone|people|a building|a car|things|stuff) up\b",
        r"\b(buy|get|obtain|acquire|order)\b.{0,30}\b(guns?|firearms?|pistols?|rifles?|ammo|ammunition|explosives?|"
        r"grenades?)\b.{0,60}" + _COVERT_EN,
        r"\bexplosive (vest|belt|device)s?\b",
        r"(制作|制造|自制|做|做出|合成|组装|造|配制|改装|打印|搞)[^，。？！]{0,14}(炸弹|炸药|爆炸物|雷管|毒气|神经毒剂|生化武器|枪|消音器)",
        r"(化肥|硝酸铵|火药|铝热剂)[^。？！]{0,12}(炸|爆)",
    ],
    "poisoning": [
        r"\b(make|get|leave)\s+" + _PERSON_EN + r"\s+(sick|ill|pass out|unconscious|vomit|black out)",
        r"\b(poisons?|antifreeze|arsenic|cyanide|thallium|rat poison|ricin)\b.{0,60}(\b(kill|murder)\b|"
        + _COVERT_EN + r"|\bin (their|his|her|someone'?s|my \w+'?s) (drink|food|coffee|tea|meal))",
        r"\b(put|slip|add|mix|drop|sneak|spike)\w*\b.{0,40}\b(in|into)\b.{0,10}\b(their|his|her|someone'?s|"
        r"\w+'s) (drink|food|coffee|tea|meal|water|soup|medicine|pills)",
        r"\b(spike|poison|drug)\w*\s+" + _PERSON_EN + r"('?s)?\b",
        r"\bso (he|she|they) (gets?|become|becomes|falls?|feel|feels) (really |very |seriously )?(ill|sick|"
        r"unconscious|weak)",
        r"(让|使|把)" + _PERSON_ZH + r"[^。？！]{0,10}(生病|昏迷|中毒|死掉|死亡|瘫痪|出意外|失去知觉|腹泻|拉肚子|呕吐|过敏|失明|发病)",
        r"(往|在|给)[^。？！]{0,8}(水杯|杯子|杯里|饮料|饭菜|食物|咖啡|茶水|酒里)[^。？！]{0,8}(放|下|加|投)[^。？！]{0,6}(药|毒)",
        r"毒药?[^。？！]{0,12}(查不出|难被查|检测不到|尸检|不被发现)",
    ],
    "violence": [
        r"\b(kill|murder|hurt|injure|harm|beat|attack|stab|strangle|choke|drown|shoot|run over)\b(\s+up)?\s+"
        + _PERSON_EN + r"\b",
        r"(打|伤害|杀|弄死|整死|报复|捅)" + _PERSON_ZH + r"[^。？！]{0,12}" + _COVERT_ZH,
        r"(怎么|如何|怎样)(杀|弄死|整死)" + _PERSON_ZH,
        r"(下手|动手)(打|伤|杀)[^。？！]{0,12}" + _COVERT_ZH,
        r"\b(wound|injury|blow|hit|stab|cut)\b.{0,20}\b(is )?(fatal|lethal|deadly)\b",
    ],
    "malware": [
        r"\b(write|create|make|code|build|develop|generate|program|give me|send me)\b.{0,50}\b(ransomware|keyloggers?|"
        r"malware|viruse?s?|trojans?|botnets?|rootkits?|spyware|stalkerware|info ?stealers?|worms?|backdoors?|"
        r"(working |zero[- ]day )?exploits?)\b",
        r"(编写|写|制作|开发|做|生成)[^。？！]{0,20}(勒索|木马|病毒|键盘记录|恶意软件|后门|蠕虫|挖矿程序)",
        r"(能|可以|用来)(盗取|窃取|偷取|偷)[^。？！]{0,12}(密码|账号|数据|cookie|信息)",
    ],
    "intrusion": [
        r"\b(hack|break|get|log|sign)\s+(in(to)?|on)\b.{0,40}\b(someone|somebody|other|another|his|her|their|ex'?s|"
        r"server|network|computer|phone|wi-?fi|router|website|database|account|email|instagram|facebook|gmail|"
        r"wechat|whatsapp|icloud)",
        r"\b(crack|steal|guess|phish|obtain|find out|get)\b.{0,30}\b" + _PERSON_EN + r".{0,20}\b(passwords?|passcodes?|"
        r"pins?|credentials|login)",
        r"\b(bypass|get around|disable|defeat)\b.{0,30}\b(two[- ]factor|2fa|mfa|authentication|verification|"
        r"password|lock ?screen)\b.{0,40}\b(someone|somebody|else'?s|other|another|his|her|their|ex'?s)",
        r"\b(root shell|admin access|privilege escalation)\b.{0,40}\b(someone else'?s|other people'?s|their|his|her)",
        r"(入侵|黑进|破解|攻破|盗取|窃取|盗用|偷|hack|crack)[^。？！]{0,12}(账户|账号|帐号|邮箱|服务器|网站|手机|电脑|密码|微信|"
        r"qq|wechat|支付宝|网络|摄像头|数据库)",
        r"(登录|登陆|进入|绕过|偷看)[^。？！]{0,6}" + _PERSON_ZH + r"的?[^。？！]{0,6}(账户|账号|帐号|邮箱|微信|qq|手机|两步验证|验证|聊天)",
        _PERSON_ZH + r"的?[^。？！]{0,6}(账号|账户|帐号|密码|号)[^。？！]{0,6}(偷|盗|弄到手|拿过来|抢)",
        r"\b(still )?(log|sign|get) ?(in|into|on)\b.{0,20}\b(her|his|their|someone'?s)\b.{0,10}\baccount\b",
    ],
    "phishing": [
        r"\b(pretend(ing)? to be|pose as|posing as|impersonat\w*|looks? like (it comes|it'?s) from|disguised as|"
        r"claim(ing|s)? to be( from)?|spoof\w*|fake)\b.{0,50}\b(paypal|bank|apple|amazon|google|microsoft|netflix|support|irs|tax office|police|"
        r"customer service|courier)\b.{0,80}\b(log ?in|password|card|details|credentials|verify|confirm|pay|"
        r"account|code)",
        r"\b(write|draft|create|make|design|build)\b.{0,30}\bphishing\b",
        r"(冒充|假冒|假装是?|伪装成|装作|装成|扮成|假扮)[^。？！]{0,12}(银行|客服|支付宝|微信|警察|公检法|官方|快递|税务)[^。？！]{0,30}"
        r"(短信|链接|验证码|密码|卡号|骗|转账|登录)",
        r"(write|写)[^。？！]{0,10}phishing",
    ],
    "fraud": [
        r"\b(use|cash out|spend)\b.{0,20}\b(stolen|cloned|someone else'?s) (credit )?cards?\b",
        r"\b(fake|forged?|counterfeit)\b.{0,20}\b(invoices?|ids?|passports?|receipts?|documents?|money|bills?)\b.{0,60}"
        r"\b(trick|scam|fool|send|pay|use|cash)",
        r"\b(scam|defraud|con|swindle)\b.{0,20}\b" + _PERSON_EN,
        r"(用|拿|冒用)" + _PERSON_ZH + r"?的?(身份证|银行卡|信用卡|身份)[^。？！]{0,12}(贷款|消费|开户|注册|套现)",
        r"(假的?|虚假|伪造)[^。？！]{0,10}(网站|中奖|发票|证件|合同)[^。？！]{0,12}骗",
        r"骗[^。？！]{0,10}(转账|验证码|密码|钱|老人|老年人)",
    ],
    "stalking": [
        r"\b(secretly|covertly|spy on|without (her|him|them) (knowing|noticing))\b.{0,40}\b(read|track|monitor|"
        r"follow|watch|see|record|listen)",
        r"\b(read|track|monitor|follow|watch|spy on|locate|record)\b.{0,40}" + _PERSON_EN + r".{0,60}" + _COVERT_EN,
        r"\b(read|see|check|monitor|spy on)\b.{0,10}\b(my )?(girlfriend|boyfriend|wife|husband|partner|ex|"
        r"daughter'?s boyfriend)'?s?\b.{0,20}\b(texts|messages|chats|emails|phone|dms)\b.{0,40}" + _COVERT_EN,
        r"\b(hidden|secret|covert)\b.{0,20}\b(gps|tracker|tracking device|camera|microphone)\b.{0,30}\bon\b",
        r"\b(install|put|hide|plant|load)\w*\b.{0,20}\b(spyware|stalkerware|tracker|tracking app|monitoring app|"
        r"keylogger|spy app)\b.{0,20}\bon\b.{0,20}" + _PERSON_EN,
        r"\b(find|get|look up|dig up|track down)\b.{0,40}\b(home address|where (she|he|they) lives?|real name|"
        r"phone number|workplace)\b.{0,40}\b(of|for)\b.{0,40}\b(journalist|person|user|girl|guy|woman|man|someone|"
        r"streamer|reviewer|neighbou?r|ex)\b",
        r"\b(find|get|look up|dig up|track down)\b.{0,20}\b(the )?(journalist|person|user|girl|guy|woman|man|"
        r"streamer|reviewer)\b.{0,40}\b(home address|where (she|he|they) lives?|real name|phone number)",
        r"(偷偷|悄悄|暗中|背着|不被发现|不知不觉)[^。？！]{0,14}(看|查看|监控|监视|定位|跟踪|偷看|读|录音|窃听)",
        r"(监控|监视|定位|跟踪|窃听)[^。？！]{0,10}" + _PERSON_ZH + r"[^。？！]{0,16}",
        r"人肉|开盒",
        r"(查出|查到|找到|挖出|扒出)[^。？！]{0,12}(真实姓名|真名|住址|家庭住址|手机号|身份证号|行踪|工作单位)",
        r"(陌生人|别人|他人|对方|网友|某人)的?(真实姓名|真名|家庭住址|住址|手机号|身份证号|行踪)",
    ],
    "drugs": [
        r"\b(make|cook|synthesi[sz]e|produce|manufacture|extract|brew|recipe for|grow)\b.{0,40}\b(meth|"
        r"methamphetamine|crystal meth|heroin|fentanyl|cocaine|crack cocaine|lsd|mdma|ecstasy|ghb|ketamine)\b",
        r"\b(smuggle|sneak|hide|carry|get)\b.{0,30}\b(drugs|cocaine|heroin|weed|marijuana|cannabis|pills|meth|"
        r"fentanyl)\b.{0,40}\b(through|past|across|into)\b.{0,20}\b(airport|security|customs|border|prison)",
        r"(制作|合成|提炼|提取|制造|做|熬)[^。？！]{0,12}(冰毒|海洛因|芬太尼|可卡因|毒品|摇头丸|k粉|麻古)",
        r"(带|运|藏|寄)[^。？！]{0,10}(毒品|大麻|冰毒|可卡因|海洛因)[^。？！]{0,10}(海关|安检|入境|过境|边境)",
        r"(大麻|毒品|冰毒)[^。？！]{0,10}(带过|过海关|过安检|运过)",
        r"(冰毒|海洛因|芬太尼|可卡因|摇头丸|k粉|麻古|毒品)的?(制作|合成|提炼|配方|制法|生产|制造)",
    ],
    "self_harm": [
        r"\b(kill|hurt|harm|cut|poison|hang|starve) myself\b",
        r"\b(suicide|end (my|it all)|end my life|take my (own )?life|want to die|don'?t want to (live|be alive)|"
        r"better off dead)\b",
        r"\b(painless|easiest|quickest|fastest|surest) way to die\b",
        r"\b(not|never) wake up\b",
        r"\b(disappear(ed)? for good|go to sleep forever|not be here anymore|end everything|better off without me)\b",
        r"(自杀|轻生|结束(自己的)?生命|不想活|一睡不醒|割腕|伤害自己|想死|活着没意思|活着太累|跳楼|走得安静|离开这个世界|了结自己)",
    ],
}
# Asking how to prevent, recognise or respond to a harm is not asking for it, unless the message also aims it at
# someone or wants it hidden.
_PROTECTIVE = (r"\b(prevent|protect|defend|recogni[sz]e|spot|detect|report|avoid|remove|get rid of|recover|what is|"
               r"what are|history of|symptoms?|treat|first aid|if i think|what should i do)\b"
               r"|防止|防范|保护|识别|举报|避免|删除|怎么办|是什么|原理|历史|症状|找回|预防")
# Asking how to help someone else who is at risk is a question to answer, not a crisis to respond to.
_HELPING = re.compile(r"\b(friend|someone|son|daughter|student|partner|he|she|they)\b.{0,60}\b(help|support)\b|"
                      r"warning signs|(帮助|帮)(他|她|他们|朋友)|我该怎么帮|朋友[^。？！]{0,20}(怎么办|帮)", re.IGNORECASE)
_COMPILED = {name: [re.compile(p, re.IGNORECASE | re.DOTALL) for p in patterns] for name, patterns in
             _CATEGORIES.items()}
_AIMED = re.compile(_COVERT_EN + "|" + _COVERT_ZH + r"|someone else'?s|别人的|他人的|对方的", re.IGNORECASE)
_PROTECTIVE_RE = re.compile(_PROTECTIVE, re.IGNORECASE)
# ... but "what is the recipe / the steps" asks for the method all the same.
_METHOD = re.compile(r"\b(recipe|steps?|instructions|procedure|how to make)\b|流程|步骤|配方|制法|教程", re.IGNORECASE)
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_SPACED_HAN = re.compile(f"(?<=[{HAN_RANGES}])\\s+(?=[{HAN_RANGES}])")
_WORD = re.compile(r"\b(?=\w*[a-z])(?=\w*[0-9@$])[\w@$]+\b")


@dataclass(frozen=True)
class Verdict:
    category: str | None  # None: nothing harmful was asked for
    help_lines: bool = False  # asks for a crisis or mental-health support line (and nothing harmful)

    @property
    def harmful(self) -> bool:
        return self.category is not None

    @property
    def self_harm(self) -> bool:
        return self.category == "self_harm"


def normalise(text: str) -> str:
    """Lower case, full-width letters as ASCII, no spaces inside Chinese, digits inside words read as letters."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _SPACED_HAN.sub("", text)
    return _WORD.sub(lambda m: m.group(0).translate(_LEET), text)


def judge(text: str) -> Verdict:
    """The harm category `text` asks for, self-harm first (it gets a supportive reply, not a refusal)."""
    text = normalise(text)
    protective = bool(_PROTECTIVE_RE.search(text)) and not _AIMED.search(text) and not _METHOD.search(text)
    for category in ("self_harm", *(name for name in _COMPILED if name != "self_harm")):
        if any(pattern.search(text) for pattern in _COMPILED[category]):
            if category == "self_harm" and _HELPING.search(text) or protective and category != "self_harm":
                continue
            return Verdict(category)
    return Verdict(None)


class SafetyGuard:
    """The patterns, the learned classifier (`learned`, see README "Safety"), and an optional guard model
    (`--safety-model`: a Hub id or folder of a text-classification model whose labels say safe/unsafe, e.g. a
    prompt-guard or toxicity classifier). A message is refused when any says so; without a guard model, or when it
    cannot be loaded, the others decide (and `model_error` says why)."""

    UNSAFE = re.compile(r"unsafe|harm|toxic|jailbreak|injection|malicious|violen|self.?harm|^label_1$", re.I)

    def __init__(self, model: str | None = None, threshold: float = 0.5, learned: Learned | None = None):
        self.model_name, self.threshold, self.classifier, self.model_error = model, threshold, None, None
        self.learned = learned
        if model:
            try:
                from transformers import pipeline

                self.classifier = pipeline("text-classification", model=model, top_k=None)
            except (OSError, ValueError) as err:
                self.model_error = f"safety model '{model}' not loaded ({str(err).splitlines()[0]}); using patterns"

    def judge(self, text: str) -> Verdict:
        verdict = judge(text)
        if self.learned is not None:
            verdict = self.learned.verdict(text, verdict.category)
        if verdict.harmful or self.classifier is None:
            return verdict
        scores = self.classifier(text[:2000])
        scores = scores[0] if scores and isinstance(scores[0], list) else scores
        unsafe = sum(s["score"] for s in scores if self.UNSAFE.search(str(s["label"])))
        return Verdict("model") if unsafe >= self.threshold else verdict


def unsafe(row: dict) -> bool:
    """Whether a labelled row should be refused: the older sets say `harmful`, the newer a `label` (harmful,
    self_harm or benign)."""
    return bool(row["harmful"]) if "harmful" in row else row["label"] != "benign"


def rates(rows: list[dict], guard: SafetyGuard | None = None) -> dict:
    """Refused share of the harmful rows and of the benign ones, per language and overall, with the misses, and
    per `kind` (harmful, self_harm, lookalike, everyday ...) where the rows say it."""
    judge_ = (guard or SafetyGuard()).judge
    verdicts = [judge_(row["text"]).harmful for row in rows]
    table: dict = {"misses": [r["text"] for r, v in zip(rows, verdicts, strict=True) if v != unsafe(r)], "kinds": {}}
    for language in ("en", "zh", "all"):
        chosen = [(r, v) for r, v in zip(rows, verdicts, strict=True) if language in ("all", r["language"])]
        harmful = [v for r, v in chosen if unsafe(r)]
        benign = [v for r, v in chosen if not unsafe(r)]
        table[language] = {"harmful": len(harmful), "refused": sum(harmful) / max(len(harmful), 1),
                           "benign": len(benign), "false_refusals": sum(benign) / max(len(benign), 1)}
        for kind in sorted({r["kind"] for r, _ in chosen if "kind" in r}):
            refused = [v for r, v in chosen if r.get("kind") == kind]
            table["kinds"][language, kind] = (sum(refused), len(refused))
    return table


def main(argv: list[str] | None = None) -> int:
    from chatbot.safety_heads import load_learned  # here, not at the top: chatbot.safety_heads imports this module

    parser = argparse.ArgumentParser(prog="python -m chatbot.safety", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", default=[DATA],
                        help="JSONL files of rows: text, language, and harmful (true/false) or label (harmful, "
                             "self_harm, benign) with an optional kind")
    parser.add_argument("--safety-model", default=None, help="a guard classifier to add to the patterns")
    parser.add_argument("--safety-classifier", action=argparse.BooleanOptionalAction, default=True,
                        help="the learned harm classifier (multilingual-e5-small, tuned) besides the patterns (the default)")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for path in args.data for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    guard = SafetyGuard(args.safety_model, learned=load_learned() if args.safety_classifier else None)
    if guard.model_error:
        print(f"warning: {guard.model_error}", file=sys.stderr)
    table = rates(rows, guard)
    print("| language | harmful requests | refused | benign look-alikes | refused wrongly |\n|---|---|---|---|---|")
    for language in ("en", "zh", "all"):
        row = table[language]
        print(f"| {language} | {row['harmful']} | {row['refused']:.0%} | {row['benign']} | {row['false_refusals']:.0%} |")
    if table["kinds"]:
        print("\n| language | kind | requests | refused |\n|---|---|---|---|")
        for (language, kind), (refused, count) in table["kinds"].items():
            print(f"| {language} | {kind} | {count} | {refused} ({refused / count:.0%}) |")
    for text in table["misses"]:
        print(f"miss: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
