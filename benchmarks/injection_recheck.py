"""The injection filter's recheck at every threshold, and at other regularisations: one command, one table.

    python benchmarks/injection_recheck.py          # about 25 minutes on 2 CPU cores (the corpora take most)
    python benchmarks/injection_recheck.py --no-external --C 1

The shipped recheck (chatbot/heads/injection_recheck.json) is written by `python -m chatbot.safety_train --head
recheck` with the threshold marked "chosen" here; this shows what the other thresholds would trade.

The shipped filter (chatbot/heads/injection*.json, README "Safety") removes too much of the code in programming
tutorials: `println!` lines with prose strings, JSON, comments. The recheck is a logistic regression on the
filter's own vectors that must confirm each sentence the filter flags, trained on the filter's train split plus
code as ordinary text (and as planted instructions where they hide in it): code and data installed on this machine
(`chatbot.injection_train.installed_code`: read, never copied) and the code sentences written for it
(`chatbot/safety_data/recheck_code.jsonl`), with the prose written for it (`recheck_prose.*.jsonl`: tutorials,
notices, prompts, exercises); all split like the rest (by file, by family).

Printed for each recheck threshold: planted instructions caught (patterns, or the head confirmed) on the
validation and test splits, the ordinary code lines removed, and the share of each evaluation corpus's sentences
removed (the corpora the project did not write: none of their sentences is an instruction). The threshold marked
"chosen" is the highest that loses no validation planted instruction the filter alone catches; nothing here is
chosen on the test split or the corpora.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from chatbot.grounding import looks_like_injection  # noqa: E402
from chatbot.injection_train import (  # noqa: E402
    RECHECK_C,
    RECHECK_THRESHOLDS,
    choose_recheck,
    external_sentences,
    injection_layers,
    recheck_rows,
)
from chatbot.safety_heads import INJECTION_DELTA, INJECTION_HEAD, Head  # noqa: E402
from chatbot.safety_sets import fit_logistic  # noqa: E402
from knowledge.e5_torch import E5Encoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--C", type=float, default=RECHECK_C, help="the logistic regression's inverse regularisation")
    parser.add_argument("--external", action=argparse.BooleanOptionalAction, default=True,
                        help="also count the sentences removed from the evaluation corpora the project did not write")
    args = parser.parse_args(argv)
    rows = recheck_rows()
    texts = [r["text"] for r in rows]
    labels = np.array([int(r["instruction"]) for r in rows])
    split = np.array([r["split"] for r in rows])
    kind = np.array([r.get("kind", "") for r in rows])
    encoder, injection = E5Encoder.load(delta=INJECTION_DELTA), Head.read(INJECTION_HEAD)
    print(f"embedding {len(rows)} labelled sentences ...", file=sys.stderr, flush=True)
    vectors = encoder.queries(texts)
    recheck = fit_logistic(vectors[split == "train"], labels[split == "train"], encoder.name, args.C)
    sets = {"labelled": (texts, vectors)}
    for name, sentences in (external_sentences() if args.external else {}).items():
        print(f"embedding the {len(sentences)} sentences of {name} ...", file=sys.stderr, flush=True)
        sets[name] = (sentences, encoder.queries(sentences))
    patterns = {name: np.array([looks_like_injection(t) for t in found]) for name, (found, _) in sets.items()}

    def layers_at(threshold: float, name: str = "labelled") -> dict[str, np.ndarray]:
        found, embedded = sets[name]
        return injection_layers(injection, embedded, found, patterns=patterns[name],
                                recheck=replace(recheck, threshold=threshold))

    planted = {s: (split == s) & (labels == 1) for s in ("validation", "test")}
    code = {(s, k): (split == s) & (labels == 0) & (kind == k)
            for s in ("validation", "test") for k in ("written code", "installed code")}
    chosen = choose_recheck(layers_at, list(np.flatnonzero(planted["validation"])))
    print(f"\nInjection filter with a recheck (C {args.C}): planted instructions caught, ordinary code and corpus "
          "sentences removed\n")
    external = [name for name in sets if name != "labelled"]
    header = ["recheck threshold", "planted, validation", "planted, test", "written code, validation / test",
              "installed code, validation / test", *external]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for threshold in (None, *RECHECK_THRESHOLDS):
        layer = "both" if threshold is None else "with recheck"  # "both": the patterns or the filter alone
        at = float(RECHECK_THRESHOLDS[0]) if threshold is None else float(threshold)
        gone = layers_at(at)[layer]
        label = ("none (the filter alone)" if threshold is None
                 else f"{threshold:.2f}" + (" (chosen)" if threshold == chosen else ""))
        cells = [label, *(f"{gone[planted[s]].sum()} of {planted[s].sum()}" for s in ("validation", "test"))]
        cells += [" / ".join(f"{gone[code[s, k]].sum()} of {code[s, k].sum()}" for s in ("validation", "test"))
                  for k in ("written code", "installed code")]
        cells += [f"{layers_at(at, name)[layer].mean():.2%}" for name in external]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
