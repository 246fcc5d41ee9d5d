"""The web app: a Gradio chat UI, a `/chat` API and the OpenAI-compatible `/v1` API in front of
`chatbot.Assistant`.

    python app.py                       # embedded model + the app's knowledge base on http://127.0.0.1:7860
    python app.py --port 8000 --host 0.0.0.0 --model HuggingFaceTB/SmolLM2-360M-Instruct
    python app.py --index my-index      # answer from another knowledge base; --no-index: plain chat
    python app.py --milvus-uri ./kb.db  # answer from a Milvus knowledge base (Milvus Lite here; or a server URL)
    python app.py --share               # also a public gradio.live link (needs network)
    python app.py --model openai:http://gpu-box:8000/v1/MODEL   # generation by an OpenAI-compatible server

Models and the index are loaded once at start-up. On the first start the app's knowledge base
($CHATBOT_HOME/index) is built from the bundled documents (knowledge/corpus), so it answers out of the box.
The UI streams each answer with its sources, keeps the conversation per browser session, has a stop button,
and a "Knowledge base" tab to upload, list and remove documents. From code:

    from gradio_client import Client
    Client("http://127.0.0.1:7860/").predict("What does LoRA train?", [], api_name="/chat")

    from openai import OpenAI                                   # or any OpenAI client (chatbot/openai_api.py)
    OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused").chat.completions.create(...)
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app must work offline
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from chatbot.admission import Gate, Limits  # noqa: E402
from chatbot.assistant import Answer, Assistant, Turn, check_input  # noqa: E402
from chatbot.chat_format import message_text  # noqa: E402
from chatbot.config import ChatConfig  # noqa: E402
from chatbot.engine import PromptTooLongError  # noqa: E402
from chatbot.feedback import FeedbackLog  # noqa: E402
from chatbot.models import ModelNotFoundError  # noqa: E402
from chatbot.openai_api import add_routes  # noqa: E402
from common.cli import add_arguments, resolve, run  # noqa: E402
from knowledge.embedder import EmbedderNotFoundError  # noqa: E402
from knowledge.loaders import SUFFIXES  # noqa: E402
from knowledge.store import IndexError_, default_collection, default_index  # noqa: E402

EXAMPLES = [
    "What does LoRA train?",
    "How does early stopping prevent over-fitting?",
    "什么是检索增强生成？",
    "困惑度是怎么计算的？",
]
SOURCES_TITLE = "📚 Sources · 来源"
PUBLIC_REQUESTS_PER_MINUTE = 20  # per session on a public deployment: a person types far fewer
MAX_RATABLE = 100  # answers per session kept for 👍/👎; older ones can no longer be rated
LIMITS = Limits()  # each surface's share: 8 answered at once, 64 waiting, an API request waits at most 30 s


@dataclass(frozen=True)
class Access:
    """Who may change the shared knowledge base. Locally (127.0.0.1) everyone; on a deployment others can reach
    (a Space, or any other host) only admins: Hugging Face users in CHATBOT_ADMINS (user1,user2) signed in with
    OAuth on a Space, or whoever gives the secret CHATBOT_ADMIN_PASSWORD. With neither set there, nobody can."""
    public: bool = False
    password: str | None = None
    admins: frozenset[str] = frozenset()
    # Abuse limits (OWASP LLM10); the per-minute limit applies on public deployments by default (see main).
    requests_per_minute: int = 0  # per browser session or API client; 0 = no limit
    max_upload_files: int = 10
    max_upload_mb: float = 20.0

    @classmethod
    def from_environment(cls, host: str, requests_per_minute: int | None = None) -> Access:
        public = bool(os.environ.get("SPACE_ID")) or host not in ("127.0.0.1", "localhost", "::1")
        admins = frozenset(name.strip() for name in os.environ.get("CHATBOT_ADMINS", "").split(",") if name.strip())
        if requests_per_minute is None:
            requests_per_minute = PUBLIC_REQUESTS_PER_MINUTE if public else 0
        return cls(public, os.environ.get("CHATBOT_ADMIN_PASSWORD") or None, admins, requests_per_minute)


def model_history(messages: list[dict] | None) -> list[dict]:
    """The conversation as the model should see it: user and assistant text, without the sources boxes."""
    return [{"role": m["role"], "content": message_text(m["content"])} for m in messages or []
            if m.get("role") in ("user", "assistant") and not (m.get("metadata") or {}).get("title")]


def sources_markdown(answer: Answer) -> str:
    """The cited passages, numbered as in the answer, each with where it is from and the quoted text."""
    parts = []
    for source in answer.sources:
        quoted = "\n".join("> " + line for line in source["text"].splitlines() if line.strip())
        parts.append(f"**[{source['number']}] {source['label']}** · relevance {source['relevance']:.2f}\n\n{quoted}")
    return "\n\n".join(parts)


class ChatApp:
    """The UI's callbacks. Turns in progress are kept by browser session so that Stop ends the right one, and
    finished answers (with the prompt behind them) so that a like or dislike can be logged with its context."""

    def __init__(self, assistant: Assistant, feedback: FeedbackLog, access: Access = Access()):
        self.assistant, self.feedback_log, self.access = assistant, feedback, access
        self.signed_in: set[str] = set()  # sessions that gave the admin password
        self.recent: dict[str, deque[float]] = {}  # session → times of its latest requests
        self.running: dict[str, set[Turn]] = {}  # session → its turns being answered (Stop, a closed tab end them)
        self.lock = threading.Lock()  # `running` is changed from the server's worker threads
        self.answers: dict[str, dict[int, dict]] = {}  # session → chat message index → what was answered

    def _count_request(self, session: str | None) -> None:
        """Refuse a session's request beyond `requests_per_minute` in the last minute."""
        limit = self.access.requests_per_minute
        if not limit or session is None:
            return
        now = time.monotonic()
        if len(self.recent) > 1000:  # forget sessions quiet for a minute, so the record stays bounded
            self.recent = {key: times for key, times in self.recent.items() if times and now - times[-1] <= 60}
        recent = self.recent.setdefault(session, deque())
        while recent and now - recent[0] > 60:
            recent.popleft()
        if len(recent) >= limit:
            wait = int(60 - (now - recent[0])) + 1
            raise gr.Error(f"Too many messages: at most {limit} a minute. Try again in {wait} s · "
                           f"消息太频繁：每分钟最多 {limit} 条，请 {wait} 秒后再试")
        recent.append(now)

    def admit(self, client: str) -> str | None:
        """Why `client` (an API caller) may not send another request now, or None: the UI's rate limit."""
        try:
            self._count_request(client)
        except gr.Error as err:
            return err.message
        return None

    def _turn(self, message: str, history: list[dict] | None) -> Turn:
        try:
            # The history as sent is checked first: the API accepts whatever a client posts.
            check_input(history or [], message, self.assistant.config)
            return self.assistant.turn(model_history(history), message)
        except (ValueError, PromptTooLongError) as err:
            raise gr.Error(str(err)) from err

    def validate(self, message: str, messages: list[dict] | None) -> tuple[dict, dict]:
        """Run before `respond`, outside the queue: an over-long message is refused at once, even while another
        visitor's answer holds the model."""
        try:
            check_input(messages or [], message or " ", self.assistant.config)
        except ValueError as err:
            return gr.validate(False, str(err)), gr.validate(True, "")
        return gr.validate(True, ""), gr.validate(True, "")

    def respond(self, message: str, messages: list[dict] | None, request: gr.Request
                ) -> Iterator[tuple[str, list[dict]]]:
        """UI handler: stream the reply into the chat, then show its sources; clears the textbox."""
        if not message or not message.strip():
            yield "", messages or []
            return
        self._count_request(request.session_hash)
        turn = self._turn(message, messages)
        messages = [*(messages or []), {"role": "user", "content": message},
                    {"role": "assistant", "content": ""}]
        with self._answering(request.session_hash, turn):
            for piece in turn.stream():
                messages[-1]["content"] += piece
                yield "", messages
        answer = turn.answer()
        messages[-1]["content"] = answer.text
        answered = self.answers.setdefault(request.session_hash, {})
        answered[len(messages) - 1] = {"conversation": model_history(messages), "answer": answer.to_dict(),
                                       "prompt": turn.messages}
        if len(answered) > MAX_RATABLE:
            del answered[min(answered)]
        if answer.sources:
            messages.append({"role": "assistant", "content": sources_markdown(answer),
                             "metadata": {"title": f"{SOURCES_TITLE} ({len(answer.sources)})", "status": "done"}})
        yield "", messages

    def rate(self, comment: str, data: gr.LikeData, request: gr.Request) -> tuple[str, str]:
        """Log a like or dislike (the sources box counts for the answer above it); clears the comment box."""
        answered = self.answers.get(request.session_hash, {})
        index = data.index if isinstance(data.index, int) else data.index[0]
        record = answered.get(index) or answered.get(index - 1)
        if record is None or data.liked not in (True, False):
            return comment, "Rate one of the bot's answers · 请对机器人的回答评分"
        model = self.assistant.engine_for(record["answer"]["language"]).name  # whose prompt it was (--language-models)
        self.feedback_log.record(bool(data.liked), comment or "", record["conversation"], record["answer"], model,
                                 record["prompt"])
        return "", "Thanks for the feedback · 感谢反馈"

    def forget(self, request: gr.Request) -> None:
        """A new conversation, or the tab closed: stop the answer in progress and forget the old answers (the
        new conversation's message numbers start again from 0)."""
        self.stop(request)
        self.answers.pop(request.session_hash, None)

    def stop(self, request: gr.Request) -> None:
        with self.lock:
            turns = list(self.running.get(request.session_hash, ()))
        for turn in turns:
            turn.stop.set()

    @contextmanager
    def _answering(self, session: str | None, turn: Turn) -> Iterator[None]:
        """While `turn` streams it can be stopped by its session's Stop or by its tab closing; when the stream is
        closed early (Gradio closes it when the client disconnects) the turn stops, freeing the engine."""
        key = session or ""
        with self.lock:
            self.running.setdefault(key, set()).add(turn)
        try:
            yield
        finally:
            turn.stop.set()  # a no-op once the answer is complete
            with self.lock:
                turns = self.running.get(key, set())
                turns.discard(turn)
                if not turns:
                    self.running.pop(key, None)

    def load(self) -> dict:
        """The UI's share of the load, for /health: turns being answered (the waiting ones are in Gradio's queue)."""
        with self.lock:
            return {"running": sum(len(turns) for turns in self.running.values())}

    def chat(self, message: str, history: list[dict] | None = None, request: gr.Request = None) -> Iterator[dict]:
        """Answer `message` after the earlier `history` ([{"role", "content"}, ...]); streams partial answers.

        Each update is {"answer", "sources", "language", "mode", "timings", "query", "usage"}; the last one is
        complete, with the cited sources (source, heading, page, chunk_id, score, text)."""
        session = request.session_hash if request else None
        self._count_request(session)
        turn = self._turn(message, history)
        text = ""
        with self._answering(session, turn):
            for piece in turn.stream():
                text += piece
                yield Answer(text=text, language=turn.language, mode=turn.mode).to_dict()
        yield turn.answer().to_dict()

    # ----- knowledge base tab ------------------------------------------------------------------------------
    def sources_table(self) -> list[list]:
        retriever = self.assistant.retriever
        if retriever is None:
            return []
        retriever.sync()  # with what `python -m knowledge add` or another process committed meanwhile
        return [[source, meta["chunks"], meta["added"]] for source, meta in sorted(retriever.kb.sources.items())]

    def shown_sources(self) -> tuple[list, dict]:
        """The document list and the removal choices, as they are now (each time the page is opened)."""
        return self.sources_table(), self._choices()

    def is_admin(self, request: gr.Request, profile: gr.OAuthProfile | None = None) -> bool:
        if not self.access.public:
            return True
        signed_in = request is not None and request.session_hash in self.signed_in
        return signed_in or (profile is not None and profile.username in self.access.admins)

    def _require_admin(self, request: gr.Request, profile: gr.OAuthProfile | None) -> None:
        # Checked here, on the server, so a direct HTTP call that bypasses the page is refused too.
        if not self.is_admin(request, profile):
            raise gr.Error("Only an admin can change the shared knowledge base · 只有管理员可以修改共享知识库")

    def login(self, password: str, request: gr.Request) -> tuple[str, dict, dict, dict]:
        """The admin password (CHATBOT_ADMIN_PASSWORD) unlocks uploads and removals for this browser session."""
        if self.access.password and password and hmac.compare_digest(password, self.access.password):
            self.signed_in.add(request.session_hash)
            enabled = gr.update(interactive=True)
            return "Signed in as admin · 已以管理员身份登录", enabled, enabled, enabled
        return "Wrong password · 密码错误", gr.update(), gr.update(), gr.update()

    def upload(self, files: list[str] | None, request: gr.Request, profile: gr.OAuthProfile | None = None,
               progress: gr.Progress = gr.Progress()  # noqa: B008 (Gradio's idiom)
               ) -> tuple[str, list, dict]:
        self._require_admin(request, profile)
        retriever = self.assistant.retriever
        if retriever is None:
            raise gr.Error("This app runs without a knowledge base (--no-index).")
        if not files:
            raise gr.Error("Choose one or more files first.")
        self._check_upload(files)
        # Searches of other visitors go on meanwhile, on the state before the update; none sees half of it.
        report = retriever.kb.add([Path(f) for f in files], retriever.embedder, progress=False,
                                  on_progress=lambda fraction, text: progress(fraction, desc=text))
        return "\n".join(report.lines()), self.sources_table(), self._choices()

    def _check_upload(self, files: list[str]) -> None:
        """Count, type and size, checked on the server before any file is read (the page's checks can be skipped)."""
        limit = self.access.max_upload_files
        if len(files) > limit:
            raise gr.Error(f"At most {limit} files at a time · 每次最多上传 {limit} 个文件")
        for file in map(Path, files):
            if file.suffix.lower() not in SUFFIXES:
                raise gr.Error(f"{file.name}: not a supported type ({', '.join(sorted(SUFFIXES))}) · "
                               "不支持的文件类型")
            if file.stat().st_size > self.access.max_upload_mb * 2**20:
                raise gr.Error(f"{file.name} is larger than {self.access.max_upload_mb:g} MB · 文件超过大小上限")

    def remove(self, sources: list[str] | None, request: gr.Request, profile: gr.OAuthProfile | None = None
               ) -> tuple[str, list, dict]:
        self._require_admin(request, profile)
        retriever = self.assistant.retriever
        if retriever is None or not sources:
            raise gr.Error("Choose the documents to remove first.")
        removed = retriever.kb.remove(list(sources))
        return f"Removed {len(removed)} document(s).", self.sources_table(), self._choices()

    def _choices(self) -> dict:
        return gr.update(choices=[row[0] for row in self.sources_table()], value=[])


