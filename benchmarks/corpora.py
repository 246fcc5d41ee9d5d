"""Retrieval on every evaluation corpus, per language, with each embedder: one command, one table.

    python benchmarks/corpora.py                                   # about fifteen minutes on 2 CPU cores
    python benchmarks/corpora.py --corpora bundled,vim-zh --embedders multilingual-e5-small

Corpora: the bundled documents (the project's own, with its 118 questions: the set fusion weights and relevance
scales are chosen on) and those the project did not write (`knowledge.eval.external`: pydoc, rust-zh, man-zh,
cargo, vim-zh, where installed here; their questions were written for the project and are only measured). Each
corpus is built into a new index with each embedder (all-MiniLM-L6-v2, multilingual-e5-small, and both as
`bilingual`, the default: MiniLM for English text, e5 for the rest), the build timed
(chunks per second, reading and BM25 included). Every question is then searched once per mode:

- dense alone, BM25 alone (words, and characters for Chinese), and the fused search the store serves;
- then asked as a user asks the app (`chatbot.assistant.Assistant.turn`, default settings, the safety check and
  its injection filter included) with a model that writes in no language, as the built-in SmolLM2 does not
  from passages: the answer is the sentences it quotes from the passages. Counted: the questions whose passages
  (the 3 the answer is made from, after the injection filter) hold the key phrase, the answers that carry it
  ("key fact"), the questions routed away as not covered by the documents (every
  question of these sets is answered by them: a false decline), and those the safety check refused (each is a
  benign question about the documents).

- and the everyday requests (chatbot/eval/everyday.jsonl and the benign requests of
  chatbot/safety_data/not_trained/requests5.*, 429 in both languages, none about these documents) routed as the
  assistant routes them: those sent to the documents would be answered with quotes of unrelated passages. Counted
  with relevance alone and with the router (`chatbot.routing.Router`, fitted on the bundled set only).

A question is found at rank r when the r-th hit comes from its expected source and contains its key phrase
(`knowledge.evaluate`). Printed: hit@1, hit@3 and MRR@10 per corpus, language, embedder and mode, and the false
declines, also per language over all the corpora (the goal is per language); how many questions have an answering
passage among the first 3, 10 and 50 of either ranking (what fusion and ranking choose from); `--json FILE` also
writes every question's ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.filling import corpora  # noqa: E402
from chatbot.assistant import Assistant  # noqa: E402
from chatbot.config import ChatConfig  # noqa: E402
from chatbot.evaluate import EVERYDAY, FRESH  # noqa: E402
from chatbot.grounding import ground  # noqa: E402
from chatbot.models import ModelProfile  # noqa: E402
from chatbot.routing import ROUTER, decide  # noqa: E402
from knowledge.config import KnowledgeConfig  # noqa: E402
from knowledge.embedded import KnowledgeBase  # noqa: E402
from knowledge.embedder import Embedder  # noqa: E402
from knowledge.eval import external  # noqa: E402
from knowledge.evaluate import QUESTIONS, first_rank, matches, read_jsonl, score  # noqa: E402
from knowledge.retriever import SCORE_FUSION, Retriever  # noqa: E402

QUESTION_SETS = {"bundled": QUESTIONS, "pydoc": external.PYDOC_QUESTIONS, "rust-zh": external.RUST_ZH_QUESTIONS,
                 "man-zh": external.MAN_ZH_QUESTIONS, "cargo": external.CARGO_QUESTIONS,
                 "vim-zh": external.VIM_ZH_QUESTIONS}
EMBEDDERS = ("all-MiniLM-L6-v2", "multilingual-e5-small", "bilingual")
MODES = ("dense", "lexical", "fused")
POOL = 50  # candidates of each retriever, as the store fuses them


class Quoting:
    """A stand-in model that writes in no language: the assistant answers from documents by quoting them."""

    name = backend = "quotes only"
    profile = ModelProfile(chat=(), grounded=())
    context_tokens = 4096

    def count_tokens(self, messages) -> int:
        return sum(len(str(m["content"])) for m in messages) // 4

    def stream(self, *args, **kwargs):
        raise RuntimeError("a model that writes nothing was asked to write")


def measure(corpus: Path, questions: list[dict], embedder: Embedder, config: ChatConfig,
            sentence_vectors: bool = True) -> dict:
    """Build `corpus` with `embedder`, search each question in each mode, and ask it: ranks, answers, fill rate."""
    with tempfile.TemporaryDirectory() as folder:
        kb = KnowledgeBase.open(Path(folder) / "index", KnowledgeConfig(sentence_vectors=sentence_vectors))
        started = time.perf_counter()
        kb.add([corpus], embedder, progress=False)
        seconds = time.perf_counter() - started
        retriever = Retriever(kb, embedder)
        assistant = Assistant(Quoting(), config, retriever)
        rows = []
        for q in questions:
            ranks = {mode: first_rank(retriever, q, mode) for mode in MODES}
            turn = assistant.turn([], q["question"])
            answer = "".join(turn.stream())
            candidates = {mode: kb.search(q["question"], vector, POOL, mode)
                          for mode, vector in (("dense", embedder.queries([q["question"]])), ("lexical", None))}
            rows.append({"question": q["question"], "language": q["language"], "ranks": ranks,
                         "mode": turn.mode, "declined": turn.mode in ("chat", "not_covered"),
                         "refused": turn.mode == "refused",
                         "key fact": q["key_phrase"] in answer,
                         "in passages": any(q["key_phrase"] in passage.text
                                            for passage in (turn.grounding.passages if turn.grounding else [])),
                         "candidates": {mode: [[found.chunk.id, matches(q, found.chunk), found.score]
                                               for found in chunks]
                                        for mode, chunks in candidates.items()}})
        return {"chunks": len(kb), "seconds": seconds, "questions": rows,
                "requests": requests_sent(retriever, config)}


def requests_sent(retriever: Retriever, config: ChatConfig) -> dict:
    """language → [requests, sent to the documents with relevance alone, with the router]."""
    requests = read_jsonl(EVERYDAY) + [r for path in FRESH for r in read_jsonl(path) if r["label"] == "benign"]
    counts: dict[str, list[int]] = {}
    for request in requests:
        hits = ground(retriever, [], request["text"], request["language"], config.min_relevance,
                      config.passages).hits
        tally = counts.setdefault(request["language"], [0, 0, 0])
        tally[0] += 1
        for column, router in ((1, None), (2, ROUTER)):
            route = decide(request["text"], hits, retriever.lexical, config.min_relevance, router=router)
            tally[column] += route.kind == "documents"
    return counts


def sweep(results: dict, name: str) -> list[str]:
    """Fused searches with other settings, from the candidates kept (hit@3 / MRR per corpus and language, and the
    own set's MRR per language, on which a choice is made): reciprocal-rank fusion with other constants and dense
    weights, and fusion by rescaled scores (`knowledge.fusion.score_fusion`) with other dense weights."""
    from knowledge.fusion import reciprocal_rank_fusion, score_fusion

    groups = [(corpus, language, [row for row in found["questions"] if row["language"] == language])
              for (corpus, embedder), found in results.items() if embedder == name
              for language in sorted({row["language"] for row in found["questions"]})]
    own = [(c, lang) for c, lang, _ in groups if c == "bundled"]
    lines = [f"| fusion | k | dense weight | {' | '.join(f'own MRR {lang}' for _, lang in own)} | "
             f"{' | '.join(f'{c} {lang}' for c, lang, _ in groups)} |",
             "|---|---|---|" + "---|" * (len(own) + len(groups))]
    settings = [("rank", k, weight) for k in (1, 5, 20, 60) for weight in (0.5, 1.0, 1.5, 2.0)]
    settings += [("score", "–", weight) for weight in (0.25, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9)]
    for fusion, k, weight in settings:
        cells, mrr = [], []
        for corpus, _, rows in groups:
            ranks = []
            for row in rows:
                lists = row["candidates"]
                good = {chunk for mode in lists for chunk, ok, _ in lists[mode] if ok}
                if fusion == "rank":
                    fused = reciprocal_rank_fusion([[c for c, *_ in lists["dense"]], [c for c, *_ in lists["lexical"]]],
                                                   k, (weight, 1.0))
                else:
                    fused = score_fusion([{c: s for c, _, s in lists["dense"]}, {c: s for c, _, s in lists["lexical"]}],
                                         (weight, 1.0 - weight))
                ranks.append(next((r for r, c in enumerate(list(fused)[:10], 1) if c in good), None))
            s = score(ranks)
            cells.append(f"{s.hit3:.3f} / {s.mrr:.3f}")
            mrr += [f"{s.mrr:.3f}"] if corpus == "bundled" else []
        lines.append(f"| {fusion} | {k} | {weight} | {' | '.join(mrr)} | {' | '.join(cells)} |")
    return lines


def reach(rows: list[dict], depth: int) -> int:
    """How many of `rows` (questions with their kept candidates) have a passage that answers them among the first
    `depth` of the dense or of the BM25 ranking: what a better ordering of those candidates could put first."""
    return sum(any(ok for ranking in row["candidates"].values() for _, ok, _ in ranking[:depth]) for row in rows)


def by_language(results: dict) -> Iterator[tuple[str, str, dict, str, list[dict]]]:
    """(corpus, embedder, its results, language, that language's questions) for each table row."""
    for (corpus, name), found in results.items():
        for language in sorted({row["language"] for row in found["questions"]}):
            yield corpus, name, found, language, [row for row in found["questions"] if row["language"] == language]


def reach_table(results: dict) -> list[str]:
    lines = ["| corpus | language | questions | embedder | fused hit@3 | answer among either ranking's first 3 / 10 / "
             f"{POOL} |", "|---|---|---|---|---|---|"]
    for corpus, name, _, language, rows in by_language(results):
        hit3 = score([row["ranks"]["fused"] for row in rows]).hit3
        lines.append(f"| {corpus} | {language} | {len(rows)} | {name} | {hit3:.3f} | "
                     f"{' / '.join(str(reach(rows, depth)) for depth in (3, 10, POOL))} |")
    return lines


DECLINE_GOAL = 0.05  # issue 23: at most 5% of the document questions routed away as not covered, per language


def declines_by_language(results: dict) -> list[str]:
    """False "not covered" per embedder and language over every corpus measured (the goal is per language), with
    the corpora above the goal by themselves."""
    pooled: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
    for corpus, name, _, language, rows in by_language(results):
        pooled.setdefault((name, language), []).append((corpus, sum(row["declined"] for row in rows), len(rows)))
    lines = [f"| embedder | language | false \"not covered\", all corpora | corpora above {DECLINE_GOAL:.0%} |",
             "|---|---|---|---|"]
    for (name, language), counts in pooled.items():
        declined, asked = sum(count for _, count, _ in counts), sum(total for _, _, total in counts)
        over = [f"{corpus} {count}/{total} ({count / total:.1%})" for corpus, count, total in counts
                if count / total > DECLINE_GOAL]
        share = f"{declined}/{asked} ({declined / asked:.1%})"
        lines.append(f"| {name} | {language} | {share} | {', '.join(over) or '–'} |")
    return lines


def table(results: dict) -> list[str]:
    lines = ["| corpus | language | questions | embedder | chunks/s | dense hit@1 / hit@3 / MRR | BM25 | fused | "
             "key fact: in the passages / in the answer | false \"not covered\" | refused as unsafe |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for corpus, name, found, language, rows in by_language(results):
        cells = []
        for mode in MODES:
            s = score([row["ranks"][mode] for row in rows])
            cells.append(f"{s.hit1:.3f} / {s.hit3:.3f} / {s.mrr:.3f}")
        declined, facts = sum(row["declined"] for row in rows), sum(row["key fact"] for row in rows)
        refused = sum(row["refused"] for row in rows)
        given = sum(row["in passages"] for row in rows)
        lines.append(f"| {corpus} | {language} | {len(rows)} | {name} | {found['chunks'] / found['seconds']:.0f} "
                     f"| {' | '.join(cells)} | {given} / {facts} of {len(rows)} | {declined}/{len(rows)} "
                     f"| {refused}/{len(rows)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpora", default=",".join(QUESTION_SETS))
    parser.add_argument("--embedders", default=",".join(EMBEDDERS))
    parser.add_argument("--chunk-vectors-only", action="store_true",
                        help="also build each corpus without sentence vectors (rows marked 'chunks only'), as indexes "
                             "were built before them")
    parser.add_argument("--json", type=Path, help="also write every question's ranks and relevance here")
    parser.add_argument("--sweep", action="store_true",
                        help="also print fusion by rank and by score with other constants and dense weights, for "
                             "multilingual-e5-small and bilingual")
    args = parser.parse_args(argv)
    config = ChatConfig()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        found = corpora(args.corpora.split(","), Path(scratch))
        for name in args.embedders.split(","):
            embedder = Embedder(name)
            for corpus, folder in found.items():
                for sentences in (True, False) if args.chunk_vectors_only else (True,):
                    label = name if sentences else f"{name}, chunks only"
                    print(f"{corpus} with {label} ...", file=sys.stderr, flush=True)
                    results[corpus, label] = measure(folder, read_jsonl(QUESTION_SETS[corpus]), embedder, config,
                                                     sentences)
    print("\n".join(table(results)))
    print("\nDocument questions routed away as not covered, per language over every corpus:\n")
    print("\n".join(declines_by_language(results)))
    print("\nWhere the answer is among the candidates (fusion and ranking choose among them):\n")
    print("\n".join(reach_table(results)))
    print("\nEveryday requests sent to the documents (answered with quotes of unrelated passages), relevance alone / "
          "with the router:\n\n| corpus | embedder | en | zh |\n|---|---|---|---|")
    for (corpus, name), found in results.items():
        cells = [f"{sent[1]} / {sent[2]} of {sent[0]}" for language, sent in sorted(found["requests"].items())
                 if language in ("en", "zh")]
        print(f"| {corpus} | {name} | {' | '.join(cells)} |")
    print(f"\n(dense languages: each embedder's own, MiniLM en, e5 and bilingual all; --min-relevance "
          f"{config.min_relevance}, {config.passages} passages, answers quoted from them)")
    for name in EMBEDDERS[1:]:
        if args.sweep and name in args.embedders.split(","):
            print(f"\nFusion of {name}'s dense ranking with BM25, other settings (hit@3 / MRR; served: by score "
                  f"with dense weight {SCORE_FUSION['en']} for English questions, by rank k 60 weight 1 for the "
                  "others):\n")
            print("\n".join(sweep(results, name)))
    if args.json:
        args.json.write_text(json.dumps({f"{c}|{e}": r for (c, e), r in results.items()}, ensure_ascii=False,
                                        indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
