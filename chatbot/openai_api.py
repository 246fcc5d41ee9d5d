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

Requests share the UI's limits: at most `concurrency` turns at once and `max_waiting` waiting (more get 429),
the per-client rate limit, and the same engine, which serves UI and API sessions in one queue or batch. Errors
come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}. When CHATBOT_API_KEY is set, every
request needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from chatbot.assistant import Assistant, Turn
from chatbot.chat_format import message_text
from chatbot.engine import PromptTooLongError
from chatbot.prompts import question_of

API_KEY_ENV = "CHATBOT_API_KEY"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status)

    def body(self) -> dict:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}


class Gate:
    """At most `concurrency` requests inside at once and `max_waiting` waiting for a place; more are refused."""

    def __init__(self, concurrency: int, max_waiting: int):
        self.slots = threading.Semaphore(concurrency)
        self.max_waiting, self.waiting, self.lock = max_waiting, 0, threading.Lock()

    def enter(self) -> None:
        with self.lock:
            if self.waiting >= self.max_waiting:
                raise ApiError(429, "The server is busy; try again shortly.", "server_error", code="server_busy")
            self.waiting += 1
        try:
            self.slots.acquire()
        finally:
            with self.lock:
                self.waiting -= 1

    def leave(self) -> None:
        self.slots.release()


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


def add_routes(app: FastAPI, assistant: Assistant, gate: Gate, admit: Callable[[str], str | None]) -> None:
    """Add /v1/models and /v1/chat/completions to `app` (the Gradio app's FastAPI server). `admit(client)` returns
    why a client may not send another request now (the rate limit), or None."""
    created = int(time.time())
    served = assistant.engine.name

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
        return JSONResponse({"object": "list", "data": [{"id": served, "object": "model", "created": created,
                                                         "owned_by": "bilingual-chatbot"}]})

    async def completions(request: Request):
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
            await run_in_threadpool(gate.enter)
            try:
                turn = chosen.turn(history, question)
            except (ValueError, PromptTooLongError) as err:
                gate.leave()
                raise ApiError(400, str(err), param="messages",
                               code="context_length_exceeded" if isinstance(err, PromptTooLongError) else None
                               ) from err
        except ApiError as err:
            return err.response()
        ident, limit = f"chatcmpl-{uuid.uuid4().hex}", chosen.config.max_new_tokens
        if stream["stream"]:
            return StreamingResponse(_events(turn, ident, created, served, limit, stream["usage"], gate),
                                     media_type="text/event-stream")
        try:
            await run_in_threadpool(lambda: [None for _ in turn.stream()])
            answer = turn.answer()
        except Exception as err:  # noqa: BLE001 (a failure of the model, reported in the API's shape)
            return ApiError(500, f"The model failed: {err}", "server_error").response()
        finally:
            gate.leave()
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": int(time.time()), "model": served,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": _finish_reason(turn, limit)}],
            "usage": _usage(turn), "sources": answer.sources, "mode": answer.mode})

    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", completions, methods=["POST"])


def _events(turn: Turn, ident: str, created: int, served: str, limit: int, include_usage: bool,
            gate: Gate) -> Iterator[str]:
    """Server-sent `chat.completion.chunk` events, ending with `data: [DONE]`. Leaving early (the client hung
    up) stops the turn, so the engine moves on to other sessions."""
    def event(choices: list[dict], **extra) -> str:
        chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": served,
                 "choices": choices} | extra
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    streamed = ""
    try:
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for piece in turn.stream():
            streamed += piece
            yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        answer = turn.answer()
        rest = answer.text[len(streamed):] if answer.text.startswith(streamed) else ""
        extra = {"sources": answer.sources, "mode": answer.mode}
        if not answer.text.startswith(streamed):
            extra["answer"] = answer.text
        yield event([{"index": 0, "delta": {"content": rest} if rest else {},
                      "finish_reason": _finish_reason(turn, limit)}], **extra)
        if include_usage:
            yield event([], usage=_usage(turn))
    except Exception as err:  # noqa: BLE001 (after the first byte an error can only be an event)
        yield f"data: {json.dumps({'error': ApiError(500, f'The model failed: {err}', 'server_error').body()})}\n\n"
    finally:
        turn.stop.set()
        gate.leave()
    yield "data: [DONE]\n\n"
