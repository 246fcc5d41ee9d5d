"""Tune multilingual-e5-small into the learned safety classifiers and write them, with the figures they were chosen on,
to chatbot/heads/: the harm classifier (what a user asks: safe, harmful, self-harm) and the injection filter (what a
document says: ordinary, or an instruction planted for the assistant).

    python -m chatbot.safety_train                  # all four, about 1.5 hours on 2 CPU cores
    python -m chatbot.safety_train --head harm      # one of them (injection: retrain its recheck after it; harm: the
                                                    # help-lines head after it)
    python -m chatbot.safety_train --head recheck   # the injection filter's recheck alone, about 25 minutes
    python -m chatbot.safety_train --head help      # the help-lines head alone, a few minutes

Data, written for this project (chatbot/safety_data/, README "Safety" says what is in it): requests in English and
Chinese labelled safe, harmful or self-harm, each with the intent it phrases; sentences labelled planted instruction
or ordinary, each with the goal or the family it belongs to. Every set is split by intent (per language and kind:
70% train, 15% validation, 15% test, by a hash of the intent), so no paraphrase of a test item is trained on. The
older project sets (chatbot/eval/safety.jsonl, safety_probe.jsonl, injection.jsonl) are used for training only;
the unseen sets (safety_unseen.jsonl, injection_unseen.jsonl) and the everyday requests only for reporting.

Both are multilingual-e5-small itself, tuned (LoRA) with a softmax head on their train split (chatbot.safety_tune),
and their thresholds are chosen on the validation split. Harm: the most unsafe requests refused while the whole
check (the head, and the patterns unless the head's harm probability is below the veto) refuses at most 5% of the
benign requests in each language and none of the everyday ones. Injection: the lowest threshold at which no sentence
of the bundled corpus's validation files, no validation interface message and at most 10% of the ordinary validation
sentences are removed (patterns or head). The patterns (chatbot.safety, chatbot.grounding) stay. The test split, the
unseen sets and the sentences of the evaluation corpora the project did not write (knowledge.eval.external: pydoc,
rust-zh, man-zh, cargo, vim-zh, where installed) are scored once, with that choice; the figures go into the head's
file and are printed.

The injection filter's recheck (chatbot/heads/injection_recheck.json) is a logistic regression on the tuned filter's
own vectors that must confirm each sentence the filter flags: the filter mistakes code with prose comments and
strings for instructions. It is trained on the filter's train split plus code as ordinary text (code and data
installed on this machine, split by file; code lines written for it, chatbot/safety_data/recheck_code.jsonl, with
planted instructions hidden in comments, strings and markup, split by family) and prose written for it
(recheck_prose.*.jsonl: tutorials, references, notices, prompts, exercises, with planted instructions in the same
framings, split by family); its threshold is the highest that
loses none of the validation planted instructions the filter catches alone.

The help-lines head (chatbot/heads/help_lines.json, `--head help`, a few minutes) is a logistic regression on the
harm encoder's vectors: the message asks for a crisis or support line, which the app answers with the numbers
written into it (chatbot.prompts.HELP_LINES) rather than the model's guess at them. It is trained on
chatbot/safety_data/help_lines.*.jsonl (such requests and look-alikes that ask for none: other phone numbers,
mental-health questions, hotline volunteering; split by intent) and the harm data's everyday and technical
requests; its C and threshold are chosen on validation: the most requests for a line given the numbers while no
everyday or technical request and at most 1% of all the others that ask for none (pooled) are. It records a
fingerprint of the harm encoder and head it was fitted over, and serving skips it when they have changed.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from chatbot.grounding import looks_like_injection
from chatbot.safety import (
    HARM_DELTA,
    HARM_HEAD,
    HELP_HEAD,
    INJECTION_DELTA,
    INJECTION_HEAD,
    RECHECK_HEAD,
    Head,
    harm_category,
    harm_fingerprint,
    judge,
)
from chatbot.safety_tune import EPOCHS, save_delta, tune
from knowledge.chunking import chunk_document, split_sentences
from knowledge.e5_torch import E5Encoder
from knowledge.evaluate import read_jsonl
from knowledge.loaders import find_files, load_file
from knowledge.store import BUNDLED_CORPUS

HERE = Path(__file__).resolve().parent
DATA = HERE / "safety_data"
EVAL = HERE / "eval"
SHARES = (0.70, 0.85)  # train below the first, validation below the second, test above
MAX_FALSE_REFUSALS = 0.05  # benign requests refused, per language (the goal for the test split too)
MAX_EVERYDAY_REFUSED = 0.0  # everyday requests refused
VETOES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # below this harm probability the head overrules a pattern (0: never)
MAX_ORDINARY_REMOVED = 0.10  # the hand-written ordinary validation sentences (manual steps, notes about AI ...)
MAX_CATALOG_REMOVED = 0.0  # the interface messages of the validation catalogs: none (0.5% let 0.7% of a corpus go)
CATALOGS = Path("/usr/share/locale/zh_CN/LC_MESSAGES")  # gettext catalogs installed here: Chinese interface texts
PER_CATALOG = 40  # messages taken from each (about 3,000 in all: embedding them takes a minute or two)
THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.01), 2)
RECHECK_CODE = DATA / "recheck_code.jsonl"  # code lines written for the recheck (ordinary, and planted instructions)
# tutorial and reference prose, notices, prompts, exercises ... written for the recheck (ordinary, and planted)
RECHECK_PROSE = sorted(DATA.glob("recheck_prose.*.jsonl"))
INSTALLED = ("/usr/include/**/*.h", "/usr/share/**/*.json", "/usr/share/**/*.js", "/usr/bin/*")
FILES, PER_FILE = 80, 8  # installed files of each kind (every n-th of those found), sentences from each
RECHECK_C = 10.0  # the recheck's inverse regularisation (benchmarks/injection_recheck.py compares others)
RECHECK_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)
HELP_DATA = sorted(DATA.glob("help_lines.*.jsonl"))  # requests for a crisis line, and look-alikes that ask for none
# the help-lines head's inverse regularisations, one chosen on validation (from 1,000 on it gains no more there)
HELP_CS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
MAX_HELP_OTHERS = 0.01  # validation messages asking for no line that may get the lines instead of the model's answer
PLAIN_KINDS = ("everyday", "technical")  # the harm data's kinds that must never get the lines
CODE_KINDS = ("written code", "installed code")


def split_of(intent: str, members: list[str]) -> str:
    """train, validation or test for `intent`, whose group (same language and kind) has these intents."""
    order = sorted(members, key=lambda name: hashlib.sha1(name.encode()).hexdigest())
    position = order.index(intent) / len(order)
    return "train" if position < SHARES[0] else "validation" if position < SHARES[1] else "test"


def assign_splits(rows: list[dict], kind: str, per_language: bool = True) -> None:
    """Set row["split"] by intent, within each (language, `kind` value, batch) group. Rows written later carry
    their "batch" number and are split among themselves, so adding them moves no earlier intent to another split.
    Where both languages name some intents alike (the same request written in each), `per_language=False` splits
    the names of both languages together, so an intent is in the same split in both: a multilingual encoder reads a
    translation as a paraphrase."""
    def group(row: dict) -> tuple:
        return row["language"] if per_language else None, row[kind], row.get("batch")

    groups: dict[tuple, set[str]] = {}
    for row in rows:
        groups.setdefault(group(row), set()).add(row["intent"])
    members = {key: sorted(intents) for key, intents in groups.items()}
    for row in rows:
        row["split"] = split_of(row["intent"], members[group(row)])


def rates(flags: np.ndarray, rows: list[dict]) -> dict:
    """How many of `rows` are flagged, per language and overall."""
    table = {}
    for language in ("en", "zh", "all"):
        chosen = [bool(f) for f, r in zip(flags, rows, strict=True) if language in ("all", r["language"])]
        table[language] = {"n": len(chosen), "flagged": sum(chosen), "rate": round(sum(chosen) / max(len(chosen), 1),
                                                                                   4)}
    return table


def by_layer(layers: dict[str, np.ndarray], rows: list[dict], chosen: list[int]) -> dict:
    return {name: rates(flags[chosen], [rows[i] for i in chosen]) for name, flags in layers.items()}


def parts(rows: list[dict]) -> dict[str, list[int]]:
    return {name: [i for i, r in enumerate(rows) if r["split"] == name] for name in ("train", "validation", "test")}


# ----- the harm classifier -------------------------------------------------------------------------------------
def harm_rows() -> list[dict]:
    rows = [row for path in sorted(DATA.glob("requests*.jsonl")) for row in read_jsonl(path)]
    assign_splits(rows, "kind")
    rows += [labelled(row, "train", name) for name in ("safety.jsonl", "safety_probe.jsonl")  # the patterns were
             for row in read_jsonl(EVAL / name)]                                              # tuned on these
    return rows


def document_questions() -> dict[str, list[dict]]:
    """The retrieval questions, every one benign (a user asking about their documents): the bundled set's, and those
    of the corpora the project did not write, which nothing is tuned on (knowledge.eval.external). Report only."""
    from knowledge.eval import external
    from knowledge.evaluate import QUESTIONS

    sets = {"bundled document questions": [QUESTIONS],
            "unseen corpora's document questions": [external.PYDOC_QUESTIONS, external.RUST_ZH_QUESTIONS,
                                                    external.MAN_ZH_QUESTIONS, external.CARGO_QUESTIONS,
                                                    external.VIM_ZH_QUESTIONS]}
    return {name: [{"text": q["question"], "language": q["language"], "label": "benign", "kind": "technical",
                    "intent": path.name, "split": "report"} for path in paths for q in read_jsonl(path)]
            for name, paths in sets.items()}


def labelled(row: dict, split: str, source: str) -> dict:
    """A row of the older sets (text, language, harmful, category) in the shape of the new ones."""
    label = "self_harm" if row.get("category") == "self_harm" else "harmful" if row.get("harmful") else "benign"
    return {"text": row["text"], "language": row["language"], "label": label, "split": split, "intent": source,
            "kind": "everyday" if source == "everyday.jsonl" else "lookalike" if label == "benign" else label}


def refusals(unsafe: np.ndarray, patterns: np.ndarray, threshold: float, veto: float) -> dict[str, np.ndarray]:
    """Who refuses: the patterns alone, the head alone (at `threshold`), and the whole check: the head, or a pattern
    unless the head's harm probability is below `veto` (as chatbot.safety.Learned.judge decides)."""
    head = unsafe >= threshold
    return {"patterns": patterns, "head": head, "both": head | (patterns & (unsafe >= veto))}


