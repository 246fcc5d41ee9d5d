"""A language model as a second stage of retrieval: the fused search's first candidates put in order again by how
likely the model finds the question after each passage (query likelihood, as in "unsupervised passage
re-ranking"). Measured on every evaluation corpus; not in the app (a few seconds a question on 2 CPU cores).

    python benchmarks/rerank.py                                   # about 25 minutes on 2 CPU cores
    python benchmarks/rerank.py --corpora bundled,cargo --candidates 10 --model gemma-3-270m

Each corpus is built into a new index with the default embedder, and each question searched as the store serves it
(fused, `--candidates` hits). The model (default: the Gemma 3 270M base, untuned and multilingual; transformers,
fp32) reads "Passage: …\\nA question this passage answers:" (in Chinese for a Chinese question) and is scored on
the question's tokens: their mean log-probability. Printed per corpus and language, hit@1 / hit@3 / MRR@10 of the
fused search as served, of the model's order alone, and of both orders fused by reciprocal rank (constant RRF_K,
equal weights, the way the store fuses its two rankings), with the seconds each question's scoring took. The
bundled set is the project's own (a setting would be chosen there); the others were written from a user's side and
only measured (`knowledge.eval.external`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.corpora import QUESTION_SETS  # noqa: E402
from benchmarks.filling import corpora  # noqa: E402
from chatbot.models import load_model  # noqa: E402
from knowledge.config import KnowledgeConfig  # noqa: E402
from knowledge.embedded import KnowledgeBase  # noqa: E402
from knowledge.embedder import Embedder  # noqa: E402
from knowledge.evaluate import matches, read_jsonl, score  # noqa: E402
from knowledge.fusion import reciprocal_rank_fusion  # noqa: E402
from knowledge.retriever import Retriever  # noqa: E402

ASK = {"en": "Passage: {}\nA question this passage answers:", "zh": "段落：{}\n这段话能回答的问题："}
PASSAGE_CHARS = 1200  # of each passage the model reads (the bundled chunks are shorter; a few others are longer)
RRF_K = 20


class QueryLikelihood:
    """Mean log-probability of a question's tokens after each passage, under a causal language model."""

    def __init__(self, spec: str):
        self.model, self.tokenizer, self.name = load_model(spec, device="cpu", dtype=torch.float32)
        self.model.eval()

    def scores(self, question: str, passages: list[str], language: str) -> list[float]:
        asked = self.tokenizer(question if language == "zh" else " " + question, add_special_tokens=False)["input_ids"]
        target = torch.tensor(asked)[:, None]
        found = []
        for passage in passages:
            prompt = self.tokenizer(ASK[language].format(passage[:PASSAGE_CHARS]))["input_ids"]
            with torch.inference_mode():
                logits = self.model(torch.tensor([prompt + asked])).logits[0, len(prompt) - 1:-1]
            found.append(torch.log_softmax(logits.float(), -1).gather(1, target).mean().item())
        return found


def first_match(order: list[int], good: list[bool]) -> int | None:
    return next((rank for rank, i in enumerate(order, 1) if good[i]), None)


def measure(folder: Path, questions: list[dict], embedder: Embedder, model: QueryLikelihood, candidates: int
            ) -> tuple[dict[str, list], float]:
    """Per order (fused, model, both), each question's first answering rank; and the seconds of scoring a question."""
    ranks: dict[str, list] = {"fused": [], "model": [], "both": []}
    seconds = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        kb = KnowledgeBase.open(Path(scratch) / "index", KnowledgeConfig())
        kb.add([folder], embedder, progress=False)
        retriever = Retriever(kb, embedder)
        for n, question in enumerate(questions, 1):
            hits = retriever.search(question["question"], k=candidates, language=question["language"])
            good = [matches(question, hit.chunk) for hit in hits]
            started = time.perf_counter()
            likelihood = model.scores(question["question"], [hit.chunk.text for hit in hits], question["language"])
            seconds += time.perf_counter() - started
            served = list(range(len(hits)))
            by_model = [int(i) for i in np.argsort(-np.array(likelihood), kind="stable")]
            both = list(reciprocal_rank_fusion([served, by_model], RRF_K, (1.0, 1.0)))
            for name, order in (("fused", served), ("model", by_model), ("both", both)):
                ranks[name].append(first_match(order, good))
            print(f"\r{folder.name}: {n}/{len(questions)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    return ranks, seconds / max(len(questions), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpora", default=",".join(QUESTION_SETS))
    parser.add_argument("--candidates", type=int, default=10, help="fused hits put in order again")
    parser.add_argument("--model", default="gemma-3-270m", help="a causal language model (--model value)")
    args = parser.parse_args(argv)
    model, embedder = QueryLikelihood(args.model), Embedder()
    lines = [f"| corpus | language | questions | fused, as served | {model.name} alone | both, fused by rank "
             "(RRF) | seconds a question |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        for corpus, folder in corpora(args.corpora.split(","), Path(scratch)).items():
            questions = read_jsonl(QUESTION_SETS[corpus])
            ranks, seconds = measure(folder, questions, embedder, model, args.candidates)
            for language in sorted({q["language"] for q in questions}):
                chosen = [i for i, q in enumerate(questions) if q["language"] == language]
                cells = []
                for name in ("fused", "model", "both"):
                    s = score([ranks[name][i] for i in chosen])
                    cells.append(f"{s.hit1:.3f} / {s.hit3:.3f} / {s.mrr:.3f}")
                lines.append(f"| {corpus} | {language} | {len(chosen)} | {' | '.join(cells)} | {seconds:.1f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    print(f"\nhit@1 / hit@3 / MRR@10 among the first {args.candidates} fused hits, each order:\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
