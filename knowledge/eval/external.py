"""Evaluation corpora the project did not write, materialised from what is installed on the machine (their text
is never copied into the repository):

- `pydoc`: the 79 language-reference topics Python ships in `pydoc_data.topics` (the text behind `help("with")`),
  one `<topic>.txt` file each; questions in `knowledge/eval/pydoc_questions.jsonl` (written for this project).

    python -m knowledge.eval.external pydoc /tmp/pydoc-corpus
    python -m knowledge evaluate --corpus /tmp/pydoc-corpus --questions knowledge/eval/pydoc_questions.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

PYDOC_QUESTIONS = Path(__file__).resolve().parent / "pydoc_questions.jsonl"


def write_pydoc(folder: Path) -> Path:
    """Write Python's pydoc topics into `folder` as text files; returns the folder."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in topics.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "pydoc":
        print("usage: python -m knowledge.eval.external pydoc FOLDER", file=sys.stderr)
        return 2
    print(write_pydoc(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