def on_gpu(function, max_new_tokens: int):
    """On a ZeroGPU Space (SPACES_ZERO_GPU is set) `function` runs with a GPU attached for about the time
    `max_new_tokens` need (@spaces.GPU; streaming generators are supported); anywhere else it is `function`."""
    if not os.environ.get("SPACES_ZERO_GPU"):
        return function
    import spaces

    return spaces.GPU(duration=10 + max_new_tokens // 20)(function)  # ~20 tokens/s at worst, plus set-up


def build_app(assistant: Assistant, feedback: FeedbackLog | None = None, access: Access = Access(),
              limits: Limits = LIMITS) -> gr.Blocks:
    """The UI, /chat and (at `launch`) the OpenAI-compatible API. Each surface has its own share, `limits`: the UI and
    /chat one queue in Gradio, the API one gate, so a flood on one cannot starve the other; both feed the same
    engine, which serves its requests in arrival order."""
    app = ChatApp(assistant, feedback or FeedbackLog(), access)
    respond, chat = (on_gpu(f, assistant.config.max_new_tokens) for f in (app.respond, app.chat))
    with gr.Blocks(title="Bilingual chatbot") as demo:
        index = assistant.retriever.kb.location if assistant.retriever else None
        if os.environ.get("SPACE_ID") and not os.environ.get("CHATBOT_HOME"):
            gr.Markdown("⚠️ This Space has no persistent storage set (`CHATBOT_HOME`): uploaded documents and "
                        "feedback are lost when it restarts · 未设置持久存储：重启后上传的文档和反馈会丢失。")
        gr.Markdown(f"## Bilingual chatbot · 双语聊天机器人\nModel {assistant.describe()} · "
                    + (f"knowledge base `{index}`" if index else "no knowledge base")
                    + ". Ask in English or Chinese; answers cite the documents they come from.")
        with gr.Tab("Chat · 聊天"):
            chatbot = gr.Chatbot(label="Chat", height=520, buttons=["copy"],
                                 placeholder="Ask a question · 请输入你的问题")
            with gr.Row():
                textbox = gr.Textbox(placeholder="Type a message and press Enter · 输入消息后按回车",
                                     show_label=False, scale=8, autofocus=True)
                send = gr.Button("Send", variant="primary", scale=1)
                stop = gr.Button("Stop", variant="stop", scale=1)
            with gr.Row():
                comment = gr.Textbox(show_label=False, scale=6, placeholder="Optional comment, then 👍 or 👎 "
                                     "on an answer · 可先写评论，再点赞或点踩")
                rated = gr.Markdown()
                clear = gr.ClearButton([chatbot, textbox], value="New conversation · 新对话", scale=2)
            gr.Examples(EXAMPLES, inputs=textbox, label="Examples · 示例")
        with gr.Tab("Knowledge base · 知识库", visible=index is not None):
            editable = not access.public
            if access.public:
                gr.Markdown("Visitors see the documents; only an admin can add or remove them · "
                            "访客可以查看文档，只有管理员可以添加或删除。")
                with gr.Row(visible=bool(access.password)):
                    password = gr.Textbox(type="password", show_label=False, scale=4,
                                          placeholder="Admin password · 管理员密码")
                    sign_in = gr.Button("Sign in · 登录", scale=1)
                if access.admins and os.environ.get("SPACE_ID"):
                    gr.LoginButton()
            files = gr.File(label="Upload documents · 上传文档", file_count="multiple",
                            file_types=sorted(SUFFIXES), interactive=editable)
            add = gr.Button("Add to the knowledge base · 加入知识库", variant="primary", interactive=editable)
            status = gr.Textbox(label="Status", interactive=False, lines=3)
            table = gr.Dataframe(app.sources_table(), headers=["source", "chunks", "added"], interactive=False)
            chosen = gr.Dropdown(choices=[row[0] for row in app.sources_table()], multiselect=True,
                                 label="Documents to remove · 要删除的文档")
            remove = gr.Button("Remove · 删除", variant="stop", interactive=editable)
            if access.public and access.password:
                sign_in.click(app.login, password, [status, files, add, remove], api_visibility="private",
                              queue=False)

        # Requests run side by side (limits.concurrency, shared by the page and /chat: one concurrency group): the
        # engine batches their answers or serves them in turn, and each search works on one committed state of the
        # index, so none sees half of an update. Answers that need no generation (quotes, refusals, errors) do not
        # wait behind another visitor's.
        for trigger in (textbox.submit, send.click):
            trigger(respond, [textbox, chatbot], [textbox, chatbot], api_visibility="private",
                    validator=app.validate, concurrency_id="chat")
        chatbot.like(app.rate, comment, [comment, rated], api_visibility="private", queue=False)
        stop.click(app.stop, None, None, queue=False, api_visibility="private")
        clear.click(app.forget, None, None, queue=False, api_visibility="private")
        add.click(app.upload, files, [status, table, chosen], api_visibility="private")
        remove.click(app.remove, chosen, [status, table, chosen], api_visibility="private")
        gr.api(chat, api_name="chat", concurrency_id="chat")
        demo.unload(app.forget)
        if index is not None:
            demo.load(app.shown_sources, None, [table, chosen], api_visibility="private", queue=False)
    # A bounded queue: past max_waiting waiting requests a visitor is told the app is busy instead of waiting
    # forever; a visitor who waits sees their place in the queue.
    demo.queue(default_concurrency_limit=limits.concurrency, max_size=limits.max_waiting)
    # The OpenAI-compatible API joins the server when it starts (`launch`), with a share of its own.
    gate = Gate(limits)

    def ui_load() -> dict:
        return app.load() | {"waiting": len(demo._queue)}  # Gradio's queue has no public count

    demo.add_openai_api = lambda server: add_routes(server, assistant, gate, app.admit, ui_load)
    return demo


def launch(demo: gr.Blocks, block: bool = True, **options) -> str:
    """Start the app's server with the OpenAI-compatible API (/v1) beside the UI; its URL. `block` waits until
    the server is stopped (Ctrl-C)."""
    server, url, _ = demo.launch(prevent_thread_lock=True, **options)
    demo.add_openai_api(server)
    if block:
        demo.block_thread()
    return url


def open_knowledge_base(config: ChatConfig, no_index: bool) -> None:
    """Point `config.index` at the app's knowledge base (`knowledge.store.default_index`) unless one is named, or
    fill the Milvus collection `config.milvus_uri` names from the bundled documents if it is empty."""
    if no_index:
        config.index = config.milvus_uri = None
    elif config.milvus_uri:
        default_collection(config.milvus_uri, config.milvus_collection, config.embedding_model)
    elif config.index is None:
        config.index = str(default_index(embedding_model=config.embedding_model))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # On a Hugging Face Space (SPACE_ID is set) the app must listen on every interface, port 7860.
    on_space = bool(os.environ.get("SPACE_ID"))
    parser.add_argument("--host", default=os.environ.get("CHATBOT_HOST", "0.0.0.0" if on_space else "127.0.0.1"),
                        help="address to listen on; 0.0.0.0 for every interface (env CHATBOT_HOST; 0.0.0.0 on a Space)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("CHATBOT_PORT", "7860")),
                        help="port to listen on (env CHATBOT_PORT)")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument("--no-index", action="store_true", help="chat without a knowledge base")
    parser.add_argument("--concurrency", type=int, default=LIMITS.concurrency,
                        help="requests answered at once, for the UI and for the API each")
    parser.add_argument("--max-waiting", type=int, default=LIMITS.max_waiting,
                        help="requests that may wait for a place, for the UI and for the API each; more are "
                             "refused at once (429)")
    parser.add_argument("--max-wait", type=float, default=LIMITS.max_wait,
                        help="seconds an API request may wait for a place before it is refused (503)")
    parser.add_argument("--requests-per-minute", type=int, default=None,
                        help=f"messages per browser session or API client per minute (default: "
                             f"{PUBLIC_REQUESTS_PER_MINUTE} on a Space or a non-loopback host, else no limit; "
                             "0 = none)")
    add_arguments(parser, ChatConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def serve() -> None:
        config = resolve(args, ChatConfig)
        open_knowledge_base(config, args.no_index)
        access = Access.from_environment(args.host, args.requests_per_minute)
        limits = Limits(args.concurrency, args.max_waiting, args.max_wait)
        demo = build_app(Assistant.load(config), access=access, limits=limits)
        launch(demo, server_name=args.host, server_port=args.port, share=args.share, footer_links=["api"],
               max_file_size=f"{access.max_upload_mb:g}mb")

    return run(serve, ModelNotFoundError, EmbedderNotFoundError, IndexError_, ValueError)


if __name__ == "__main__":
    sys.exit(main())
