"""The learned layer of the safety check: multilingual-e5-small tuned into a harm classifier (what a user asks:
safe, harmful, self-harm, and over the same vectors whether it asks for a crisis line) and into an injection filter
(what a document says), each with its head (`Head`), loaded once per process by `load_learned`.

    SafetyGuard(learned=load_learned()).judge(text)   # chatbot.safety: the patterns, then the learned harm head
    python -m chatbot.safety_train                    # tune and write them, with their figures, to chatbot/heads/

The heads and the encoders' tuned changes are shipped in chatbot/heads/. Tested by tests/test_safety_learned.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from chatbot.safety import Verdict

HARM_HEAD = Path(__file__).resolve().parent / "heads" / "harm.json"  # written by python -m chatbot.safety_train
HARM_DELTA = HARM_HEAD.with_name("harm_encoder.safetensors")  # the encoder's tuned changes (knowledge.e5_torch)
INJECTION_HEAD = Path(__file__).resolve().parent / "heads" / "injection.json"
INJECTION_DELTA = INJECTION_HEAD.with_name("injection_encoder.safetensors")
RECHECK_HEAD = INJECTION_HEAD.with_name("injection_recheck.json")  # must confirm the filter's flags (code, mostly)
# Over the harm encoder's vectors: the message asks for a crisis or support line, answered with the numbers written
# into the app (chatbot.prompts.HELP_LINES), not a small model's guess at them.
HELP_HEAD = HARM_HEAD.with_name("help_lines.json")
MAX_VERDICTS = 100_000  # sentences whose injection verdict is kept (a few MB)


@dataclass(frozen=True)
class Head:
    """A linear softmax head over sentence vectors and the threshold chosen for it: data, written with the figures
    it was chosen on by `python -m chatbot.safety_train`. Class 0 is the harmless one; a text is flagged when the
    other classes together reach `threshold`, as the likeliest of them."""
    classes: tuple[str, ...]
    weights: np.ndarray  # (classes, dimension)
    bias: np.ndarray  # (classes,)
    threshold: float
    embedder: str
    veto: float = 0.0  # harm: below this probability the head overrules a pattern's refusal (0: never)

    @classmethod
    def read(cls, path: Path) -> Head:
        return cls.parse(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def parse(cls, data: dict) -> Head:
        """The head from `write`'s record."""
        return cls(tuple(data["classes"]), np.asarray(data["weights"], dtype=np.float32),
                   np.asarray(data["bias"], dtype=np.float32), float(data["threshold"]), data["embedder"],
                   float(data.get("veto", 0.0)))

    def write(self, path: Path, **record) -> None:
        """The head, and whatever else should travel with it (the split, the figures), as readable JSON."""
        data = {"classes": list(self.classes), "embedder": self.embedder, "threshold": round(self.threshold, 4),
                "veto": round(self.veto, 4), **record, "bias": [round(float(b), 6) for b in self.bias],
                "weights": [[round(float(w), 6) for w in row] for row in self.weights]}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        logits = vectors @ self.weights.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def flagged(self, vectors: np.ndarray, threshold: float | None = None) -> list[str | None]:
        """For each vector, the flagged class or None."""
        return self.flagged_by(self.probabilities(vectors), threshold)

    def flagged_by(self, probabilities: np.ndarray, threshold: float | None = None) -> list[str | None]:
        threshold = self.threshold if threshold is None else threshold
        return [self.classes[1 + int(np.argmax(p[1:]))] if 1 - p[0] >= threshold else None for p in probabilities]


def harm_category(harm: Head, probabilities: np.ndarray, pattern: str | None) -> str | None:
    """The harm check's category for one message: the head's (`probabilities`, its row), or where the head lets the
    message through the patterns' (`pattern`), unless the head's harm probability is below its veto."""
    flagged = harm.flagged_by(probabilities[None])[0]
    if flagged is None and pattern is not None and 1 - probabilities[0] >= harm.veto:
        return pattern
    return flagged


def harm_fingerprint() -> str:
    """What the help-lines head was fitted over: the harm encoder's changes and the harm head (its threshold and veto
    decide which messages reach it). A head recorded with another fingerprint is not loaded."""
    return hashlib.sha256(HARM_DELTA.read_bytes() + HARM_HEAD.read_bytes()).hexdigest()[:16]