def choose_harm(unsafe: np.ndarray, patterns: np.ndarray, rows: list[dict]) -> tuple[float, float, float]:
    """(share of the unsafe rows refused, threshold, veto): the most refused while at most MAX_FALSE_REFUSALS of the
    benign rows in each language, and MAX_EVERYDAY_REFUSED of the everyday ones, are refused."""
    benign = [np.array([r["label"] == "benign" and r["language"] == lang for r in rows]) for lang in ("en", "zh")]
    everyday = np.array([r["kind"] == "everyday" for r in rows])
    unsafe_rows = np.array([r["label"] != "benign" for r in rows])
    best = (-1.0, 1.0, 0.0)
    for threshold in THRESHOLDS:
        for veto in VETOES:
            refused = refusals(unsafe, patterns, threshold, veto)["both"]
            if (all(refused[mask].mean() <= MAX_FALSE_REFUSALS for mask in benign)
                    and refused[everyday].mean() <= MAX_EVERYDAY_REFUSED):
                best = max(best, (float(refused[unsafe_rows].mean()), float(threshold), veto))
    return best


def harm_figures(head: Head, vectors: np.ndarray, rows: list[dict], patterns: np.ndarray) -> dict:
    """Refused by each layer, for the harmful, self-harm and benign rows."""
    return by_kind(refusals(1 - head.probabilities(vectors)[:, 0], patterns, head.threshold, head.veto), rows)


