"""Serving on this machine: each backend's speed on the same prompt, greedy agreement with transformers, and the
real app under 1, 4 and 16 simultaneous sessions. One command prints every table:

    python benchmarks/serving.py                     # about 10 minutes on 2 CPU cores
    python benchmarks/serving.py --repeat 5 --sessions 1,4,16 --skip-agreement

Backends (the default model, its LoRA adapter merged): transformers fp32 (the baseline), onnx at int4, int8 and
fp32, and llama.cpp on the embedded Q4_1 GGUF when `llama-cpp-python` is installed (optional: it compiles for
about 12 minutes, so never in CI; the GGUF holds the plain model, without the adapter). The prompt is the
project's own grounded prompt (three retrieved passages of the bundled documents); each backend generates
exactly --new-tokens tokens, greedy; the backends alternate within each of --repeat rounds and medians are
printed, with ratios against transformers measured in the same rounds.

Concurrency: `python app.py --no-index` is started on a free port with the default backend and driven by
N `gradio_client` clients at once, each asking a different everyday request from chatbot/eval/everyday.jsonl
(answered by the model). Printed: errors, p50/p95 time to first token, p50 per-session tokens/s while its answer
streams, and aggregate tokens/s (all sessions' tokens over the wall time), with its ratio to one session.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from chatbot.assistant import Assistant  # noqa: E402
from chatbot.config import ChatConfig  # noqa: E402
from chatbot.engine import GenerationOptions, Usage, load_engine  # noqa: E402
from chatbot.evaluate import EVERYDAY, read_jsonl  # noqa: E402
from knowledge.embedder import Embedder  # noqa: E402
from knowledge.retriever import Retriever  # noqa: E402
from knowledge.store import BUNDLED_CORPUS, scratch_knowledge_base  # noqa: E402

QUESTION = "How does LoRA reduce the number of trained parameters, and how is its rank chosen?"


def grounded_prompt(engine) -> list[dict]:
    """The prompt the assistant builds for a document question: system prompt, three passages, the question."""
    embedder = Embedder()
    with scratch_knowledge_base([BUNDLED_CORPUS], embedder) as kb:
        return Assistant(engine, ChatConfig(), Retriever(kb, embedder)).turn([], QUESTION).messages


class LlamaCpp:
    """llama.cpp through llama-cpp-python on the embedded GGUF, when installed; streams like an Engine."""
    name = "llama.cpp Q4_1 GGUF"

    def __init__(self):
        from llama_cpp import Llama

        from chatbot.models import embedded_gguf

        self.model = Llama(str(embedded_gguf()), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)

    def stream(self, messages, options: GenerationOptions, usage: Usage) -> Iterator[str]:
        pieces = self.model.create_chat_completion(messages=messages, max_tokens=options.max_new_tokens,
                                                   temperature=0.0, stream=True)
        for chunk in pieces:
            text = chunk["choices"][0]["delta"].get("content")
            if text:
                usage.completion_tokens += 1
                yield text


def timed(stream: Callable[[Usage], Iterator[str]]) -> tuple[float, float, float, str]:
    """(time to first piece, decode tokens/s after it, whole turn time, text)."""
    usage = Usage()
    start = time.perf_counter()
    first, text = None, ""
    for piece in stream(usage):
        first = first or time.perf_counter() - start
        text += piece
    total = time.perf_counter() - start
    return first, (usage.completion_tokens - 1) / max(total - first, 1e-9), total, text


def backend_table(repeat: int, new_tokens: int) -> tuple[str, dict]:
    engines: dict[str, object] = {"transformers fp32": load_engine(None, "transformers")}
    prompt = grounded_prompt(engines["transformers fp32"])
    for precision in ("int4", "int8", "fp32"):
        engines[f"onnx {precision}"] = load_engine(None, "onnx", precision=precision)
    try:
        engines[LlamaCpp.name] = LlamaCpp()
    except ImportError:
        pass
    options = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    tokens = engines["transformers fp32"].count_tokens(prompt)
    runs: dict[str, list] = {name: [] for name in engines}
    for _ in range(repeat):
        for name, engine in engines.items():  # alternated, so a noisy neighbour hits every backend alike
            runs[name].append(timed(lambda usage, e=engine: e.stream(prompt, options, usage=usage)))
    base = {k: statistics.median(r[k] for r in runs["transformers fp32"]) for k in (0, 1, 2)}
    lines = [f"Prompt: {tokens} tokens (grounded, 3 passages); {new_tokens} new tokens, greedy; medians of {repeat} "
             "alternated rounds.\n",
             "| backend | time to first token | decode tokens/s | turn time | decode vs transformers | turn time vs "
             "transformers |", "|---|---|---|---|---|---|"]
    figures = {}
    for name, results in runs.items():
        ttft, rate, total = (statistics.median(r[k] for r in results) for k in (0, 1, 2))
        figures[name] = {"ttft_s": ttft, "decode_tok_s": rate, "turn_s": total}
        lines.append(f"| {name} | {ttft:.2f} s | {rate:.1f} | {total:.2f} s | {rate / base[1]:.1f}x | "
                     f"{base[2] / total:.1f}x shorter |")
    if LlamaCpp.name not in engines:
        lines.append("| llama.cpp | not installed (`pip install llama-cpp-python`; compiles ~12 min) | | | | |")
    return "\n".join(lines), {"engines": engines, "figures": figures}


def agreement_table(engines: dict, count: int, new_tokens: int) -> str:
    """How often each backend's greedy reply equals transformers' on everyday requests (both languages)."""
    requests = read_jsonl(EVERYDAY)
    chosen = [r for r in requests if r["language"] == "en"][:count // 2] + \
             [r for r in requests if r["language"] == "zh"][:count - count // 2]
    config = ChatConfig()
    prompts = [[{"role": "system", "content": config.system_prompt}, {"role": "user", "content": r["text"]}]
               for r in chosen]
    options = GenerationOptions(max_new_tokens=new_tokens)
    replies = {name: ["".join(engine.stream(p, options)) for p in prompts] for name, engine in engines.items()
               if not isinstance(engine, LlamaCpp)}
    base = replies["transformers fp32"]
    lines = [f"Greedy replies to {len(prompts)} everyday requests ({len(prompts) - len(prompts) // 2} English, "
             f"{len(prompts) // 2} Chinese), up to {new_tokens} tokens:\n",
             "| backend | identical to transformers | same first 8 words |", "|---|---|---|"]
    for name, texts in replies.items():
        same = sum(a == b for a, b in zip(texts, base, strict=True))
        start = sum(a.split()[:8] == b.split()[:8] for a, b in zip(texts, base, strict=True))
        lines.append(f"| {name} | {same}/{len(texts)} | {start}/{len(texts)} |")
    return "\n".join(lines)


def start_app(backend: str, max_new_tokens: int, *options: str) -> tuple[subprocess.Popen, str]:
    from tests.test_app import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--no-index", "--backend", backend,
                                "--max-new-tokens", str(max_new_tokens), *options], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=os.environ | {"HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if match := re.search(r"(http://127\.0\.0\.1:\d+)", line):
            # Keep reading what the app prints, so that a full pipe never blocks it.
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, match.group(1) + "/"
    process.terminate()
    raise RuntimeError("the app did not start")


def session(url: str, question: str) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False)
    start = time.perf_counter()
    first = None
    job = client.submit(question, [], api_name="/chat")
    for update in job:
        if first is None and update.get("answer"):
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    final = job.result()
    tokens = final["usage"]["completion_tokens"]
    return {"ttft": first or total, "total": total, "tokens": tokens,
            "rate": tokens / max(total - (first or total), 1e-9)}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def concurrency_table(backend: str, sizes: list[int], max_new_tokens: int) -> tuple[str, dict]:
    questions = [r["text"] for r in read_jsonl(EVERYDAY) if r["language"] == "en"]
    process, url = start_app(backend, max_new_tokens)
    results = {}
    try:
        session(url, questions[0])  # warm-up
        for size in sizes:
            errors, done = 0, []
            start = time.perf_counter()
            with ThreadPoolExecutor(size) as pool:
                futures = [pool.submit(session, url, questions[i % len(questions)]) for i in range(size)]
                for future in futures:
                    try:
                        done.append(future.result(timeout=600))
                    except Exception:  # noqa: BLE001 (counted: the goal is none)
                        errors += 1
            wall = time.perf_counter() - start
            results[size] = {"errors": errors, "wall": wall, "sessions": done,
                             "aggregate": sum(d["tokens"] for d in done) / wall}
    finally:
        process.terminate()
        process.wait(timeout=30)
    one = results[sizes[0]]["aggregate"]
    lines = [f"The real app (`--backend {backend} --no-index --max-new-tokens {max_new_tokens}`), N gradio_client "
             "sessions at once:\n",
             "| sessions | errors | TTFT p50 | TTFT p95 | per-session tokens/s p50 | aggregate tokens/s | vs "
             f"{sizes[0]} session{'s' if sizes[0] > 1 else ''} |", "|---|---|---|---|---|---|---|"]
    for size, r in results.items():
        ttfts, rates = [d["ttft"] for d in r["sessions"]], [d["rate"] for d in r["sessions"]]
        lines.append(f"| {size} | {r['errors']} | {percentile(ttfts, 0.5):.2f} s | {percentile(ttfts, 0.95):.2f} s"
                     f" | {statistics.median(rates):.1f} | {r['aggregate']:.1f} | {r['aggregate'] / one:.2f}x |")
    return "\n".join(lines), results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="alternated rounds per backend (medians printed)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per backend run")
    parser.add_argument("--agreement-prompts", type=int, default=16, help="everyday requests for greedy agreement")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--sessions", default="1,4,16", help="simultaneous sessions, comma-separated")
    parser.add_argument("--backend", default="auto", help="backend of the app in the concurrency runs")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args(argv)
    import torch

    print(f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads", flush=True)
    table, speed = backend_table(args.repeat, args.new_tokens)
    print(f"\n{table}\n", flush=True)
    if not args.skip_agreement:
        print(agreement_table(speed["engines"], args.agreement_prompts, 48) + "\n", flush=True)
    for engine in speed.pop("engines").values():
        if hasattr(engine, "close"):
            engine.close()
    sizes = [int(n) for n in args.sessions.split(",")]
    table, sessions = concurrency_table(args.backend, sizes, args.new_tokens)
    print(table, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"backends": speed["figures"], "sessions": sessions}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
