"""The OpenAI-compatible API on the app's own server: `GET /v1/models` and `POST /v1/chat/completions`.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused")   # or CHATBOT_API_KEY's value
    for chunk in client.chat.completions.create(model=client.models.list().data[0].id, stream=True,
                                                messages=[{"role": "user", "content": "What does LoRA train?"}]):
        ...

Each request is a whole turn of the assistant (language, safety, routing, retrieval, citations), not bare
generation: the last message is the question, earlier user and assistant messages the history, and a system
message replaces the default system prompt. The cited passages come as an extra `sources` field on the response
(and on the final chunk of a stream), with `mode` saying where the answer comes from ("grounded", "chat", ...).
A streamed answer whose final form differs from the streamed text (citations completed, or quotes instead of an
answer that cited nothing) carries that final text in an extra `answer` field of the final chunk.

API requests have their own share of the server (chatbot.admission.Limits): at most `concurrency` turns at once
and `max_waiting` waiting, without holding a server thread; more get 429 at once, and one that waited `max_wait`
seconds gets 503, both with Retry-After. A client that hangs up, waiting or streaming, frees its place and stops
its generation. The per-client rate limit is the UI's, and the engine serves UI and API sessions in one queue or
batch. `GET /health` (or /v1/health) reports readiness and the running and waiting counts. Errors come in
OpenAI's shape, {"error": {"message", "type", "param", "code"}}. When CHATBOT_API_KEY is set, every request
(but /health) needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from chatbot.admission import Busy, Gate, Gone, TimedOut, Work, disconnected
from chatbot.assistant import Assistant, Turn
from chatbot.chat_format import message_text
from chatbot.engine import PromptTooLongError
from chatbot.prompts import question_of

API_KEY_ENV = "CHATBOT_API_KEY"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse({"error": self.body()}, status_code=self.status, headers=headers)

    def body(self) -> dict:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}


def _number(body: dict, names: tuple[str, ...], kind: type, default):
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
            raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}.", param=name)
        return kind(value)
    return default


def parse_request(body: object, assistant: Assistant, served: str) -> tuple[Assistant, list[dict], str, dict]:
    """(the assistant for this request, history, question, stream settings), or ApiError for a bad request."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if body.get("model") != served:
        raise ApiError(404, f"The model '{body.get('model')}' does not exist; this server serves '{served}'.",
                       param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages")
    system, history = None, []
    for number, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{number}]: the role must be system, user or assistant.", param="messages")
        text = message_text(message.get("content"))
        if role in ("system", "developer"):
            system = text if system is None else f"{system}\n\n{text}"
        else:
            history.append({"role": role, "content": text})
    if not history or history[-1]["role"] != "user":
        raise ApiError(400, "The last message must come from the user.", param="messages")
    if _number(body, ("n",), int, 1) != 1:
        raise ApiError(400, "Only n=1 is supported.", param="n")
    if body.get("stop"):
        raise ApiError(400, "'stop' is not supported.", param="stop")
    if body.get("tools"):
        raise ApiError(400, "'tools' are not supported.", param="tools")
    changes = {"max_new_tokens": _number(body, ("max_completion_tokens", "max_tokens"), int,
                                         assistant.config.max_new_tokens),
               "temperature": _number(body, ("temperature",), float, assistant.config.temperature),
               "top_p": _number(body, ("top_p",), float, assistant.config.top_p),
               "seed": _number(body, ("seed",), int, assistant.config.seed)}
    if system is not None:
        changes["system_prompt"] = system
    if not 0 <= changes["temperature"] <= 2:
        raise ApiError(400, "'temperature' must be between 0 and 2.", param="temperature")
    try:
        chosen = assistant.variant(**changes)
    except ValueError as err:
        raise ApiError(400, str(err), param="max_tokens" if "max_new_tokens" in str(err) else None) from err
    options = body.get("stream_options") or {}
    stream = {"stream": bool(body.get("stream")), "usage": isinstance(options, dict) and
              bool(options.get("include_usage"))}
    # An instance of this app using this one as its model adds a reply-language line; the turn adds its own.
    return chosen, history[:-1], question_of(history[-1]["content"]), stream


def _finish_reason(turn: Turn, max_new_tokens: int) -> str:
    return "length" if turn.usage.completion_tokens >= max_new_tokens else "stop"


def _usage(turn: Turn) -> dict:
    prompt, completion = turn.usage.prompt_tokens, turn.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}



