"""Load and faults through the real server: clients that hang up, bursts past the limits, and recovery afterwards.

Each test drives the app's real server (`tests.test_app.launched`) with plain HTTP, as a misbehaving client
would, on the tiny model slowed down so that requests overlap."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
from gradio_client import Client

from app import Limits, build_app
from chatbot.assistant import Assistant
from chatbot.config import ChatConfig
from tests.test_app import launched
from tests.tiny import slow_down

HANG_GUARD = 60  # seconds: a client that waits longer than this reports a hang instead of blocking the suite


def body(text: str = "Tell me a story.", **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}]} | extra


def abandon_after_first_chunk(url: str) -> bool:
    """Open a streamed completion, read its first event, hang up; True when an event came."""
    with httpx.Client(timeout=HANG_GUARD) as client, client.stream(
            "POST", url + "v1/chat/completions", json=body(max_tokens=200, stream=True)) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                return True
    return False


def test_streams_abandoned_after_their_first_chunk_free_their_places(engine):
    calls = slow_down(engine.model, 0.05)  # 200 tokens take 10 s: each stream would hold the engine that long
    config = ChatConfig(max_new_tokens=200, context_tokens=256)
    with launched(build_app(Assistant(engine, config))) as url:  # 8 answered at once, 64 waiting
        with ThreadPoolExecutor(12) as pool:
            first_chunks = list(pool.map(lambda _: abandon_after_first_chunk(url), range(12)))
        assert all(first_chunks), "every stream got its first event: the last 4 got the places the first 8 left"
        reply = httpx.post(url + "v1/chat/completions", json=body(max_tokens=4), timeout=HANG_GUARD)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
        health = httpx.get(url + "health", timeout=HANG_GUARD).json()
        assert health["api"]["running"] == health["api"]["waiting"] == 0
    # Twelve abandoned streams of 200 tokens would be 2,400 forward passes; stopped at once they are a few each.
    assert len(calls) < 12 * 20, f"{len(calls)} forward passes: abandoned streams went on generating"


def test_a_burst_past_the_limits_is_refused_at_once_and_the_app_recovers(engine):
    slow_down(engine.model, 0.1)  # each answer of 8 tokens takes about a second
    config = ChatConfig(max_new_tokens=8, context_tokens=256)
    demo = build_app(Assistant(engine, config), limits=Limits(concurrency=1, max_waiting=2))
    with launched(demo) as url:
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=HANG_GUARD)
        outcomes: list[object] = []
        inside = threading.Event()

        def ask(_: int) -> None:
            try:
                outcomes.append(client.chat.completions.create(**body()))
            except openai.RateLimitError as err:
                outcomes.append(err)

        first = threading.Thread(target=ask, args=(0,))
        first.start()
        while not inside.is_set():  # the first request holds the only place before the burst comes
            inside.wait(0.01)
            if httpx.get(url + "health").json()["api"]["running"] == 1:
                inside.set()
        with ThreadPoolExecutor(7) as pool:
            list(pool.map(ask, range(7)))
        first.join(HANG_GUARD)
        refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
        answered = [o for o in outcomes if not isinstance(o, Exception)]
        assert len(answered) == 3 and len(refused) == 5, "one running and two waiting are answered, the rest refused"
        assert all(int(err.response.headers["retry-after"]) >= 1 for err in refused)
        assert refused[0].body["code"] == "server_busy"
        # Afterwards both surfaces answer as before.
        assert client.chat.completions.create(**body()).choices[0].message.content
        assert Client(url, verbose=False).predict("Tell me a story.", [], api_name="/chat")["answer"]


def test_a_request_that_waits_too_long_gets_503(engine):
    slow_down(engine.model, 0.2)  # 8 tokens: about 2 s
    config = ChatConfig(max_new_tokens=8, context_tokens=256)
    demo = build_app(Assistant(engine, config), limits=Limits(concurrency=1, max_waiting=4, max_wait=0.5))
    with launched(demo) as url:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(httpx.post, url + "v1/chat/completions", json=body(), timeout=HANG_GUARD)
            while httpx.get(url + "health").json()["api"]["running"] == 0:
                threading.Event().wait(0.01)
            late = httpx.post(url + "v1/chat/completions", json=body(), timeout=HANG_GUARD)
            assert slow.result().status_code == 200
        assert late.status_code == 503 and late.headers["retry-after"]
        assert late.json()["error"]["code"] == "queue_timeout"
