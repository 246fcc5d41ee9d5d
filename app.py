"""The web app: a Gradio chat UI and a `/chat` API in front of `chatbot.Assistant`.

    python app.py                       # the embedded default model on http://127.0.0.1:7860
    python app.py --port 8000 --host 0.0.0.0 --model HuggingFaceTB/SmolLM2-360M-Instruct
    python app.py --share               # also a public gradio.live link (needs network)

The model is loaded once at start-up. The UI streams each answer, keeps the conversation per browser session
and has a stop button; the same turn logic is callable from code:

    from gradio_client import Client
    Client("http://127.0.0.1:7860/").predict("What is the capital of France?", [], api_name="/chat")
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app must work offline
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from chatbot.assistant import Assistant, Turn  # noqa: E402
from chatbot.chat_format import message_text  # noqa: E402
from chatbot.config import ChatConfig, add_config_arguments, config_from_args  # noqa: E402
from chatbot.engine import Engine, PromptTooLongError  # noqa: E402
from chatbot.models import ModelNotFoundError  # noqa: E402

EXAMPLES = [
    "What is the capital of France?",
    "What does LoRA change in a model during fine-tuning?",
    "什么是检索增强生成？",
    "如何防止模型过拟合？",
]


def model_history(messages: list[dict] | None) -> list[dict]:
    """The conversation as the model should see it: user and assistant text, without the sources boxes."""
    return [{"role": m["role"], "content": message_text(m["content"])} for m in messages or []
            if m.get("role") in ("user", "assistant") and not (m.get("metadata") or {}).get("title")]


class ChatApp:
    """The UI's callbacks. Turns in progress are kept by browser session so that Stop ends the right one."""

    def __init__(self, assistant: Assistant):
        self.assistant = assistant
        self.running: dict[str, Turn] = {}

    def start_turn(self, message: str, messages: list[dict] | None, session: str) -> Turn:
        turn = self.assistant.turn(model_history(messages), message)
        self.running[session] = turn
        return turn

    def respond(self, message: str, messages: list[dict] | None, request: gr.Request
                ) -> Iterator[tuple[str, list[dict]]]:
        """UI handler: stream the reply into the chat, clearing the textbox."""
        if not message or not message.strip():
            yield "", messages or []
            return
        messages = [*(messages or []), {"role": "user", "content": message}]
        try:
            turn = self.start_turn(message, messages[:-1], request.session_hash)
        except (ValueError, PromptTooLongError) as err:
            raise gr.Error(str(err)) from err
        reply = {"role": "assistant", "content": ""}
        messages.append(reply)
        try:
            for piece in turn.stream():
                reply["content"] += piece
                yield "", messages
        finally:
            self.running.pop(request.session_hash, None)
        reply["content"] = turn.answer().text or reply["content"]
        yield "", messages

    def stop(self, request: gr.Request) -> None:
        turn = self.running.get(request.session_hash)
        if turn is not None:
            turn.stop.set()

    def chat(self, message: str, history: list[dict] | None = None) -> Iterator[dict]:
        """Answer `message` after the earlier `history` ([{"role", "content"}, ...]); streams partial answers.

        Each update is {"answer", "sources", "language", "timings"}; the last one is complete."""
        try:
            turn = self.assistant.turn(model_history(history), message)
        except (ValueError, PromptTooLongError) as err:
            raise gr.Error(str(err)) from err
        text = ""
        for piece in turn.stream():
            text += piece
            yield {"answer": text, "sources": [], "language": turn.language, "timings": {}}
        yield turn.answer().to_dict()


def build_app(assistant: Assistant) -> gr.Blocks:
    app = ChatApp(assistant)
    with gr.Blocks(title="Bilingual chatbot") as demo:
        gr.Markdown(f"## Bilingual chatbot · 双语聊天机器人\nModel: `{assistant.engine.name}`. "
                    "Ask in English or Chinese; the bot answers in your language.")
        chatbot = gr.Chatbot(label="Chat", height=520, buttons=["copy"],
                             placeholder="Ask a question · 请输入你的问题")
        with gr.Row():
            textbox = gr.Textbox(placeholder="Type a message and press Enter · 输入消息后按回车",
                                 show_label=False, scale=8, autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1)
            stop = gr.Button("Stop", variant="stop", scale=1)
        clear = gr.ClearButton([chatbot, textbox], value="New conversation")
        gr.Examples(EXAMPLES, inputs=textbox, label="Examples · 示例")

        for trigger in (textbox.submit, send.click):
            trigger(app.respond, [textbox, chatbot], [textbox, chatbot], api_visibility="private")
        stop.click(app.stop, None, None, queue=False, api_visibility="private")
        clear.click(app.stop, None, None, queue=False, api_visibility="private")
        gr.api(app.chat, api_name="chat")
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get("CHATBOT_HOST", "127.0.0.1"),
                        help="address to listen on; 0.0.0.0 for every interface (env CHATBOT_HOST)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("CHATBOT_PORT", "7860")),
                        help="port to listen on (env CHATBOT_PORT)")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    add_config_arguments(parser, ChatConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args, ChatConfig)
        engine = Engine.load(config.model, device=config.device, context_tokens=config.context_tokens)
    except (ModelNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    demo = build_app(Assistant(engine, config))
    demo.queue(default_concurrency_limit=1)  # one generation at a time: a small CPU has no room for two
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, footer_links=["api"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
