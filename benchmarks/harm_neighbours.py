"""A second look at the harm classifier's refusals: do the nearest labelled training requests overrule it well?

    python benchmarks/harm_neighbours.py          # about five minutes on 2 CPU cores

Measured, not shipped (README, "Safety and its limits"). Every request of the harm classifier's splits
(chatbot/safety_data/requests*.jsonl, split by intent as `python -m chatbot.safety_train` splits them) and the
requests written after it (chatbot/safety_data/not_trained/requests5.*: "fresh") is embedded twice: by the shipped
harm encoder (multilingual-e5-small with its tuned changes) and by base e5. A refusal of the whole check (the
head at its threshold, or a pattern unless the head's harm probability is below its veto) is overruled when at
least `share` of the `k` nearest training requests (cosine, in one of the two spaces) are benign and the head's
harm probability is below `ceiling`. Printed for each setting: unsafe and benign requests refused on the
validation and test splits, and unsafe, look-alike and everyday requests refused among the fresh ones; then the
setting that refuses the most unsafe validation requests while refusing no everyday one and at most 5% of the
benign ones in each language, with the threshold chosen with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from chatbot.safety import judge  # noqa: E402
from chatbot.safety_heads import HARM_DELTA, HARM_HEAD, Head  # noqa: E402
from chatbot.safety_sets import DATA, THRESHOLDS, harm_rows  # noqa: E402
from chatbot.safety_train import MAX_FALSE_REFUSALS, VETOES  # noqa: E402
from knowledge.e5_torch import E5Encoder  # noqa: E402
from knowledge.evaluate import read_jsonl  # noqa: E402

NEIGHBOURS = (1, 3, 5, 10, 20, 40)
SHARES = (0.5, 0.7, 0.9)
CEILINGS = (0.99, 1.01)  # 1.01: whatever the head's probability


def nearest_benign_share(vectors: np.ndarray, train: np.ndarray, benign: np.ndarray) -> dict[int, np.ndarray]:
    """k → for every row, the share of benign requests among its k nearest training requests (not itself)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit[train].T
    similarity[train, np.arange(len(train))] = -np.inf
    order = np.argsort(-similarity, axis=1)[:, :max(NEIGHBOURS)]
    return {k: benign[order[:, :k]].mean(axis=1) for k in NEIGHBOURS}


def main() -> int:
    rows = harm_rows() + [dict(row, split="fresh") for name in ("requests5.en.jsonl", "requests5.zh.jsonl")
                          for row in read_jsonl(DATA / "not_trained" / name)]
    texts = [row["text"] for row in rows]
    split = np.array([row["split"] for row in rows])
    label = np.array([row["label"] for row in rows])
    kind = np.array([row.get("kind", "") for row in rows])
    language = np.array([row["language"] for row in rows])
    head = Head.read(HARM_HEAD)
    patterns = np.array([judge(text).harmful for text in texts])
    train = np.flatnonzero(split == "train")
    benign = (label[train] == "benign").astype(np.float32)
    shares, harm = {}, None
    for space, delta in (("tuned", HARM_DELTA), ("base e5", None)):
        print(f"embedding {len(texts)} requests with the {space} encoder ...", file=sys.stderr, flush=True)
        encoder = E5Encoder.load(delta=delta)
        encoder.serve(threads=2)
        vectors = encoder.queries(texts)
        if delta is not None:
            harm = 1 - head.probabilities(vectors)[:, 0]
        shares[space] = nearest_benign_share(vectors, train, benign)

    def refused(threshold: float, veto: float, setting: tuple | None) -> np.ndarray:
        verdict = (harm >= threshold) | (patterns & (harm >= veto))
        if setting is None:
            return verdict
        space, k, share, ceiling = setting
        return verdict & ~((shares[space][k] >= share) & (harm < ceiling))

    def count(verdict: np.ndarray, mask: np.ndarray) -> str:
        return f"{int(verdict[mask].sum())}/{int(mask.sum())}"

    unsafe = label != "benign"
    columns = {"validation unsafe": (split == "validation") & unsafe,
               "validation benign": (split == "validation") & ~unsafe,
               "test unsafe": (split == "test") & unsafe, "test benign": (split == "test") & ~unsafe,
               "fresh unsafe": (split == "fresh") & unsafe,
               "fresh look-alike": (split == "fresh") & (kind == "lookalike"),
               "fresh everyday": (split == "fresh") & (kind == "everyday")}
    settings = [None] + [(space, k, share, ceiling) for space in shares for k in NEIGHBOURS for share in SHARES
                         for ceiling in CEILINGS]
    print("| overruled when | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
    for setting in settings:
        verdict = refused(head.threshold, head.veto, setting)
        name = "never (the shipped check)" if setting is None else \
            f"{setting[0]}: {setting[2]:.0%} of {setting[1]} benign" + (f", harm < {setting[3]:.2f}" if setting[3] <= 1
                                                                        else "")
        print(f"| {name} | " + " | ".join(count(verdict, mask) for mask in columns.values()) + " |")

    validation = split == "validation"
    benign_masks = [validation & ~unsafe & (language == code) for code in ("en", "zh")]
    everyday = validation & (kind == "everyday")
    best = None
    for setting in settings:
        for threshold in THRESHOLDS:
            for veto in VETOES:
                verdict = refused(threshold, veto, setting)
                if verdict[everyday].any() or any(verdict[mask].mean() > MAX_FALSE_REFUSALS for mask in benign_masks):
                    continue
                recall = verdict[validation & unsafe].mean()
                if best is None or recall > best[0]:
                    best = (recall, setting, threshold, veto)
    recall, setting, threshold, veto = best
    verdict = refused(threshold, veto, setting)
    print(f"\nchosen on validation: {setting or 'no second stage'}, threshold {threshold:.2f}, veto {veto:.2f} "
          f"(validation unsafe refused {recall:.3f}): " + ", ".join(f"{name} {count(verdict, mask)}"
                                                                       for name, mask in columns.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