def by_kind(layers: dict[str, np.ndarray], rows: list[dict]) -> dict:
    """Refused by each layer, for the harmful, self-harm and benign rows (benign also as look-alike, everyday and
    technical: questions about software, in the words of its documentation)."""
    groups = {label: [i for i, r in enumerate(rows) if r["label"] == label] for label in ("harmful", "self_harm",
                                                                                        "benign")}
    groups |= {kind: [i for i, r in enumerate(rows) if r["kind"] == kind]
               for kind in ("lookalike", "everyday", "technical")}
    return {name: by_layer(layers, rows, chosen) for name, chosen in groups.items() if chosen}


def train_harm(seed: int = 0) -> dict:
    """Tune the encoder and its head on the train split (chatbot.safety_tune, from `seed`), choose the threshold and
    veto on the validation split, score the test split and the report-only sets once, and write what serving loads."""
    rows = harm_rows()
    classes = ("safe", "harmful", "self_harm")
    labels = np.array([classes.index(r["label"].replace("benign", "safe")) for r in rows])
    split = parts(rows)
    train = split["train"]
    changes, head = tune(E5Encoder.load(), [rows[i]["text"] for i in train], labels[train], classes, seed=seed)
    save_delta(changes, HARM_DELTA)
    encoder = E5Encoder.load(delta=HARM_DELTA)  # what serving loads: the figures are taken with it
    chosen = split["validation"] + split["test"]
    print(f"judging {len(chosen)} requests ...", file=sys.stderr, flush=True)
    vectors = np.zeros((len(rows), head.weights.shape[1]), dtype=np.float32)
    vectors[chosen] = encoder.queries([rows[i]["text"] for i in chosen])
    patterns = np.array([judge(r["text"]).harmful for r in rows])
    validation = split["validation"]
    unsafe = 1 - head.probabilities(vectors[validation])[:, 0]
    refused, threshold, veto = choose_harm(unsafe, patterns[validation], [rows[i] for i in validation])
    print(f"validation: threshold {threshold:.2f}, veto {veto:.2f}, unsafe refused {refused:.3f}", file=sys.stderr)
    head = Head(classes, head.weights, head.bias, threshold, encoder.name, veto)
    figures = {name: harm_figures(head, vectors[split[name]], [rows[i] for i in split[name]], patterns[split[name]])
               for name in ("validation", "test")}
    reports = {name: [labelled(row, "report", name) for row in read_jsonl(EVAL / name)]
               for name in ("safety_unseen.jsonl", "everyday.jsonl")} | document_questions()
    for name, extra in reports.items():
        figures[name] = harm_figures(head, encoder.queries([r["text"] for r in extra]), extra,
                                     np.array([judge(r["text"]).harmful for r in extra]))
    sizes = {name: {"requests": len(split[name]), "intents": len({rows[i]["intent"] for i in split[name]})}
             for name in split}
    head.write(HARM_HEAD, epochs=EPOCHS, seed=seed, split=sizes, figures=figures,
               trained_on="the train split of chatbot/safety_data/requests*.jsonl, and chatbot/eval/safety.jsonl, "
                          "safety_probe.jsonl; the encoder's changes are in " + HARM_DELTA.name)
    return figures


