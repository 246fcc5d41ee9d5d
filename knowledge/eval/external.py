"""Evaluation corpora the project did not write, materialised from what is installed on the machine (their text
is never copied into the repository):

- `pydoc`: the 79 language-reference topics Python ships in `pydoc_data.topics` (the text behind `help("with")`),
  one `<topic>.txt` file each; questions in `knowledge/eval/pydoc_questions.jsonl` (written for this project).
- `rust-zh`: the Chinese translation of *Rust by Example* that rustup installs with the Rust documentation
  (`~/.rustup/toolchains/*/share/doc/rust/html/rust-by-example/zh`), its 197 chapter pages as HTML (the one-page
  `print.html` and the table of contents left out); questions in `knowledge/eval/rust_zh_questions.jsonl` (written
  for this project, each with a short phrase of the passage that answers it).
- `man-zh`: the Chinese manual pages Debian installs with man-db and passwd (`/usr/share/man/zh_CN`: man, apropos,
  mandb, passwd, shadow...), rendered by `man` to Markdown-like text, 47 pages; questions in
  `knowledge/eval/man_zh_questions.jsonl` (written for this project after every change to retrieval was made, and
  measured once).
- `cargo`: the Cargo Book that rustup installs with the Rust documentation (`share/doc/rust/html/cargo`), its
  chapter pages as HTML (the one-page `print.html`, the table of contents and the changelog left out); questions in
  `knowledge/eval/cargo_questions.jsonl` (written for this project from the user's side: paraphrases, "how do I…").
- `vim-zh`: the Chinese Vim tutor and GnuPG's Chinese help, installed here by Debian's vim and gnupg packages
  (`tutor.zh_cn.txt`, `gnupg-help.zh_CN.txt`); questions in `knowledge/eval/vimtutor_zh_questions.jsonl` (written
  for this project the same way).

    python -m knowledge.eval.external pydoc /tmp/pydoc-corpus
    python -m knowledge evaluate --corpus /tmp/pydoc-corpus --questions knowledge/eval/pydoc_questions.jsonl
    python -m knowledge.eval.external rust-zh /tmp/rust-zh-corpus
    python -m knowledge evaluate --corpus /tmp/rust-zh-corpus --questions knowledge/eval/rust_zh_questions.jsonl
    python -m knowledge.eval.external man-zh /tmp/man-zh-corpus
    python -m knowledge evaluate --corpus /tmp/man-zh-corpus --questions knowledge/eval/man_zh_questions.jsonl
    python -m knowledge.eval.external cargo /tmp/cargo-corpus
    python -m knowledge evaluate --corpus /tmp/cargo-corpus --questions knowledge/eval/cargo_questions.jsonl
    python -m knowledge.eval.external vim-zh /tmp/vim-zh-corpus
    python -m knowledge evaluate --corpus /tmp/vim-zh-corpus --questions knowledge/eval/vimtutor_zh_questions.jsonl
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PYDOC_QUESTIONS = Path(__file__).resolve().parent / "pydoc_questions.jsonl"
RUST_ZH_QUESTIONS = Path(__file__).resolve().parent / "rust_zh_questions.jsonl"
RUST_BY_EXAMPLE = "share/doc/rust/html/rust-by-example/zh"
CARGO_BOOK = "share/doc/rust/html/cargo"
CARGO_QUESTIONS = Path(__file__).resolve().parent / "cargo_questions.jsonl"
VIM_ZH = {"tutor.zh_cn.txt": "/usr/share/vim/vim90/tutor/tutor.zh_cn.utf-8",
          "gnupg-help.zh_CN.txt": "/usr/share/gnupg/help.zh_CN.txt"}
VIM_ZH_QUESTIONS = Path(__file__).resolve().parent / "vimtutor_zh_questions.jsonl"
MAN_ZH = "/usr/share/man/zh_CN"
MAN_ZH_QUESTIONS = Path(__file__).resolve().parent / "man_zh_questions.jsonl"


def write_pydoc(folder: Path) -> Path:
    """Write Python's pydoc topics into `folder` as text files; returns the folder."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in topics.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def rust_docs(book: str) -> Path | None:
    """An installed book of the Rust documentation (rustup's rust-docs component), if there is one."""
    found = sorted(Path("~/.rustup/toolchains").expanduser().glob(f"*/{book}"))
    return found[0] if found else None


def copy_book(book: str, folder: Path, leave_out: tuple[str, ...] = ("print.html", "toc.html")) -> Path:
    """Copy the chapter pages of an installed Rust documentation book into `folder`, keeping their paths."""
    found = rust_docs(book)
    if found is None:
        raise FileNotFoundError(f"no ~/.rustup/toolchains/*/{book} on this machine (install the Rust "
                                "documentation with `rustup component add rust-docs`)")
    for page in found.rglob("*.html"):
        if page.name not in leave_out:
            target = folder / page.relative_to(found)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(page, target)
    return folder


def write_rust_zh(folder: Path) -> Path:
    """The chapter pages of the Chinese Rust by Example; returns `folder`."""
    return copy_book(RUST_BY_EXAMPLE, folder)


def write_cargo(folder: Path) -> Path:
    """The chapter pages of the Cargo Book (no changelog, no 404 page); returns `folder`."""
    return copy_book(CARGO_BOOK, folder, ("print.html", "toc.html", "CHANGELOG.html", "404.html"))


def write_vim_zh(folder: Path) -> Path:
    """The Chinese Vim tutor and GnuPG's Chinese help as text files; returns `folder`."""
    for name, path in VIM_ZH.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"no {path} on this machine (Debian installs it with vim and gnupg)")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(Path(path).read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def write_man_zh(folder: Path) -> Path:
    """The Chinese manual pages installed here (man-db's and shadow's, /usr/share/man/zh_CN), rendered by `man` to
    text, one `<section>/<name>.md` each: the page's sections (名称, 描述, 选项, ...) become headings."""
    pages = sorted(Path(MAN_ZH).glob("man*/*.gz"))
    if not pages or shutil.which("man") is None:
        raise FileNotFoundError(f"no Chinese manual pages in {MAN_ZH} (Debian installs them with man-db and passwd), "
                                "or no `man` to render them")
    for page in pages:  # one line per paragraph (a wide page), neither justified nor hyphenated
        command = ["man", "-l", "--nj", "--nh", "--encoding=UTF-8", str(page)]
        rendered = subprocess.run(command, capture_output=True, check=True,
                                  env={**os.environ, "MANWIDTH": "1000", "MAN_KEEP_FORMATTING": ""}).stdout
        lines = re.sub(r".\x08", "", rendered.decode("utf-8", "replace")).splitlines()[1:-1]  # no header, footer
        name = page.name.removesuffix(".gz")
        text = "\n".join(f"## {line.strip()}" if line.strip() and not line[0].isspace() else line for line in lines)
        target = folder / page.parent.name / f"{name.rsplit('.', 1)[0]}.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"# {name}\n\n{text}\n", encoding="utf-8")
    return folder


CORPORA = {"pydoc": write_pydoc, "rust-zh": write_rust_zh, "man-zh": write_man_zh, "cargo": write_cargo,
           "vim-zh": write_vim_zh}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in CORPORA:
        print(f"usage: python -m knowledge.eval.external {{{','.join(CORPORA)}}} FOLDER", file=sys.stderr)
        return 2
    try:
        print(CORPORA[argv[0]](Path(argv[1])))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
