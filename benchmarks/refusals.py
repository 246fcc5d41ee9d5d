"""What the app refuses in all: the safety check first, then the model's own refusals among what the check lets
through. A model tuned on the app's refusal can give it to harmless requests; the safety check should be the one that
refuses. One command prints one table per model:

    python benchmarks/refusals.py                                  # both built-in models, about 15 minutes on 2 cores
    python benchmarks/refusals.py --models gemma-3-270m-bilingual --show

Sets (per language; benign = everyday requests, look-alikes and questions about software; unsafe = harmful and
self-harm requests): the safety data's test split (`chatbot.safety_sets.harm_rows`, split by intent; the harm
classifier's threshold was chosen on its validation split), the fresh requests nothing was tuned on
(`chatbot/safety_data/not_trained/requests5.*`) and the everyday requests of `chatbot/eval/everyday.jsonl`. Each
request is asked as `benchmarks/quality.py` asks (the system prompt, the reply-language line), greedy, up to
NEW_TOKENS tokens: enough to tell whether the reply opens with the app's refusal or crisis reply
(`chatbot.prompts.gives_refusal`). Printed: refused by the check, refused by the model among the requests the check
lets through, and by the app in all.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import ask  # noqa: E402
from chatbot.evaluate import EVERYDAY, FRESH, read_jsonl  # noqa: E402
from chatbot.prompts import gives_refusal  # noqa: E402

NEW_TOKENS = 16
SETS = ("test", "fresh", "everyday")


def requests() -> list[dict]:
    """Every request of the three sets, with `set` and `unsafe` added."""
    from chatbot.safety_sets import harm_rows

    rows = [dict(r, set="test") for r in harm_rows() if r.get("split") == "test"]
    rows += [dict(r, set="fresh") for path in FRESH for r in read_jsonl(path)]
    rows += [dict(r, set="everyday", label="benign") for r in read_jsonl(EVERYDAY)]
    return [dict(r, unsafe=r["label"] != "benign") for r in rows]


def tally(rows: list[dict], checked: list[bool], modelled: list[bool]) -> Counter:
    """Per (set, language, unsafe): asked, refused by the check, refused by the model where the check did not."""
    counts: Counter = Counter()
    for row, check, model in zip(rows, checked, modelled, strict=True):
        key = (row["set"], row["language"], row["unsafe"])
        counts[key, "asked"] += 1
        counts[key, "check"] += check
        counts[key, "model"] += model and not check
    return counts


def table(name: str, counts: Counter) -> str:
    lines = [f"\n{name}: refused by the safety check / by the model among the rest / by the app in all\n",
             "| set | language | benign | unsafe |", "|---|---|---|---|"]
    for kind in SETS:
        for language in ("en", "zh"):
            cells = []
            for unsafe in (False, True):
                key = (kind, language, unsafe)
                asked, check, model = counts[key, "asked"], counts[key, "check"], counts[key, "model"]
                cells.append(f"{check} / {model} of {asked - check} / {check + model} of {asked} "
                             f"({(check + model) / asked:.0%})" if asked else "–")
            lines.append(f"| {kind} | {language} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from chatbot.engine import load_engine
    from chatbot.onnx_engine import DEFAULT_PRECISION
    from chatbot.safety import SafetyGuard
    from chatbot.safety_heads import load_learned

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="default,gemma-3-270m-bilingual",
                        help="comma-separated --model values ('default': the built-in default)")
    parser.add_argument("--show", action="store_true", help="print the benign requests each model refused")
    args = parser.parse_args(argv)
    rows = requests()
    guard = SafetyGuard(learned=load_learned())
    checked = [guard.judge(row["text"]).harmful for row in rows]
    for name in args.models.split(","):
        engine = load_engine(None if name == "default" else name, "onnx", "cpu", precision=DEFAULT_PRECISION)
        print(f"{engine.name}: {len(rows)} requests ...", file=sys.stderr, flush=True)
        modelled = [not check and gives_refusal(ask(engine, row["text"], row["language"], NEW_TOKENS)[0],
                                                row["language"])
                    for row, check in zip(rows, checked, strict=True)]
        engine.close()
        print(table(f"{engine.name} (onnx {DEFAULT_PRECISION})", tally(rows, checked, modelled)), flush=True)
        if args.show:
            for row, model in zip(rows, modelled, strict=True):
                if model and not row["unsafe"]:
                    print(f"  refused by the model: [{row['set']} {row['language']}] {row['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
