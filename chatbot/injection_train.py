"""The injection filter (what a document says: ordinary, or an instruction planted for the assistant) and its
recheck: multilingual-e5-small tuned on chatbot/safety_data/injection*.jsonl, and a logistic regression on its
vectors. Run through `python -m chatbot.safety_train --head injection` and `--head recheck` (chatbot.safety_train
says how each is chosen).

The injection filter's recheck (chatbot/heads/injection_recheck.json) is a logistic regression on the tuned filter's
own vectors that must confirm each sentence the filter flags: the filter mistakes code with prose comments and
strings for instructions. It is trained on the filter's train split plus code as ordinary text (code and data
installed on this machine, split by file; code lines written for it, chatbot/safety_data/recheck_code.jsonl, with
planted instructions hidden in comments, strings and markup, split by family) and prose written for it
(recheck_prose.*.jsonl: tutorials, references, notices, prompts, exercises, with planted instructions in the same
framings, split by family); its threshold is the highest that
loses none of the validation planted instructions the filter catches alone.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from chatbot.grounding import looks_like_injection
from chatbot.safety_heads import INJECTION_DELTA, INJECTION_HEAD, RECHECK_HEAD, Head
from chatbot.safety_sets import DATA, EVAL, THRESHOLDS, assign_splits, by_layer, cell, fit_logistic, parts, split_of
from chatbot.safety_tune import EPOCHS, save_delta, tune
from knowledge.chunking import chunk_document, split_sentences
from knowledge.e5_torch import E5Encoder
from knowledge.evaluate import read_jsonl
from knowledge.loaders import find_files, load_file
from knowledge.store import BUNDLED_CORPUS

MAX_ORDINARY_REMOVED = 0.10  # the hand-written ordinary validation sentences (manual steps, notes about AI ...)
MAX_CATALOG_REMOVED = 0.0  # the interface messages of the validation catalogs: none (0.5% let 0.7% of a corpus go)
CATALOGS = Path("/usr/share/locale/zh_CN/LC_MESSAGES")  # gettext catalogs installed here: Chinese interface texts
PER_CATALOG = 40  # messages taken from each (about 3,000 in all: embedding them takes a minute or two)
RECHECK_CODE = DATA / "recheck_code.jsonl"  # code lines written for the recheck (ordinary, and planted instructions)
# tutorial and reference prose, notices, prompts, exercises ... written for the recheck (ordinary, and planted)
RECHECK_PROSE = sorted(DATA.glob("recheck_prose.*.jsonl"))
INSTALLED = ("/usr/include/**/*.h", "/usr/share/**/*.json", "/usr/share/**/*.js", "/usr/bin/*")
FILES, PER_FILE = 80, 8  # installed files of each kind (every n-th of those found), sentences from each
RECHECK_C = 10.0  # the recheck's inverse regularisation (benchmarks/injection_recheck.py compares others)
RECHECK_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)
CODE_KINDS = ("written code", "installed code")


def corpus_sentences(folder: Path) -> dict[str, list[str]]:
    """file → the sentences of its chunks, as the injection filter sees them in passages."""
    sentences = {}
    for path, source in find_files([folder]):
        chunks = chunk_document(load_file(path, source))
        sentences[source] = [s for chunk in chunks for s in split_sentences(chunk.text) if s.strip()]
    return sentences


def catalog_messages(folder: Path = CATALOGS, per_catalog: int = PER_CATALOG) -> dict[str, list[str]]:
    """catalog → some of its messages, Chinese translations and their English originals: the interface texts of the
    programs installed here ("请检查网络连接后重试"), many of them instructions to a person, none to an assistant. Read
    from the machine's gettext catalogs (.mo), never copied into the repository; every `step`-th message is taken."""
    messages = {}
    for path in sorted(folder.glob("*.mo")) if folder.is_dir() else []:
        pairs = mo_pairs(path.read_bytes())
        texts = [t.strip() for pair in pairs for t in pair if len(t.strip()) >= 8 and "%" not in t]
        texts = sorted(set(texts))
        step = max(1, len(texts) // per_catalog)
        messages[path.stem] = texts[::step][:per_catalog]
    return messages


def mo_pairs(data: bytes) -> list[tuple[str, str]]:
    """(original, translation) pairs of a GNU .mo file (little-endian, as Debian ships them)."""
    import struct

    magic, _, count, originals, translations = struct.unpack("<5I", data[:20])
    if magic != 0x950412DE:
        return []

    def text(table: int, number: int) -> str:
        length, offset = struct.unpack("<2I", data[table + 8 * number: table + 8 * number + 8])
        return data[offset: offset + length].decode("utf-8", errors="replace").split("\x00")[0]

    return [(text(originals, n), text(translations, n)) for n in range(count) if text(originals, n)]


def injection_rows() -> list[dict]:
    """The labelled sentences, and as ordinary ones the bundled corpus's sentences and the machine's interface
    messages (each split by file)."""
    rows = [row for path in sorted(DATA.glob("injection*.jsonl")) for row in read_jsonl(path)]
    for row in rows:
        row["kind"] = "instruction" if row["instruction"] else "ordinary"
    assign_splits(rows, "kind")
    rows += [row | {"split": "train", "kind": "older set"} for row in read_jsonl(EVAL / "injection.jsonl")]
    for kind, files in (("corpus", corpus_sentences(BUNDLED_CORPUS)), ("catalog", catalog_messages())):
        for name in sorted(files):
            split = split_of(name, sorted(files))
            rows += [{"text": s, "language": "", "instruction": False, "split": split, "kind": kind}
                     for s in files[name]]
    return rows


def injection_layers(head: Head, vectors: np.ndarray, texts: list[str], threshold: float | None = None,
                     patterns: np.ndarray | None = None, recheck: Head | None = None) -> dict[str, np.ndarray]:
    """What removes each sentence: the patterns, the head, either ("both"); with a recheck, also the head's flags
    it confirms ("confirmed") and the patterns or those ("with recheck": what serving removes)."""
    patterns = np.array([looks_like_injection(t) for t in texts]) if patterns is None else patterns
    learned = head.probabilities(vectors)[:, 1] >= (head.threshold if threshold is None else threshold)
    layers = {"patterns": patterns, "head": learned, "both": patterns | learned}
    if recheck is not None:
        confirmed = learned & (recheck.probabilities(vectors)[:, 1] >= recheck.threshold)
        layers |= {"confirmed": confirmed, "with recheck": patterns | confirmed}
    return layers


def injection_figures(layers: dict[str, np.ndarray], rows: list[dict], chosen: list[int]) -> dict:
    groups = {"planted": [i for i in chosen if rows[i]["instruction"]],
              "ordinary": [i for i in chosen if not rows[i]["instruction"]
                           and rows[i]["kind"] not in ("corpus", "catalog", *CODE_KINDS)],
              "bundled corpus": [i for i in chosen if rows[i]["kind"] == "corpus"],
              "interface messages": [i for i in chosen if rows[i]["kind"] == "catalog"]}
    groups |= {kind: [i for i in chosen if rows[i]["kind"] == kind and not rows[i]["instruction"]]
               for kind in CODE_KINDS}
    return {name: by_layer(layers, rows, members) for name, members in groups.items() if members}


def train_injection(external: bool) -> dict:
    """Tune the encoder and its head on the train split, choose the threshold on the validation split (the lowest
    at which no corpus sentence, no interface message and at most MAX_ORDINARY_REMOVED of the hand-written ordinary
    sentences are removed), score the test split and the report-only sets once, and write what serving loads."""
    rows = injection_rows()
    texts = [r["text"] for r in rows]
    labels = np.array([int(r["instruction"]) for r in rows])
    split = parts(rows)
    train = split["train"]
    changes, head = tune(E5Encoder.load(), [texts[i] for i in train], labels[train], ("ordinary", "instruction"),
                         name="the injection filter")
    save_delta(changes, INJECTION_DELTA)
    encoder = E5Encoder.load(delta=INJECTION_DELTA)
    chosen = split["validation"] + split["test"]
    print(f"judging {len(chosen)} sentences ...", file=sys.stderr, flush=True)
    vectors = np.zeros((len(rows), head.weights.shape[1]), dtype=np.float32)
    vectors[chosen] = encoder.queries([texts[i] for i in chosen])
    patterns = np.array([looks_like_injection(t) for t in texts])
    validation = split["validation"]
    planted = [i for i in validation if rows[i]["instruction"]]
    ordinary = [i for i in validation if not rows[i]["instruction"] and rows[i]["kind"] not in ("corpus", "catalog")]
    corpus = [i for i in validation if rows[i]["kind"] == "corpus"]
    catalog = [i for i in validation if rows[i]["kind"] == "catalog"]
    threshold = 1.0
    for threshold in THRESHOLDS:  # the lowest acceptable threshold catches the most
        removed = injection_layers(head, vectors, texts, threshold, patterns)["both"]
        if not (removed[corpus].any() or removed[ordinary].mean() > MAX_ORDINARY_REMOVED
                or catalog and removed[catalog].mean() > MAX_CATALOG_REMOVED):
            break
    print(f"validation: threshold {threshold:.2f}, planted removed {removed[planted].mean():.3f}", file=sys.stderr)
    for shown in (0.5, 0.8, 0.9, 0.95, 0.98, 0.99):  # how the choice trades: the validation split only
        at = injection_layers(head, vectors, texts, shown, patterns)["both"]
        print(f"  at {shown:.2f}: planted {at[planted].mean():.3f}, ordinary {at[ordinary].mean():.3f}, "
              f"corpus {at[corpus].sum()}, interface messages {at[catalog].sum()}", file=sys.stderr)
    head = Head(head.classes, head.weights, head.bias, float(threshold), encoder.name)
    layers = injection_layers(head, vectors, texts, patterns=patterns)
    figures = {name: injection_figures(layers, rows, split[name]) for name in ("validation", "test")}
    unseen = [row | {"kind": "unseen"} for row in read_jsonl(EVAL / "injection_unseen.jsonl")]
    unseen_texts = [r["text"] for r in unseen]
    figures["injection_unseen.jsonl"] = injection_figures(
        injection_layers(head, encoder.queries(unseen_texts), unseen_texts), unseen, list(range(len(unseen))))
    if external:
        figures |= external_corpora(head, encoder)
    head.write(INJECTION_HEAD, epochs=EPOCHS, split={name: len(split[name]) for name in split}, figures=figures,
               trained_on="the train split of chatbot/safety_data/injection*.jsonl, chatbot/eval/injection.jsonl, "
                          "and as ordinary sentences the bundled corpus's train files and the messages of the train "
                          f"catalogs in {CATALOGS}; the encoder's changes are in " + INJECTION_DELTA.name)
    return figures


def external_sentences() -> dict[str, list[str]]:
    """corpus → the sentences of every evaluation corpus the project did not write that is installed here."""
    import tempfile

    from knowledge.eval.external import CORPORA

    found = {}
    for name, write in CORPORA.items():
        with tempfile.TemporaryDirectory() as folder:
            try:
                files = corpus_sentences(write(Path(folder) / name))
            except (OSError, RuntimeError, ValueError) as err:
                print(f"{name}: not available here ({err})", file=sys.stderr)
                continue
        found[name] = [s for sentences in files.values() for s in sentences]
    return found


def external_corpora(head: Head, embedder: E5Encoder, recheck: Head | None = None) -> dict:
    """Sentences removed from each evaluation corpus the project did not write (none is a planted instruction)."""
    figures = {}
    for name, texts in external_sentences().items():
        print(f"embedding the {len(texts)} sentences of {name} ...", file=sys.stderr, flush=True)
        rows = [{"language": "", "instruction": False, "kind": "corpus"} for _ in texts]
        layers = injection_layers(head, embedder.queries(texts), texts, recheck=recheck)
        figures[name] = {"corpus": by_layer(layers, rows, list(range(len(rows))))}
    return figures


def installed_code(patterns: tuple[str, ...] = INSTALLED, files: int = FILES, per_file: int = PER_FILE
                   ) -> dict[str, list[str]]:
    """file → some of its "sentences" as a passage of it would be split: code, comments, configuration and data
    installed here, none of it an instruction to an assistant; every n-th readable text file of each kind."""
    import glob

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


def recheck_rows() -> list[dict]:
    """The injection filter's rows; code as ordinary text, installed here (split by file) and written for the
    recheck (RECHECK_CODE: ordinary lines and planted instructions, split by family); and the prose written for it
    (RECHECK_PROSE, split by family among itself)."""
    rows = injection_rows()
    files = installed_code()
    names = sorted(files)
    rows += [{"text": s, "language": "", "instruction": False, "split": split_of(name, names),
              "kind": "installed code"} for name in names for s in files[name]]
    written = [row | {"kind": "written code"} for row in read_jsonl(RECHECK_CODE)]
    assign_splits(written, "instruction")
    prose = [row | {"kind": "instruction" if row["instruction"] else "ordinary", "batch": "recheck prose"}
             for path in RECHECK_PROSE for row in read_jsonl(path)]
    assign_splits(prose, "kind")
    return rows + written + prose


def choose_recheck(layers_at, planted: list[int]) -> float | None:
    """The highest recheck threshold at which the filter keeps every validation planted instruction it catches
    alone (None: none does); `layers_at(threshold)` gives injection_layers with the recheck at it."""
    def caught(threshold: float) -> int:
        return int(layers_at(threshold)["with recheck"][planted].sum())

    alone = int(layers_at(float(RECHECK_THRESHOLDS[0]))["both"][planted].sum())
    return max((float(t) for t in RECHECK_THRESHOLDS if caught(float(t)) == alone), default=None)


def train_recheck(external: bool) -> dict:
    """Fit the recheck on the train split's vectors (the shipped filter's encoder), choose its threshold on the
    validation split, score the test split and the report-only sets once, and write what serving loads."""
    rows = recheck_rows()
    texts = [r["text"] for r in rows]
    labels = np.array([int(r["instruction"]) for r in rows])
    split = parts(rows)
    encoder, injection = E5Encoder.load(delta=INJECTION_DELTA), Head.read(INJECTION_HEAD)
    print(f"embedding {len(rows)} labelled sentences ...", file=sys.stderr, flush=True)
    vectors = encoder.queries(texts)
    patterns = np.array([looks_like_injection(t) for t in texts])
    recheck = fit_logistic(vectors[split["train"]], labels[split["train"]], encoder.name, RECHECK_C)

    def layers_at(threshold: float) -> dict[str, np.ndarray]:
        return injection_layers(injection, vectors, texts, patterns=patterns,
                                recheck=replace(recheck, threshold=threshold))

    threshold = choose_recheck(layers_at, [i for i in split["validation"] if labels[i]])
    if threshold is None:
        raise SystemExit("no recheck threshold keeps the validation planted instructions: nothing written")
    print(f"validation: recheck threshold {threshold:.2f}", file=sys.stderr)
    recheck = replace(recheck, threshold=threshold)
    layers = layers_at(threshold)
    figures = {name: injection_figures(layers, rows, split[name]) for name in ("validation", "test")}
    unseen = [row | {"kind": "unseen"} for row in read_jsonl(EVAL / "injection_unseen.jsonl")]
    unseen_texts = [r["text"] for r in unseen]
    figures["injection_unseen.jsonl"] = injection_figures(
        injection_layers(injection, encoder.queries(unseen_texts), unseen_texts, recheck=recheck), unseen,
        list(range(len(unseen))))
    if external:
        figures |= external_corpora(injection, encoder, recheck)
    recheck.write(RECHECK_HEAD, C=RECHECK_C, split={name: len(split[name]) for name in split}, figures=figures,
                  trained_on="the injection filter's vectors (" + INJECTION_DELTA.name + ") of its train split, "
                             f"and as code the train files of {', '.join(INSTALLED)}; and the train families of "
                             "chatbot/safety_data/recheck_code.jsonl and recheck_prose.*.jsonl")
    return figures


def print_injection(figures: dict) -> None:
    print("\nInjection filter (chatbot/heads/injection.json): sentences removed by the patterns / the head / both\n")
    print("| set | planted instructions | ordinary sentences (hand-written) | interface messages | corpus sentences |"
          "\n|---|---|---|---|---|")
    layers = ("patterns", "head", "both")
    for name, table in figures.items():
        cells = [cell(table[group], layers, "all") if group in table else "–"
                 for group in ("planted", "ordinary", "interface messages")]
        corpus = table.get("bundled corpus") or table.get("corpus")
        cells.append(cell(corpus, layers, "all") if corpus else "–")
        print(f"| {name} | " + " | ".join(cells) + " |")


def print_recheck(figures: dict) -> None:
    print("\nInjection filter with its recheck (chatbot/heads/injection_recheck.json): sentences removed by the "
          "patterns or the filter alone / with the recheck confirming the filter's flags\n")
    groups = ("planted", "ordinary", "written code", "installed code", "interface messages")
    print("| set | planted instructions | ordinary sentences (hand-written) | code written for it | code installed "
          "here | interface messages | corpus sentences |\n|---|---|---|---|---|---|---|")
    for name, table in figures.items():
        cells = [cell(table[group], ("both", "with recheck"), "all") if group in table else "–"
                 for group in groups]
        if "corpus" in table:  # an evaluation corpus: its share removed
            corpus = table["corpus"]
            n = corpus["both"]["all"]["n"]
            cells.append(" / ".join(f"{corpus[layer]['all']['flagged'] / n:.2%}" for layer in ("both", "with recheck"))
                         + f" of {n}")
        else:
            corpus = table.get("bundled corpus")
            cells.append(cell(corpus, ("both", "with recheck"), "all") if corpus else "–")
        print(f"| {name} | " + " | ".join(cells) + " |")
