"""Admission for an async server: how many requests run at once, how many may wait, how long they may wait, and the
work of an admitted request in a thread of its own that stops when its client leaves.

    gate = Gate(Limits(concurrency=8, max_waiting=64, max_wait=30))
    await gate.enter(gone)          # Busy (429) past the waiting room, TimedOut (503) past max_wait
    work = Work(gate, lambda: assistant.turn(history, question))
    work.start()                    # the turn runs in its own thread; the gate's place is freed when it ends
    async for kind, value in work.items(): ...  # ("turn", Turn), ("piece", str) ..., ("done", Answer) | ("error", exc)
    work.cancel()                   # the client left: the turn's stop event is set, generation ends

Waiting holds no server thread (an asyncio future per waiter), so a burst cannot use up the server's thread pool,
which the Gradio UI shares. A waiter whose client hangs up leaves the queue at once. Every method of `Gate` runs on
the event loop's thread; `Work` hands its results and its `leave()` back to that loop.

Tested in tests/test_load.py (through the real server) and tests/test_admission.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from chatbot.assistant import Turn


@dataclass(frozen=True)
class Limits:
    """One surface's share of the server (the UI has its own in Gradio's queue, the API this one)."""
    concurrency: int = 8  # requests handled at once; the engine decodes them together or in arrival order
    max_waiting: int = 64  # requests waiting for a place; more are refused at once (429)
    max_wait: float = 30.0  # seconds a request may wait for a place before it is refused (503)
    retry_after: int = 5  # seconds a refused client is told to wait (Retry-After)


class Busy(Exception):
    """Every place is taken and the waiting room is full."""


class TimedOut(Exception):
    """The request waited `max_wait` seconds without getting a place."""


class Gone(Exception):
    """The client hung up while its request waited."""


class Gate:
    """At most `limits.concurrency` requests inside, at most `limits.max_waiting` waiting, in arrival order."""

    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self.running = 0
        self.waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    async def enter(self, gone: asyncio.Future | None = None) -> None:
        """Take a place, waiting for one if need be; Busy, TimedOut, or Gone when `gone` (a task that ends when
        the client hangs up) finishes first."""
        if self.running < self.limits.concurrency and not self.waiters:
            self.running += 1
            return
        if len(self.waiters) >= self.limits.max_waiting:
            raise Busy()
        place = asyncio.get_running_loop().create_future()
        self.waiters.append(place)
        watched = [place] + ([gone] if gone is not None else [])
        try:
            await asyncio.wait(watched, timeout=self.limits.max_wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not place.done():  # timed out, the client left, or this task was cancelled: give up the turn
                self.waiters.remove(place)
                place.cancel()
            elif gone is not None and gone.done():  # handed a place just as the client left: pass it on
                self.leave()
        if gone is not None and gone.done():
            raise Gone()
        if not place.done() or place.cancelled():
            raise TimedOut()

    def leave(self) -> None:
        """Free a place: the first waiter takes it over."""
        while self.waiters:
            place = self.waiters.popleft()
            if not place.done():
                place.set_result(None)
                return
        self.running -= 1


async def disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client of an ASGI request (whose body has been read) hangs up."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Work:
    """An admitted request's turn, made and streamed in a thread of its own. The thread frees the request's place
    at the gate when it ends, whatever ended it (the answer, an error, `cancel`)."""

    def __init__(self, gate: Gate, make_turn: Callable[[], Turn]):
        self.gate, self.make_turn = gate, make_turn
        self.loop = asyncio.get_running_loop()
        self.results: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.turn: Turn | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="api-turn", daemon=True).start()

    def cancel(self) -> None:
        """The client left: stop generating (the engine ends the reply at its next token)."""
        self.cancelled.set()
        if self.turn is not None:
            self.turn.stop.set()

    async def items(self) -> AsyncIterator[tuple[str, object]]:
        """("turn", Turn) once it is made, ("piece", text) for each piece as it is generated, then ("done", Answer)
        or ("error", exception)."""
        while True:
            kind, value = await self.results.get()
            yield kind, value
            if kind in ("done", "error"):
                return

    def _put(self, kind: str, value: object) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop has closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.results.put_nowait, (kind, value))

    def _run(self) -> None:
        try:
            self.turn = self.make_turn()
            if self.cancelled.is_set():  # cancelled while the turn was being made
                self.turn.stop.set()
            self._put("turn", self.turn)
            for piece in self.turn.stream():
                self._put("piece", piece)
            self._put("done", self.turn.answer())
        except Exception as err:  # noqa: BLE001 (reported to the client in the API's shape)
            self._put("error", err)
        finally:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.gate.leave)
