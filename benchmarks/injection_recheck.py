"""The injection filter on code, and a second look at what it flags (measured, not shipped): one command, one table.

    python benchmarks/injection_recheck.py          # about 25 minutes on 2 CPU cores (the corpora take most)
    python benchmarks/injection_recheck.py --no-external

The shipped filter (chatbot/heads/injection*.json, README "Safety") removes too much of the code in programming
tutorials: `println!` lines with prose strings, JSON, comments. The recheck is a logistic regression on the
filter's own vectors that must confirm each sentence the filter flags, trained on the filter's train split plus
code as ordinary text (and as planted instructions where they hide in it): code and data installed on this machine
(`installed_code` below: read, never copied) and the code sentences written for it
(`chatbot/safety_data/not_trained/injection4.code.jsonl`); both are split like the rest (by file, by family).

Printed for each recheck threshold: planted instructions caught (patterns, or the head confirmed) on the
validation and test splits, the ordinary code lines removed, and the share of each evaluation corpus's sentences
removed (the corpora the project did not write: none of their sentences is an instruction). The threshold marked
"chosen" is the highest that loses no validation planted instruction the filter alone catches; nothing here is
chosen on the test split or the corpora.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from chatbot.grounding import looks_like_injection  # noqa: E402
from chatbot.safety import INJECTION_DELTA, INJECTION_HEAD, Head  # noqa: E402
from chatbot.safety_train import DATA, assign_splits, external_sentences, injection_rows, split_of  # noqa: E402
from knowledge.e5_torch import E5Encoder  # noqa: E402
from knowledge.evaluate import read_jsonl  # noqa: E402

WRITTEN_CODE = DATA / "not_trained" / "injection4.code.jsonl"
INSTALLED = ("/usr/include/**/*.h", "/usr/share/**/*.json", "/usr/share/**/*.js", "/usr/bin/*")
FILES, PER_FILE = 80, 8  # installed files of each kind (every n-th of those found), sentences from each
THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def installed_code(patterns: tuple[str, ...] = INSTALLED, files: int = FILES, per_file: int = PER_FILE
                   ) -> dict[str, list[str]]:
    """file → some of its "sentences" as a passage of it would be split: code, comments, configuration and data
    installed here, none of it an instruction to an assistant; every n-th readable text file of each kind."""
    import glob

    from knowledge.chunking import split_sentences

    chosen: list[str] = []
    for pattern in patterns:
        found = sorted(path for path in glob.glob(pattern, recursive=True)
                       if Path(path).is_file() and Path(path).stat().st_size < 100_000)
        chosen += found[::max(1, len(found) // files)][:files]
    sentences = {}
    for path in sorted(set(chosen)):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        blocks = [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]
        lines = [s for block in blocks for s in split_sentences(block) if len(s) >= 12]
        if lines:
            sentences[path] = lines[::max(1, len(lines) // per_file)][:per_file]
    return sentences


def labelled_rows() -> list[dict]:
    rows = injection_rows()
    files = installed_code()
    names = sorted(files)
    rows += [{"text": s, "language": "", "instruction": False, "split": split_of(name, names),
              "kind": "installed code"} for name in names for s in files[name]]
    written = [row | {"kind": "written code"} for row in read_jsonl(WRITTEN_CODE)]
    assign_splits(written, "instruction")
    return rows + written


def main(argv: list[str] | None = None) -> int:
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--C", type=float, default=10.0, help="the logistic regression's inverse regularisation")
    parser.add_argument("--external", action=argparse.BooleanOptionalAction, default=True,
                        help="also count the sentences removed from the evaluation corpora the project did not write")
    args = parser.parse_args(argv)
    rows = labelled_rows()
    texts = [r["text"] for r in rows]
    labels = np.array([int(r["instruction"]) for r in rows])
    split = np.array([r["split"] for r in rows])
    kind = np.array([r.get("kind", "") for r in rows])
    encoder, injection = E5Encoder.load(delta=INJECTION_DELTA), Head.read(INJECTION_HEAD)
    print(f"embedding {len(rows)} labelled sentences ...", file=sys.stderr, flush=True)
    vectors = encoder.queries(texts)
    patterns = np.array([looks_like_injection(t) for t in texts])
    flagged = injection.probabilities(vectors)[:, 1] >= injection.threshold
    model = LogisticRegression(C=args.C, max_iter=5000).fit(vectors[split == "train"], labels[split == "train"])
    confirm = model.predict_proba(vectors)[:, 1]
    external = {}
    for name, sentences in (external_sentences() if args.external else {}).items():
        print(f"embedding the {len(sentences)} sentences of {name} ...", file=sys.stderr, flush=True)
        found = encoder.queries(sentences)
        flags = injection.probabilities(found)[:, 1] >= injection.threshold
        external[name] = (len(sentences), np.array([looks_like_injection(s) for s in sentences]), flags,
                          model.predict_proba(found)[:, 1])

    def removed(threshold: float | None, pattern: np.ndarray, flag: np.ndarray, confirmed: np.ndarray) -> np.ndarray:
        return pattern | flag if threshold is None else pattern | (flag & (confirmed >= threshold))

    planted = {s: (split == s) & (labels == 1) for s in ("validation", "test")}
    code = {(s, k): (split == s) & (labels == 0) & (kind == k)
            for s in ("validation", "test") for k in ("written code", "installed code")}
    baseline = removed(None, patterns, flagged, confirm)[planted["validation"]].sum()
    chosen = max((t for t in THRESHOLDS if removed(t, patterns, flagged, confirm)[planted["validation"]].sum()
                  == baseline), default=None)
    print(f"\nInjection filter with a recheck (C {args.C}): planted instructions caught, ordinary code and corpus "
          "sentences removed\n")
    header = ["recheck threshold", "planted, validation", "planted, test", "written code, validation / test",
              "installed code, validation / test", *external]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for threshold in (None, *THRESHOLDS):
        gone = removed(threshold, patterns, flagged, confirm)
        label = "none (shipped)" if threshold is None else f"{threshold:.2f}" + (" (chosen)" if threshold == chosen
                                                                                 else "")
        cells = [label, *(f"{gone[planted[s]].sum()} of {planted[s].sum()}" for s in ("validation", "test"))]
        cells += [" / ".join(f"{gone[code[s, k]].sum()} of {code[s, k].sum()}" for s in ("validation", "test"))
                  for k in ("written code", "installed code")]
        cells += [f"{removed(threshold, p, f, c).sum() / n:.2%}" for n, p, f, c in external.values()]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