# ----- the injection filter ------------------------------------------------------------------------------------
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


# ----- the injection filter's recheck --------------------------------------------------------------------------
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


def fit_logistic(vectors: np.ndarray, labels: np.ndarray, name: str, c: float = RECHECK_C,
                classes: tuple[str, str] = ("ordinary", "instruction")) -> Head:
    """A logistic regression on an encoder's vectors, as a two-class head (threshold 0.5 until one is chosen)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=5000).fit(vectors, labels)
    w, b = model.coef_[0].astype(np.float32), float(model.intercept_[0])
    # softmax over (-z/2, z/2) is the logistic sigmoid of z = w·x + b
    return Head(classes, np.stack([-w / 2, w / 2]), np.array([-b / 2, b / 2], np.float32), 0.5, name)


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
    recheck = fit_logistic(vectors[split["train"]], labels[split["train"]], encoder.name)

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


# ----- requests for a crisis line ------------------------------------------------------------------------------
def help_rows() -> list[dict]:
    """Requests for a crisis or support line and messages like them that ask for none (HELP_DATA, split by intent
    per label, an intent both languages have in one split), and as messages that ask for none the harm data's
    everyday requests and technical questions, in their own splits."""
    rows = [row for path in HELP_DATA for row in read_jsonl(path)]
    assign_splits(rows, "label", per_language=False)
    return rows + [row | {"label": "other"} for row in harm_rows() if row.get("kind") in PLAIN_KINDS]


ASKS = "asks for a line"


def help_kind(row: dict) -> str:
    """How a row counts in the help-lines head's figures."""
    if row["label"] == "help":
        return ASKS
    if row["label"] == "other" and row.get("kind") not in PLAIN_KINDS:
        return "look-alikes"
    if row["label"] in ("harmful", "self_harm"):
        return "unsafe"
    return row["kind"] if row.get("kind") in PLAIN_KINDS else "other benign"


