"""Command line: `python -m finetune {train,evaluate,export} ...`; each command's --help lists its flags.

    python -m finetune train --config finetune/configs/sample.yaml --max-steps 20
    python -m finetune evaluate --model runs/sample --data runs/sample/eval.jsonl --limit 20
    python -m finetune export runs/sample --merge --output runs/sample-merged

Errors about settings, data or models are one line on stderr with exit status 2, without a traceback.
"""

from __future__ import annotations

import sys

COMMANDS = ("train", "evaluate", "export")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}" if argv else "no command"
        print(f"error: {given}; use one of {', '.join(COMMANDS)} (python -m finetune --help)", file=sys.stderr)
        return 2
    # Imported on demand: each command pulls in torch and transformers, and --help should stay quick.
    if argv[0] == "train":
        from finetune.train import main as command
    elif argv[0] == "evaluate":
        from finetune.evaluate import main as command
    else:
        from finetune.export import main as command
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
