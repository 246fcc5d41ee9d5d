"""Command line for knowledge bases.

    python -m knowledge build docs/ notes.md --index my-index     # a new index from files and folders
    python -m knowledge add more-docs/ --index my-index           # new and changed files; unchanged are skipped
    python -m knowledge remove notes.md --index my-index          # by the source name `list` shows
    python -m knowledge list --index my-index
    python -m knowledge stats --index my-index
    python -m knowledge search "什么是LoRA？" --index my-index --k 3 --json
    python -m knowledge compact --index my-index                  # rewrite the segments as one, without deleted rows
    python -m knowledge evaluate                                  # hit@1/hit@3/MRR on the bilingual question set
    python -m knowledge build docs/ --milvus-uri ./kb.db          # the same commands on Milvus (Lite, or a server)

--index defaults to the app's knowledge base ($CHATBOT_HOME/index), which the commands other than `build` first
build from the bundled documents if it does not exist yet (`knowledge.store.default_index`). With --milvus-uri the
knowledge base is the collection --milvus-collection there instead (`knowledge.milvus`). A file that cannot be
read is reported with its path and reason and skipped; the rest of the build goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from common.cli import add_arguments, resolve, run
from common.paths import index_dir
from knowledge.config import DENSE_LANGUAGES, KnowledgeConfig


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--index", type=Path, default=None, help="index folder (default: $CHATBOT_HOME/index)")
    common.add_argument("--milvus-uri", default=None,
                        help="a Milvus knowledge base instead: a path ending in .db (Milvus Lite) or http://host:19530")
    common.add_argument("--milvus-collection", default="knowledge", help="its collection (default: knowledge)")
    add_arguments(common, KnowledgeConfig)
    common.add_argument("--dense-languages", default=DENSE_LANGUAGES,
                        help="comma-separated query languages the embedder handles, for search and evaluate ('*' = "
                             "all; default auto: the embedder's own: all for the default bilingual and "
                             "multilingual-e5-small, en for all-MiniLM-L6-v2)")
    parser = argparse.ArgumentParser(prog="python -m knowledge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("build", "a new index from files and folders"), ("add", "add new and changed files")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("paths", nargs="+", type=Path, help="files and folders")
    sub.add_parser("remove", parents=[common], help="remove sources").add_argument("sources", nargs="+")
    sub.add_parser("compact", parents=[common], help="rewrite the segments as one, without deleted rows")
    for name, text in (("list", "the indexed sources"), ("stats", "index statistics")):
        sub.add_parser(name, parents=[common], help=text).add_argument("--json", action="store_true")
    search = sub.add_parser("search", parents=[common], help="search the index")
    search.add_argument("query")
    search.add_argument("--k", type=int, default=5, help="number of hits")
    search.add_argument("--mode", choices=("fused", "dense", "lexical"), default="fused")
    search.add_argument("--json", action="store_true", help="print a JSON list of hits")
    evaluate = sub.add_parser("evaluate", parents=[common], help="retrieval quality on a question set")
    evaluate.add_argument("--questions", type=Path, default=None, help="JSONL: question, language, source, key_phrase")
    evaluate.add_argument("--out-of-scope", type=Path, default=None, help="JSONL of questions nothing answers")
    evaluate.add_argument("--corpus", type=Path, default=None,
                          help="documents to index for the evaluation (default: the bundled ones) into a temporary "
                               "index, or the Milvus collection COLLECTION_evaluation, deleted afterwards")
    evaluate.add_argument("--existing", action="store_true",
                          help="evaluate the knowledge base --index or --milvus-uri names as it is instead")
    evaluate.add_argument("--json", action="store_true")
    return parser


def store(args: argparse.Namespace, config: KnowledgeConfig, folder: Path | None, create: bool = False,
          fresh: bool = False):
    from knowledge.store import open_store

    return open_store(folder, args.milvus_uri, args.milvus_collection, config, create=create, fresh=fresh)


def cmd_build_or_add(args: argparse.Namespace, config: KnowledgeConfig, folder: Path | None) -> int:
    from knowledge.embedder import Embedder

    fresh = args.command == "build"
    kb = store(args, config, folder, create=True, fresh=fresh)
    # Adding to an index goes on with the embedder that filled it (one built with MiniLM before the default was
    # `bilingual` keeps MiniLM); a new one takes the command line's.
    embedder = Embedder.for_config(config) if fresh or not len(kb) else Embedder.for_index(kb.config,
                                                                                           kb.embedder_name)
    report = kb.add(args.paths, embedder)
    for line in report.lines():
        print(line, file=sys.stderr if line.startswith("skipped") else sys.stdout)
    return 0 if report.chunks or not report.skipped else 1


def cmd_search(args: argparse.Namespace, config: KnowledgeConfig, folder: Path) -> int:
    from knowledge.embedder import Embedder
    from knowledge.retriever import Retriever

    kb = store(args, config, folder)
    retriever = Retriever(kb, Embedder.for_index(kb.config, kb.embedder_name), args.dense_languages)
    hits = retriever.search(args.query, k=args.k, mode=args.mode)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=1))
    for rank, hit in enumerate(hits if not args.json else [], 1):
        print(f"{rank}. [{hit.score:.3f}] {hit.chunk.label}\n   {hit.chunk.text[:200]}")
    return 0


def cmd_evaluate(args: argparse.Namespace, config: KnowledgeConfig, folder: Path | None) -> int:
    from knowledge import evaluate as ev
    from knowledge.embedder import Embedder
    from knowledge.retriever import Retriever
    from knowledge.store import BUNDLED_CORPUS

    with tempfile.TemporaryDirectory() as scratch:
        scratch_store = not args.existing and folder is None
        if scratch_store:  # the corpus, indexed for this evaluation only
            args.milvus_collection += "_evaluation"
            kb = store(args, config, Path(scratch), fresh=True)
            embedder = Embedder.for_config(config)
            kb.add([args.corpus or BUNDLED_CORPUS], embedder)
        else:
            kb = store(args, config, folder)
            embedder = Embedder.for_index(kb.config, kb.embedder_name)
        retriever = Retriever(kb, embedder, args.dense_languages)
        questions = ev.read_jsonl(args.questions or ev.QUESTIONS)
        table = ev.retrieval_table(retriever, questions)
        outside = ev.read_jsonl(args.out_of_scope or ev.OUT_OF_SCOPE)
        thresholds = ev.threshold_table(retriever, questions, outside, (0.2, 0.3, 0.35, 0.4, 0.5))
        if scratch_store and args.milvus_uri:
            kb.drop()
    if args.json:
        print(json.dumps({"retrieval": [{"mode": m, "language": lang} | dataclasses.asdict(s)
                                        for (m, lang), s in table.items()],
                          "relevance_thresholds": thresholds}, indent=1))
        return 0
    print(ev.markdown(table))
    print("\n| relevance threshold | answerable questions answered | out-of-scope questions declined |")
    print("|---|---|---|")
    for row in thresholds:
        print(f"| {row['threshold']:.2f} | {row['answered']:.2f} | {row['rejected']:.2f} |")
    return 0


def cmd_list_or_stats(args: argparse.Namespace, config: KnowledgeConfig, folder: Path | None) -> int:
    kb = store(args, config, folder)
    data = kb.stats() if args.command == "stats" else [{"source": s} | meta for s, meta in sorted(kb.sources.items())]
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=1))
    elif args.command == "stats":
        for key, value in data.items():
            print(f"{key}: {value}")
    else:
        for row in data:
            print(f"{row['source']}\t{row['chunks']} chunks\t{row['added']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from knowledge.embedder import EmbedderNotFoundError
    from knowledge.store import IndexError_

    args = build_parser().parse_args(argv)
    return run(lambda: command(args), EmbedderNotFoundError, IndexError_, FileNotFoundError, ValueError)


def command(args: argparse.Namespace) -> int:
    from knowledge.store import default_index

    config = resolve(args, KnowledgeConfig)
    folder = args.index.expanduser() if args.index else None
    if args.command == "evaluate":
        return cmd_evaluate(args, config, folder)
    if args.command == "build":
        return cmd_build_or_add(args, config, folder or index_dir())
    if not args.milvus_uri:
        folder = folder or default_index(embedding_model=config.embedding_model)
    if args.command == "add":
        return cmd_build_or_add(args, config, folder)
    if args.command == "compact":
        kb = store(args, config, folder)
        if not hasattr(kb, "compact"):
            raise ValueError("Milvus compacts its segments itself; `compact` is for the embedded store")
        kb.compact()
        print(f"compacted: {len(kb)} chunks in {len(kb.state.segments)} segment(s)")
        return 0
    if args.command == "remove":
        removed = store(args, config, folder).remove(args.sources)
        missing = sorted(set(args.sources) - set(removed))
        print(f"removed {len(removed)} source(s)")
        if missing:
            print(f"not in the index: {', '.join(missing)}", file=sys.stderr)
        return 0 if not missing else 1
    if args.command == "search":
        return cmd_search(args, config, folder)
    return cmd_list_or_stats(args, config, folder)


if __name__ == "__main__":
    sys.exit(main())
