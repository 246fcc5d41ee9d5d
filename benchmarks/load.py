"""Load and faults on the real app: bursts of API requests past its limits, clients that hang up, UI sessions beside
an API flood, and whether the app serves normally afterwards. One command prints the table:

    python benchmarks/load.py                      # about 7 minutes on 2 CPU cores
    python benchmarks/load.py --bursts 20,64 --max-tokens 32

`python app.py --no-index` is started on a free port of this machine (the default model and backend). Each phase
(after a first one where --abandoned streams of 400 tokens all hang up after their first event) sends its requests
at once through the OpenAI-compatible API (raw HTTP/1.1 connections from asyncio), alternating
streaming and non-streaming requests; 30% of the streams hang up after their first event. The largest burst also
has --ui-sessions `gradio_client` sessions (the /chat API the page's queue serves) at the same moment.

Per phase: answered, refused (429 at the door, 503 after waiting --max-wait), failed or timed out (the goal is
none), the slowest refusal and the slowest answer, answers per second, one API request sent right after the
burst (is the app serving at once?); then, once the app has settled and been
idle 12 s, a fresh API request (the median of three, and its ratio to the same on the idle app before any burst),
a fresh gradio_client /chat call, and the server's threads, open files and memory against that idle baseline: they
must come back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.serving import session, start_app  # noqa: E402
from chatbot.evaluate import EVERYDAY, read_jsonl  # noqa: E402

ABANDONED = 0.3  # share of the streams whose client hangs up after the first event
CLIENT_TIMEOUT = 300  # seconds: a request without any answer by then counts as timed out
IDLE = 12  # seconds idle before the fresh requests: anyio's thread pool ends workers idle for 10 s


@dataclass
class Phase:
    name: str
    requests: int = 0
    answered: int = 0
    abandoned: int = 0
    busy: int = 0  # 429
    timed_out_waiting: int = 0  # 503
    failed: list[str] = field(default_factory=list)
    slowest_refusal: float = 0.0
    slowest_answer: float = 0.0
    wall: float = 0.0
    ui_answered: int = 0
    ui_failed: int = 0
    after: dict = field(default_factory=dict)


def process_state(pid: int) -> dict:
    """The server's threads, open file descriptors and resident memory (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"threads": int(fields["Threads"]), "files": len(os.listdir(f"/proc/{pid}/fd")),
            "rss_mb": int(fields["VmRSS"].split()[0]) / 1024}


def body(question: str, max_tokens: int, stream: bool) -> dict:
    # The app serves one model; a request naming the model by the id in /v1/models is what a client sends.
    return {"model": MODEL_ID[0], "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "stream": stream}


MODEL_ID = [""]  # the served model's id, read from /v1/models once the app is up


async def one_request(url: str, question: str, max_tokens: int, stream: bool, abandon: bool, phase: Phase) -> None:
    """One request over a raw HTTP/1.1 connection: a client this light adds almost nothing to the times measured,
    where 500 httpx requests from one process spent seconds in the client itself."""
    host, port = url.removeprefix("http://").strip("/").split(":")
    payload = json.dumps(body(question, max_tokens, stream)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    start = time.perf_counter()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), CLIENT_TIMEOUT)
        writer.write(head + payload)
        status_line = await asyncio.wait_for(reader.readline(), CLIENT_TIMEOUT)
        status = int(status_line.split()[1])
        if status != 200 or not stream:
            text = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
            record(phase, status, text.decode(errors="replace"), time.perf_counter() - start)
            return
        received = b""
        while chunk := await asyncio.wait_for(reader.read(4096), CLIENT_TIMEOUT):
            received += chunk
            if abandon and b"data: " in received:
                phase.abandoned += 1  # hang up: the connection is closed below, mid-stream
                return
            if b"data: [DONE]" in received:
                record(phase, 200, "", time.perf_counter() - start)
                return
        phase.failed.append("stream ended without [DONE]")
    except (OSError, TimeoutError, ValueError, IndexError) as err:
        phase.failed.append(type(err).__name__)
    finally:
        if writer is not None:
            writer.close()


def record(phase: Phase, status: int, text: str, seconds: float) -> None:
    if status == 200:
        phase.answered += 1
        phase.slowest_answer = max(phase.slowest_answer, seconds)
    elif status in (429, 503):
        if status == 429:
            phase.busy += 1
        else:
            phase.timed_out_waiting += 1
        phase.slowest_refusal = max(phase.slowest_refusal, seconds)
    else:
        phase.failed.append(f"HTTP {status}: {text[:80]}")