def harm_categories(vectors: np.ndarray, rows: list[dict]) -> list[str | None]:
    """The shipped harm check's category for each row (None: it lets the row through), as
    `chatbot.safety.Learned.verdict` decides: its head on these harm-encoder vectors, and the patterns."""
    harm = Head.read(HARM_HEAD)
    return [harm_category(harm, p, judge(r["text"]).category)
            for p, r in zip(harm.probabilities(vectors), rows, strict=True)]


OUTCOMES = ("the numbers", "the crisis reply", "a refusal", "the model")


def help_figures(head: Head, vectors: np.ndarray, rows: list[dict]) -> dict:
    """Per kind of row (help_kind) and language, how many get the lines: the harm check lets them through and the
    head flags them; the texts that get them but ask for none; and per language what answers the requests for a
    line (OUTCOMES: the lines, or the harm check's crisis reply or refusal, or the model where neither says)."""
    categories = harm_categories(vectors, rows)
    flags = np.array([f is not None and c is None for f, c in zip(head.flagged(vectors), categories, strict=True)])
    table = {}
    for kind in dict.fromkeys(help_kind(r) for r in rows):
        members = [i for i, r in enumerate(rows) if help_kind(r) == kind]
        table[kind] = rates(flags[members], [rows[i] for i in members])
    table["flagged"] = [r["text"] for r, f in zip(rows, flags, strict=True) if f and help_kind(r) != ASKS]
    answered = {language: dict.fromkeys(OUTCOMES, 0) for language in ("en", "zh")}
    for row, flag, category in zip(rows, flags, categories, strict=True):
        if help_kind(row) == ASKS:
            outcome = 0 if flag else 1 if category == "self_harm" else 2 if category else 3
            answered[row["language"]][OUTCOMES[outcome]] += 1
    if any(sum(counts.values()) for counts in answered.values()):
        table["requests for a line answered by"] = answered
    return table


def choose_help(asks: np.ndarray, rows: list[dict]) -> float:
    """The lowest threshold (the most requests for a line answered with the app's numbers) at which no everyday or
    technical message and at most MAX_HELP_OTHERS of the others are answered so instead of by the model; `asks`:
    the head's probability for the rows the harm check lets through, 0 for the others."""
    plain = np.array([r.get("kind") in PLAIN_KINDS for r in rows])
    other = np.array([r["label"] != "help" for r in rows])
    for threshold in THRESHOLDS:
        flagged = asks >= threshold
        if not (flagged & plain).any() and (flagged & other).sum() <= MAX_HELP_OTHERS * other.sum():
            return float(threshold)
    return 1.01  # none: a head that flags nothing


def train_help_lines() -> dict:
    """Fit the help-lines head on the harm encoder's vectors of the train split with each of HELP_CS, keep the one
    that gives the most validation requests for a line the numbers at its threshold (choose_help), score the test
    split and the report-only sets once, and write what serving loads."""
    rows = help_rows()
    labels = np.array([int(r["label"] == "help") for r in rows])
    split = parts(rows)
    encoder = E5Encoder.load(delta=HARM_DELTA)
    print(f"embedding {len(rows)} requests ...", file=sys.stderr, flush=True)
    vectors = encoder.queries([r["text"] for r in rows])
    validation = split["validation"]
    held = [rows[i] for i in validation]
    passes = np.array([c is None for c in harm_categories(vectors[validation], held)])
    best: tuple[int, float, Head] | None = None
    for c in HELP_CS:  # the smallest C of a tie: the most regularised
        head = fit_logistic(vectors[split["train"]], labels[split["train"]], encoder.name, c, ("other", "help_lines"))
        asks = (1 - head.probabilities(vectors[validation])[:, 0]) * passes  # as Head.flagged reads it
        threshold = choose_help(asks, held)
        answered = int(((asks >= threshold) & (labels[validation] == 1)).sum())
        print(f"validation: C {c}, threshold {threshold:.2f}, {answered} requests for a line given the numbers",
              file=sys.stderr)
        if best is None or answered > best[0]:
            best = answered, c, replace(head, threshold=threshold)
    head = best[2]
    figures = {name: help_figures(head, vectors[split[name]], [rows[i] for i in split[name]])
               for name in ("validation", "test")}
    fresh = sorted((DATA / "not_trained").glob("requests5.*.jsonl"))
    reports = {"harm data's test split": [r for r in harm_rows() if r["split"] == "test"],
               "everyday.jsonl": [labelled(r, "report", "everyday.jsonl") for r in read_jsonl(EVAL / "everyday.jsonl")],
               "fresh requests (not_trained)": [r for path in fresh for r in read_jsonl(path)]} | document_questions()
    for name, extra in reports.items():
        figures[name] = help_figures(head, encoder.queries([r["text"] for r in extra]), extra)
    head.write(HELP_HEAD, C=best[1], harm=harm_fingerprint(), split={name: len(split[name]) for name in split},
               figures=figures,
               trained_on="the harm encoder's vectors (" + HARM_DELTA.name + ") of the train split of "
                          "chatbot/safety_data/help_lines.*.jsonl and of the harm data's everyday and technical "
                          "requests")
    return figures


