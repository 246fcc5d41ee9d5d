"""Evaluation of a tuned model against its base model on held-out dialogues, printed as a markdown table.

    python -m finetune evaluate --model runs/sample --data runs/sample/eval.jsonl --limit 20
    python -m finetune evaluate --model DIR --data FILE --base HuggingFaceTB/SmolLM2-360M-Instruct --output r.json

For each model:
- perplexity: exp of the mean loss on the assistant tokens (the loss mask of training), whole dialogues;
- each assistant turn is generated greedily through the serving engine, with the reference history before it,
  and compared with the reference reply: ROUGE-L F1 (rouge-score, Chinese segmented by jieba) and corpus BLEU
  (sacrebleu; tokenize="zh" for Chinese, "13a" for English), by language of the reference;
- grounded behaviour, from turns whose prompt shows passages: "citations match" is the share of replies whose
  set of [n] markers equals the reference's, on turns whose reference cites; "not covered" is the share of
  replies that say the knowledge base does not cover the question, on turns whose reference says so (and, for
  answerable turns, how often a model wrongly says it).

Tested by tests/test_finetune_train.py (on a tiny model); the README's Fine-tuning section has real figures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedTokenizerBase

from chatbot.chat_format import Message, render_conversation
from chatbot.engine import Engine, GenerationOptions, load_engine
from chatbot.grounding import cited_numbers
from chatbot.hf_engine import TransformersEngine
from chatbot.models import EMBEDDED_NAME, ModelNotFoundError, adapter_base, load_model
from chatbot.prompts import shown_passages
from common.cli import ConfigError, add_arguments, resolve, run
from common.language import detect_language
from finetune.config import EvaluateConfig
from finetune.data import DataError, DataReport, Dialogue, check_problems, read_dialogues
from knowledge.lexical import words

# Loose on purpose, so a base model that words it differently still gets credit.
NOT_COVERED = re.compile(
    r"\b(does not|doesn't|do not|don't|cannot|can't)\s+(cover|contain|mention|include)|\bnot covered\b"
    r"|\bno information\b|没有涉及|没有包含|没有提到|没有相关|未涉及|未提及|不包含", re.IGNORECASE)


@dataclass
class Case:
    """One reply to generate: the conversation before it and what the reference says."""
    source: str  # file:line of the dialogue
    messages: list[Message]
    reference: str
    language: str
    kind: str  # "grounded" (the reference cites), "not_covered", or "other"


def says_not_covered(text: str) -> bool:
    return bool(NOT_COVERED.search(text))


def cited(text: str) -> set[int]:
    return set(cited_numbers(text))


def cases_of(dialogue: Dialogue) -> list[Case]:
    cases = []
    for i, message in enumerate(dialogue.messages):
        if message["role"] != "assistant":
            continue
        reference = message["content"]
        shows_passages = bool(shown_passages(dialogue.messages[i - 1]["content"]))
        kind = "other"
        if shows_passages and cited(reference):
            kind = "grounded"
        elif shows_passages and says_not_covered(reference):
            kind = "not_covered"
        cases.append(Case(dialogue.source, dialogue.messages[:i], reference, detect_language(reference), kind))
    return cases


class MixedTokenizer:
    """Words for rouge-score: lower-cased Latin words and jieba's words for Chinese (its default tokenizer
    drops every non-ASCII character, which would score all Chinese replies 0)."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


def perplexity(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, dialogues: list[Dialogue],
               max_length: int) -> float:
    """exp(mean loss per assistant token) over the dialogues, each cut to max_length tokens."""
    total, count = 0.0, 0
    for dialogue in dialogues:
        ids, mask = render_conversation(tokenizer, dialogue.messages)
        ids, mask = ids[:max_length], mask[:max_length]
        with torch.inference_mode():
            logits = model(torch.tensor([ids], device=model.device)).logits[0, :-1].float()
        targets = torch.tensor(ids[1:], device=logits.device)
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        weights = torch.tensor(mask[1:], device=logits.device, dtype=losses.dtype)
        total += float((losses * weights).sum())
        count += int(weights.sum())
    return math.exp(total / max(count, 1))


def generate(engine: Engine, cases: list[Case], max_new_tokens: int, label: str) -> list[str]:
    from tqdm import tqdm

    options = GenerationOptions(max_new_tokens=max_new_tokens)
    return ["".join(engine.stream(case.messages, options)).strip()
            for case in tqdm(cases, desc=f"generating ({label})", unit="reply")]


def score(cases: list[Case], replies: list[str]) -> dict[str, float | int | None]:
    """Generation metrics of one model's replies, by language."""
    import sacrebleu
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=MixedTokenizer())
    figures: dict[str, float | int | None] = {}
    for language in ("en", "zh"):
        chosen = [(c, r) for c, r in zip(cases, replies, strict=True) if c.language == language]
        figures[f"n_{language}"] = len(chosen)
        rouges = [rouge.score(c.reference, r)["rougeL"].fmeasure for c, r in chosen]
        figures[f"rougeL_{language}"] = sum(rouges) / len(rouges) if rouges else None
        bleu = sacrebleu.corpus_bleu([r for _, r in chosen], [[c.reference for c, _ in chosen]],
                                     tokenize="zh" if language == "zh" else "13a") if chosen else None
        figures[f"bleu_{language}"] = bleu.score if bleu else None
        grounded = [cited(r) == cited(c.reference) for c, r in chosen if c.kind == "grounded"]
        figures[f"n_grounded_{language}"] = len(grounded)
        figures[f"citations_{language}"] = sum(grounded) / len(grounded) if grounded else None
        wrongly = [says_not_covered(r) for c, r in chosen if c.kind == "grounded"]
        figures[f"false_not_covered_{language}"] = sum(wrongly) / len(wrongly) if wrongly else None
        not_covered = [says_not_covered(r) for c, r in chosen if c.kind == "not_covered"]
        figures[f"n_not_covered_{language}"] = len(not_covered)
        figures[f"not_covered_{language}"] = sum(not_covered) / len(not_covered) if not_covered else None
    return figures