async def burst(url: str, count: int, questions: list[str], max_tokens: int, phase: Phase,
                abandon_all: bool = False) -> None:
    jobs = []
    for number in range(count):
        stream = abandon_all or number % 2 == 1
        abandon = abandon_all or stream and (number // 2) % 10 < ABANDONED * 10  # 3 streams in 10
        jobs.append(one_request(url, questions[number % len(questions)], max_tokens, stream, abandon, phase))
    await asyncio.gather(*jobs)


def fresh_request(url: str, max_tokens: int, count: int = 3) -> float:
    """Plain requests on the app after a phase, one after the other: the median time in seconds of `count` (inf when
    one failed)."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        try:
            response = httpx.post(url + "v1/chat/completions", json=body("Say hello.", max_tokens, False),
                                  timeout=CLIENT_TIMEOUT)
        except httpx.HTTPError:
            return float("inf")
        times.append(time.perf_counter() - start if response.status_code == 200 else float("inf"))
    return statistics.median(times)


def settle(url: str, timeout: float = 60) -> None:
    """Wait until the app reports nothing running or waiting (abandoned work stopping, refused clients gone)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = httpx.get(url + "health", timeout=10).json()
        if not (health["api"]["running"] or health["api"]["waiting"] or health["ui"]["running"]
                or health["ui"]["waiting"]):
            return
        time.sleep(0.2)


def run_phase(name: str, url: str, pid: int, count: int, ui_sessions: int, questions: list[str],
              max_tokens: int, abandon_all: bool = False) -> Phase:
    phase = Phase(name, requests=count)
    pool = ThreadPoolExecutor(max(1, ui_sessions))
    start = time.perf_counter()
    ui_jobs = [pool.submit(session, url, questions[i % len(questions)]) for i in range(ui_sessions)]
    asyncio.run(burst(url, count, questions, max_tokens, phase, abandon_all))
    for job in ui_jobs:
        try:
            job.result(timeout=CLIENT_TIMEOUT)
            phase.ui_answered += 1
        except Exception:  # noqa: BLE001 (counted: the goal is none)
            phase.ui_failed += 1
    pool.shutdown()
    phase.wall = time.perf_counter() - start
    right_after = fresh_request(url, max_tokens, 1)  # at once, nothing settled: is the app serving?
    phase.after = after(url, pid, max_tokens) | {"right_after_s": right_after}
    return phase


def after(url: str, pid: int, max_tokens: int) -> dict:
    """Once the app has settled and stayed idle: a fresh API request's time, a fresh /chat call's time, and the
    server's threads, open files and memory."""
    settle(url)
    time.sleep(IDLE)  # the server's thread pool ends workers idle this long when it is next used (the /chat call)
    state = {"fresh_s": fresh_request(url, max_tokens), "chat_s": session(url, "Say hello.")["total"]}
    return state | process_state(pid)


def print_table(phases: list[Phase], baseline: dict) -> None:
    print("| phase | requests | answered | abandoned | refused 429 | refused 503 | failed or timed out | "
          "slowest refusal | slowest answer | answers/s | UI sessions answered | API request right after "
          "| fresh API request once idle | fresh /chat once idle | threads | open files | memory |")
    print("|---|" + "---|" * 16)
    print(f"| idle, before | - | - | - | - | - | - | - | - | - | - | - | {baseline['fresh_s']:.2f} s (1.00x) | "
          f"{baseline['chat_s']:.2f} s | {baseline['threads']} | {baseline['files']} | {baseline['rss_mb']:.0f} MB |")
    for p in phases:
        ui = f"{p.ui_answered}/{p.ui_answered + p.ui_failed}" if p.ui_answered + p.ui_failed else "-"
        a = p.after
        print(f"| {p.name} | {p.requests} | {p.answered} | {p.abandoned} | {p.busy} | {p.timed_out_waiting} | "
              f"{len(p.failed)} | {p.slowest_refusal:.2f} s | {p.slowest_answer:.2f} s | "
              f"{p.answered / p.wall:.1f} | {ui} | {a['right_after_s']:.2f} s | "
              f"{a['fresh_s']:.2f} s ({a['fresh_s'] / baseline['fresh_s']:.2f}x) "
              f"| {a['chat_s']:.2f} s | {a['threads']} | {a['files']} | {a['rss_mb']:.0f} MB |")
    failures = sorted({f for p in phases for f in p.failed})
    if failures:
        print("\nFailures:", "; ".join(failures[:10]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bursts", default="20,64,200,500,200",
                        help="API requests sent at once, one phase each (the last 200 again: memory after a repeat)")
    parser.add_argument("--abandoned", type=int, default=12, help="streams hung up after their first event, first")
    parser.add_argument("--ui-sessions", type=int, default=16, help="gradio_client sessions during the largest burst")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each API request")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    questions = [r["text"] for r in read_jsonl(EVERYDAY)]
    process, url = start_app(args.backend, args.max_tokens)
    try:
        while httpx.get(url + "health", timeout=60).status_code != 200:  # the API joins just after the page
            time.sleep(0.1)
        MODEL_ID[0] = httpx.get(url + "v1/models", timeout=60).json()["data"][0]["id"]
        fresh_request(url, args.max_tokens)  # warm-up
        baseline = after(url, process.pid, args.max_tokens)
        sizes = [int(size) for size in args.bursts.split(",")]
        # The fault first: streams of 400 tokens whose clients all hang up after the first event.
        phases = [run_phase(f"{args.abandoned} streams, all abandoned", url, process.pid, args.abandoned, 0,
                            questions, 400, abandon_all=True)]
        largest = sizes.index(max(sizes))
        for number, size in enumerate(sizes):
            ui = args.ui_sessions if number == largest else 0
            name = f"{size} API" + (f" + {ui} UI" if ui else "")
            phases.append(run_phase(name, url, process.pid, size, ui, questions, args.max_tokens))
            print(f"{name}: done in {phases[-1].wall:.0f} s", file=sys.stderr, flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"\nThe real app (`app.py --no-index`, backend {args.backend}, max_tokens {args.max_tokens}); API requests "
          f"alternate streaming and not, {ABANDONED:.0%} of the streams hang up after their first event:\n")
    print_table(phases, baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