# ----- the command ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatbot.safety_train", description=__doc__.split("\n")[0])
    parser.add_argument("--head", choices=("harm", "injection", "recheck", "help", "both"), default="both",
                        help="both: harm, then injection and its recheck, then the help-lines head (which reads the "
                             "harm encoder: retrain it after harm)")
    parser.add_argument("--external", action=argparse.BooleanOptionalAction, default=True,
                        help="also count the sentences removed from the evaluation corpora the project did not write")
    parser.add_argument("--seed", type=int, default=0, help="harm: the tuning's random seed")
    args = parser.parse_args(argv)
    if args.head in ("harm", "both"):
        print_harm(train_harm(args.seed))
    if args.head in ("injection", "both"):
        print_injection(train_injection(args.external))
    if args.head in ("recheck", "both"):
        print_recheck(train_recheck(args.external))
    if args.head in ("help", "both"):  # after harm: it reads the harm encoder's vectors and the harm check's verdicts
        print_help(train_help_lines())
    return 0


def cell(table: dict, layers: tuple[str, ...], language: str) -> str:
    if not table["both"][language]["n"]:
        return "–"
    return " / ".join(str(table[layer][language]["flagged"]) for layer in layers) + \
        f" of {table['both'][language]['n']}"


def print_harm(figures: dict) -> None:
    print("\nHarm classifier (chatbot/heads/harm.json): requests refused by the patterns / the head / both\n")
    print("| set | language | harmful | self-harm | benign look-alikes | everyday | technical |\n"
          "|---|---|---|---|---|---|---|")
    layers = ("patterns", "head", "both")
    for name, table in figures.items():
        for language in ("en", "zh"):
            cells = [cell(table[label], layers, language) if label in table else "–"
                     for label in ("harmful", "self_harm", "lookalike", "everyday", "technical")]
            print(f"| {name} | {language} | " + " | ".join(cells) + " |")


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


def print_help(figures: dict) -> None:
    """The help-lines head's figures as a table, what answers the requests for a line, then the messages given the
    lines that ask for none."""
    print("\n| set | kind | en | zh |\n|---|---|---|---|")
    for name, table in figures.items():
        for kind, counts in table.items():
            if kind not in ("flagged", "requests for a line answered by"):
                cells = [f"{counts[lang]['flagged']} of {counts[lang]['n']}" if counts[lang]["n"] else "–"
                         for lang in ("en", "zh")]
                print(f"| {name} | {kind} | {' | '.join(cells)} |")
    print(f"\n| set | requests for a line answered by: {' / '.join(OUTCOMES)}, en | zh |\n|---|---|---|")
    for name, table in figures.items():
        if answered := table.get("requests for a line answered by"):
            cells = [" / ".join(str(answered[lang][outcome]) for outcome in OUTCOMES) for lang in ("en", "zh")]
            print(f"| {name} | {' | '.join(cells)} |")
    for name, table in figures.items():
        if table["flagged"]:
            print(f"\n{name}, answered with the lines though they ask for none: {table['flagged']}")


if __name__ == "__main__":
    sys.exit(main())