def evaluate_model(spec: str, dialogues: list[Dialogue], cases: list[Case], config: EvaluateConfig,
                   label: str) -> tuple[dict, list[str]]:
    """Perplexity from the PyTorch weights (a remote `openai` model has none to read), replies from
    `config.backend`."""
    engine: Engine | None = None
    figures: dict = {"model": spec, "dialogues": len(dialogues), "perplexity": None, "backend": config.backend}
    if config.backend != "openai":
        model, tokenizer, name = load_model(spec, config.device)
        print(f"evaluating {label}: {name}", file=sys.stderr, flush=True)
        figures |= {"model": name, "perplexity": perplexity(model, tokenizer, dialogues, config.max_length)}
        if config.backend == "transformers":
            engine = TransformersEngine(model, tokenizer, name)
    if engine is None:
        engine = load_engine(spec, config.backend, config.device, precision=config.precision)
    replies = generate(engine, cases, config.max_new_tokens, label)
    return figures | score(cases, replies), replies


def default_base(model: str) -> str:
    """The model a tuned one started from: the adapter's base, or the `model` its run's config.yaml names."""
    base = adapter_base(model)
    run_config = Path(model) / "config.yaml"
    if base is None and run_config.is_file():
        base = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("model")
    return base or EMBEDDED_NAME


ROWS = [  # (figure, row title, number format, the figure that counts its cases)
    ("perplexity", "perplexity on assistant tokens (lower is better)", "{:.2f}", "dialogues"),
    ("rougeL_en", "ROUGE-L F1, English replies", "{:.3f}", "n_en"),
    ("rougeL_zh", "ROUGE-L F1, Chinese replies", "{:.3f}", "n_zh"),
    ("bleu_en", "BLEU, English replies", "{:.1f}", "n_en"),
    ("bleu_zh", "BLEU, Chinese replies", "{:.1f}", "n_zh"),
    ("citations_en", "citations match the reference, English", "{:.0%}", "n_grounded_en"),
    ("citations_zh", "citations match the reference, Chinese", "{:.0%}", "n_grounded_zh"),
    ("not_covered_en", "says \"not covered\" when the reference does, English", "{:.0%}", "n_not_covered_en"),
    ("not_covered_zh", "says \"not covered\" when the reference does, Chinese", "{:.0%}", "n_not_covered_zh"),
    ("false_not_covered_en", "says \"not covered\" wrongly, English (lower is better)", "{:.0%}", "n_grounded_en"),
    ("false_not_covered_zh", "says \"not covered\" wrongly, Chinese (lower is better)", "{:.0%}", "n_grounded_zh"),
]


def markdown_table(results: dict[str, dict]) -> str:
    """Rows are metrics, columns the models; rows without cases in the data are left out."""
    labels = list(results)
    lines = ["| metric | " + " | ".join(f"{label}: {results[label]['model']}" for label in labels) + " |",
             "|---" * (len(labels) + 1) + "|"]
    for key, title, number, count in ROWS:
        if not results[labels[0]].get(count):
            continue
        cells = ["–" if results[label][key] is None else number.format(results[label][key]) for label in labels]
        lines.append(f"| {title} (n={results[labels[0]][count]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(config: EvaluateConfig) -> dict:
    report = DataReport()
    dialogues = read_dialogues(config.data, config.system_prompt, report)
    check_problems(report, skip_invalid=False)
    dialogues = dialogues[:config.limit] if config.limit else dialogues
    if not dialogues:
        raise DataError(f"{config.data} holds no dialogue to evaluate")
    cases = [case for dialogue in dialogues for case in cases_of(dialogue)]
    base = None if (config.base or "").lower() == "none" else (config.base or default_base(config.model))
    models = ([("base", base)] if base else []) + [("tuned", config.model)]
    results, replies = {}, {}
    for label, spec in models:
        results[label], replies[label] = evaluate_model(spec, dialogues, cases, config, label)
    table = markdown_table(results)
    print(f"\n{len(dialogues)} dialogues, {len(cases)} replies from {config.data}; greedy, "
          f"max_new_tokens={config.max_new_tokens}\n\n{table}")
    output = {"data": config.data, "results": results, "table": table,
              "replies": [{"source": c.source, "language": c.language, "kind": c.kind, "reference": c.reference}
                          | {label: replies[label][i] for label in replies} for i, c in enumerate(cases)]}
    if config.output:
        Path(config.output).write_text(json.dumps(output, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune evaluate", description=__doc__.split("\n")[0])
    add_arguments(parser, EvaluateConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(lambda: evaluate(resolve(args, EvaluateConfig)), ConfigError, DataError, ModelNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
