"""Command line: a terminal chat, or one question answered and printed (optionally as JSON).

    python -m chatbot                                   # chat in the terminal (Ctrl-D or /exit to quit)
    python -m chatbot ask "What is the capital of France?" --json
    python -m chatbot ask "What does LoRA train?" --index my-index --json   # answered from documents, cited
    python -m chatbot ask "..." --model HuggingFaceTB/SmolLM2-360M-Instruct --temperature 0.7
    python -m chatbot ask "..." --backend transformers          # PyTorch instead of the compiled CPU backend
    python -m chatbot --model openai:http://127.0.0.1:8000/v1  # a model behind an OpenAI-compatible server

Every ChatConfig field is a flag (`--max-new-tokens`, `--seed`, ...). Errors about models or input are printed
as one line on stderr with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from chatbot.assistant import Assistant, Turn
from chatbot.config import ChatConfig
from chatbot.engine import PromptTooLongError
from chatbot.models import ModelNotFoundError
from common.cli import add_arguments, resolve, run
from knowledge.embedder import EmbedderNotFoundError
from knowledge.store import IndexError_


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_arguments(common, ChatConfig)
    parser = argparse.ArgumentParser(prog="python -m chatbot",
                                     description="Bilingual chatbot: terminal chat or one-shot answers.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("chat", parents=[common], help="chat in the terminal (the default)")
    ask = sub.add_parser("ask", parents=[common], help="answer one question and exit")
    ask.add_argument("question", help="the question")
    ask.add_argument("--json", action="store_true", help="print one JSON object: answer, sources, language, timings")
    return parser


def ask(assistant: Assistant, question: str, as_json: bool) -> None:
    turn = assistant.turn([], question)
    if as_json:
        for _ in turn.stream():
            pass
        engine = assistant.engine_for(turn.language)  # the model for the question's language (--language-models)
        result = turn.answer().to_dict() | {"model": engine.name, "backend": engine.backend}
        print(json.dumps(result, ensure_ascii=False))
        return
    show(turn)


def show(turn: Turn) -> None:
    """Stream the answer to the terminal, then its final form (when citations changed it) and sources."""
    streamed = "".join(print(piece, end="", flush=True) or piece for piece in turn.stream()).strip()
    answer = turn.answer()
    if answer.text != streamed:
        print(f"\n\n{answer.text}" if streamed else answer.text, end="")
    print()
    for source in answer.sources:
        print(f"  [{source['number']}] {source['label']}  (score {source['score']:.3f})")


def chat(assistant: Assistant) -> None:
    print(f"Chatting with {assistant.describe()}. Type /exit or press Ctrl-D to quit, /reset to start over.")
    history: list[dict] = []
    while True:
        try:
            question = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if question in ("/exit", "/quit"):
            return
        if question == "/reset":
            history = []
            continue
        if not question:
            continue
        turn = assistant.turn(history, question)
        print("bot> ", end="", flush=True)
        try:
            show(turn)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            turn.stop.set()
            print()
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": turn.answer().text}]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("ask", "chat", "-h", "--help"):
        argv = ["chat", *argv]  # chatting is the default command
    args = build_parser().parse_args(argv)

    def action() -> None:
        config = resolve(args, ChatConfig)
        if args.command == "ask" and not args.question.strip():
            raise ValueError("The question is empty.")
        assistant = Assistant.load(config)
        if args.command == "ask":
            ask(assistant, args.question, args.json)
        else:
            chat(assistant)

    return run(action, ModelNotFoundError, EmbedderNotFoundError, IndexError_, PromptTooLongError, ValueError)


if __name__ == "__main__":
    sys.exit(main())
