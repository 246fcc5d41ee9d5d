"""What the learned safety layer costs per message and per passage on this machine. One command prints the table:

    python benchmarks/safety.py            # about a minute on 2 CPU cores

Messages: the project's everyday requests and its labelled safety requests (chatbot/eval/everyday.jsonl,
safety.jsonl), each judged once by the patterns alone (the baseline, in the same process) and once by the whole
check (patterns, then multilingual-e5-small tuned into the harm classifier, served by onnxruntime on one thread
of its own), idle and again while another thread keeps a core busy (as a generating answer does); and with the
same encoder in torch (the process's two threads), as it was served before. Passages: the bundled corpus's
chunks, screened for planted instructions by the patterns alone and by patterns and the tuned injection filter
(every sentence, in one batch per passage), then again (the verdicts are kept per sentence).
Printed: p50 and p90 milliseconds, and the learned layer's cost over the patterns'.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.serving import percentile  # noqa: E402
from chatbot.evaluate import EVERYDAY, read_jsonl  # noqa: E402
from chatbot.grounding import defuse  # noqa: E402
from chatbot.safety import DATA, SafetyGuard  # noqa: E402
from chatbot.safety_heads import HARM_DELTA, Learned, load_learned  # noqa: E402
from knowledge.chunking import chunk_document  # noqa: E402
from knowledge.e5_torch import E5Encoder  # noqa: E402
from knowledge.loaders import find_files, load_file  # noqa: E402
from knowledge.store import BUNDLED_CORPUS  # noqa: E402


def timings(work: Callable[[str], object], items: list[str]) -> list[float]:
    """Milliseconds per item."""
    spent = []
    for item in items:
        start = time.perf_counter()
        work(item)
        spent.append((time.perf_counter() - start) * 1000)
    return spent


class Busy:
    """A thread that keeps one core busy with matrix products (numpy releases the GIL), as generation does."""

    def __enter__(self) -> Busy:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()
        return self

    def _spin(self) -> None:
        a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
        while not self.stop.is_set():
            a = np.tanh(a @ a)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def row(name: str, spent: list[float], baseline: list[float]) -> str:
    p50, p90 = statistics.median(spent), percentile(spent, 0.9)
    extra = p50 - statistics.median(baseline)
    return f"| {name} | {len(spent)} | {p50:.1f} | {p90:.1f} | {extra:+.1f} |"


def main() -> int:
    messages = [r["text"] for r in read_jsonl(EVERYDAY) + read_jsonl(DATA)]
    learned = load_learned()
    patterns, whole = SafetyGuard(), SafetyGuard(learned=learned)
    whole.judge("warm-up")
    chunks = [c.text for path, source in find_files([BUNDLED_CORPUS]) for c in chunk_document(load_file(path, source))]
    import torch

    # The same tuned encoder served by torch, as it was before onnxruntime served it: the process's torch threads.
    by_torch = E5Encoder.load(delta=HARM_DELTA)
    in_torch = SafetyGuard(learned=Learned(learned.embedder, learned.harm, learned.injection, by_torch))
    in_torch.judge("warm-up")
    print(f"\nThe safety check's cost on this machine (multilingual-e5-small, {learned.harm_embedder.backend}; "
          f"torch: {torch.get_num_threads()} threads), milliseconds:\n")
    print("| what | items | p50 ms | p90 ms | over the patterns, p50 |\n|---|---|---|---|---|")
    base = timings(patterns.judge, messages)
    print(row("message: patterns alone (baseline)", base, base))
    print(row("message: patterns + harm head (served: onnxruntime, 1 thread)", timings(whole.judge, messages), base))
    print(row("message: the same, the encoder in torch", timings(in_torch.judge, messages), base))
    with Busy():
        busy_base = timings(patterns.judge, messages)
        print(row("message: patterns + harm head, other core busy", timings(whole.judge, messages), busy_base))
        print(row("message: the same, the encoder in torch, other core busy", timings(in_torch.judge, messages),
                  busy_base))
    passages = timings(defuse, chunks)
    print(row("passage: injection patterns alone (baseline)", passages, passages))
    print(row("passage: patterns + injection head", timings(lambda text: defuse(text, learned.instructions), chunks),
              passages))
    print(row("passage seen before (its verdicts kept)",
              timings(lambda text: defuse(text, learned.instructions), chunks), passages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