class Learned:
    """The learned layer: multilingual-e5-small tuned into two classifiers, each with its head, for what a user asks
    (`judge`: `harm_embedder`, `harm`, and where there is one a `help_head` over the same vectors: a request for a
    crisis line) and what a document says (`instructions`: `embedder`, `injection`, and where there is one a
    `recheck` over the same vectors that must confirm each sentence the injection head flags)."""

    def __init__(self, embedder, harm: Head, injection: Head, harm_embedder=None, recheck: Head | None = None,
                 help_head: Head | None = None):
        self.harm_embedder = harm_embedder or embedder
        heads = [(harm, self.harm_embedder), (injection, embedder)] + ([(recheck, embedder)] if recheck else [])
        heads += [(help_head, self.harm_embedder)] if help_head else []
        for head, model in heads:
            if head.embedder != model.name:
                raise ValueError(f"a safety head was trained on {head.embedder}, not {model.name}")
        self.embedder, self.harm, self.injection, self.recheck = embedder, harm, injection, recheck
        self.help_head = help_head
        # Sentence → verdict: a passage costs 60-90 ms to screen here (benchmarks/safety.py), and the passages of a
        # knowledge base come back again and again. Bounded; the oldest verdicts go first.
        self.verdicts: dict[str, bool] = {}
        self.lock = threading.Lock()  # passages are screened by several requests' threads at once

    def judge(self, text: str, pattern: str | None = None) -> str | None:
        """"harmful", "self_harm" or None for a message; `pattern` is what the patterns said of it, which stands
        unless the head is sure enough that it is harmless (its harm probability below the head's `veto`)."""
        return self.verdict(text, pattern).category

    def verdict(self, text: str, pattern: str | None = None) -> Verdict:
        """`judge`'s category, and for a harmless message whether it asks for a crisis line (the help-lines head,
        over the same vector: no second pass of the encoder)."""
        vector = self.harm_embedder.queries([text[:2000]])
        category = harm_category(self.harm, self.harm.probabilities(vector)[0], pattern)
        asks = category is None and self.help_head is not None and self.help_head.flagged(vector)[0] is not None
        return Verdict(category, asks)

    def instructions(self, sentences: list[str]) -> list[bool]:
        """Which sentences of a document address the assistant (prompt injection)."""
        with self.lock:
            new = [s for s in dict.fromkeys(sentences) if s not in self.verdicts]
        flags = self.screen(self.embedder.queries(new)) if new else []
        with self.lock:
            for sentence, flag in zip(new, flags, strict=True):
                self.verdicts[sentence] = flag
            while len(self.verdicts) > MAX_VERDICTS:
                self.verdicts.pop(next(iter(self.verdicts)))
            return [self.verdicts.get(s, False) for s in sentences]

    def screen(self, vectors: np.ndarray) -> list[bool]:
        """The injection head's flags on these vectors, each confirmed by the recheck where there is one."""
        flags = self.injection.probabilities(vectors)[:, 1] >= self.injection.threshold
        if self.recheck is not None:
            flags &= self.recheck.probabilities(vectors)[:, 1] >= self.recheck.threshold
        return flags.tolist()


@cache
def load_learned() -> Learned:
    """The two tuned encoders and their heads (the help-lines head where it was fitted over this harm classifier),
    loaded once per process (about 170 MB of layers in all)."""
    from knowledge.e5_torch import E5Encoder

    encoders = E5Encoder.load(delta=INJECTION_DELTA), E5Encoder.load(delta=HARM_DELTA)
    for encoder in encoders:
        encoder.serve()  # one thread each, their own: a message costs the same while an answer is generated
    recheck = Head.read(RECHECK_HEAD) if RECHECK_HEAD.exists() else None
    help_head = None
    if HELP_HEAD.exists():
        record = json.loads(HELP_HEAD.read_text(encoding="utf-8"))
        if record.get("harm") == harm_fingerprint():
            help_head = Head.parse(record)
        else:  # fitted over another harm encoder or head: its verdicts would mean nothing
            print(f"warning: {HELP_HEAD.name} was fitted over another harm classifier; retrain it with `python -m "
                  "chatbot.safety_train --head help`. Requests for a crisis line go to the model.", file=sys.stderr)
    return Learned(encoders[0], Head.read(HARM_HEAD), Head.read(INJECTION_HEAD), encoders[1], recheck, help_head)