def add_routes(app: FastAPI, assistant: Assistant, gate: Gate, admit: Callable[[str], str | None],
               ui_load: Callable[[], dict] | None = None) -> None:
    """Add /v1/models, /v1/chat/completions and /health to `app` (the Gradio app's FastAPI server). `admit(client)`
    returns why a client may not send another request now (the rate limit), or None; `ui_load()` the UI's running
    and waiting counts, for /health."""
    created = int(time.time())
    served = assistant.engine.name
    limits = gate.limits

    def check_key(request: Request) -> None:
        key = os.environ.get(API_KEY_ENV)
        given = request.headers.get("authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def models(request: Request) -> JSONResponse:
        try:
            check_key(request)
        except ApiError as err:
            return err.response()
        # One model id, the app's; "languages" says which model answers which language (--language-models).
        return JSONResponse({"object": "list", "data": [{"id": served, "object": "model", "created": created,
                                                         "owned_by": "bilingual-chatbot",
                                                         "languages": assistant.models}]})

    async def health(request: Request) -> JSONResponse:
        """Readiness and load, for Spaces and load balancers (no key needed: it tells nothing about the data)."""
        api = {"running": gate.running, "waiting": gate.waiting, "concurrency": limits.concurrency,
               "max_waiting": limits.max_waiting}
        return JSONResponse({"status": "ok", "model": served, "models": assistant.models, "api": api}
                            | ({"ui": ui_load()} if ui_load else {}))

    async def admitted(chosen: Assistant, history: list[dict], question: str, gone: asyncio.Future
                       ) -> tuple[Work, AsyncIterator, Turn]:
        """A place at the gate, then the turn made in its own thread; ApiError when either fails."""
        try:
            await gate.enter(gone)
        except Busy as err:
            raise ApiError(429, "The server is busy; try again in a few seconds.", "server_error",
                           code="server_busy", retry_after=limits.retry_after) from err
        except TimedOut as err:
            raise ApiError(503, f"The server stayed busy for {limits.max_wait:g} s; try again shortly.",
                           "server_error", code="queue_timeout", retry_after=limits.retry_after) from err
        except Gone as err:
            raise ApiError(499, "The client closed the request.", code="client_closed") from err
        work = Work(gate, lambda: chosen.turn(history, question))
        work.start()
        items = work.items()
        kind, value = await anext(items)
        if kind == "error":
            if isinstance(value, ValueError):  # InputError, PromptTooLongError: the request's fault
                raise ApiError(400, str(value), param="messages",
                               code="context_length_exceeded" if isinstance(value, PromptTooLongError) else None)
            raise ApiError(500, f"The model failed: {value}", "server_error")
        return work, items, value

    async def completions(request: Request):
        gone = None
        try:
            check_key(request)
            try:
                body = await request.json()
            except ValueError as err:
                raise ApiError(400, "The request body is not valid JSON.") from err
            chosen, history, question, stream = parse_request(body, assistant, served)
            # Per caller, as the UI limits per browser session: behind a proxy (a Space) the address the proxy saw,
            # the last one forwarded (a caller can only prepend others), else the peer; not the key, which every
            # caller of a deployment shares.
            forwarded = request.headers.get("x-forwarded-for", "").split(",")[-1].strip()
            client = forwarded or (request.client.host if request.client else "?")
            if (refusal := admit(f"api:{client}")) is not None:
                raise ApiError(429, refusal, "rate_limit_error", code="rate_limit_exceeded")
            gone = asyncio.ensure_future(disconnected(request.receive))
            work, items, turn = await admitted(chosen, history, question, gone)
        except ApiError as err:
            if gone is not None:
                gone.cancel()
            return err.response()
        ident, limit = f"chatcmpl-{uuid.uuid4().hex}", chosen.config.max_new_tokens
        if stream["stream"]:
            gone.cancel()  # from here the streaming response watches for the client leaving
            return StreamingResponse(_events(work, items, turn, ident, created, served, limit, stream["usage"]),
                                     media_type="text/event-stream")
        finished = asyncio.ensure_future(_last(items))
        try:
            await asyncio.wait([finished, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not finished.done():  # the client left (or the server is stopping): stop generating
                work.cancel()
                finished.cancel()
            gone.cancel()
        if finished.cancelled():
            return ApiError(499, "The client closed the request.", code="client_closed").response()
        kind, answer = finished.result()
        if kind == "error":  # a failure of the model, reported in the API's shape
            return ApiError(500, f"The model failed: {answer}", "server_error").response()
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": int(time.time()), "model": served,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": _finish_reason(turn, limit)}],
            "usage": _usage(turn), "sources": answer.sources, "mode": answer.mode, "answered_by": answer.model})

    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", completions, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/health", health, methods=["GET"])


async def _last(items: AsyncIterator[tuple[str, object]]) -> tuple[str, object]:
    async for kind, value in items:
        if kind in ("done", "error"):
            return kind, value
    raise RuntimeError("the turn ended without an answer")


async def _events(work: Work, items: AsyncIterator[tuple[str, object]], turn: Turn, ident: str, created: int,
                  served: str, limit: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent `chat.completion.chunk` events, ending with `data: [DONE]`. A client that hangs up cancels this
    generator (Starlette watches for it), which stops the turn: the engine moves on to other sessions and the
    request's place is freed within a token."""
    def event(choices: list[dict], **extra) -> str:
        chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": served,
                 "choices": choices} | extra
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    streamed = ""
    try:
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for kind, value in items:
            if kind == "piece":
                streamed += value
                yield event([{"index": 0, "delta": {"content": value}, "finish_reason": None}])
            elif kind == "error":  # after the first byte an error can only be an event
                error = ApiError(500, f"The model failed: {value}", "server_error").body()
                yield f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"
            else:
                answer = value
                rest = answer.text[len(streamed):] if answer.text.startswith(streamed) else ""
                extra = {"sources": answer.sources, "mode": answer.mode}
                if not answer.text.startswith(streamed):
                    extra["answer"] = answer.text
                yield event([{"index": 0, "delta": {"content": rest} if rest else {},
                              "finish_reason": _finish_reason(turn, limit)}], **extra)
                if include_usage:
                    yield event([], usage=_usage(turn))
    finally:
        work.cancel()  # a no-op once the turn has ended; otherwise the client left
    yield "data: [DONE]\n\n"
