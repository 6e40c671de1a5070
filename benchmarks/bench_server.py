"""Throughput and latency of the HTTP server under 1, 4, 8 and 16 concurrent streaming clients.

``python benchmarks/bench_server.py [--shape L] [--dtype bfloat16] [--clients 1,4,8,16] [--max_tokens 128] [--threads N]
[--work_dir DIR] [--out table.md] [--quick]``

Starts ``python -m llama.server`` on a random checkpoint of the shape (benchmarks/_common.py: EOS never wins, so every
request streams its full ``max_tokens``), then for each client count sends that many greedy streamed completions at
once and reads them to the end; then a request with a long prompt joins 7 running streams. Aggregate tokens/s = all completion tokens / wall time from the first request to the
last end; time to first token (TTFT) per request; inter-token latency (ITL) = the gaps between a stream's chunks
after its first. A markdown table goes to stdout (and ``--out``). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import checkpoint_dir, cpu_description  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, args: argparse.Namespace, max_batch_size: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "llama.server", "--ckpt_dir", str(ckpt), "--port", str(port), "--dtype", args.dtype,
               "--device", "cpu", "--max_seq_len", str(max(args.prompt_words, args.newcomer_words) + 2 * args.max_tokens + 8),
               "--max_batch_size", str(max(max_batch_size, 8)), "--max_queue", str(max_batch_size), "--prefill_chunk", str(args.prefill_chunk),
               "--quiet"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}:\n{process.stderr.read()[-4000:] if process.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server was not ready after {timeout} s")


def one_stream(url: str, prompt: str, max_tokens: int, started: Optional[threading.Event] = None) -> Tuple[float, float, List[float], int]:
    """(start, first content chunk, every content chunk's time, completion tokens) of one streamed greedy completion;
    ``started`` is set at its first content chunk."""
    import httpx

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times: List[float] = []
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[len("data: "):])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            elif data["choices"] and data["choices"][0]["text"]:
                times.append(time.perf_counter())
                if started is not None:
                    started.set()
    if not times:
        raise RuntimeError(f"no text streamed for {prompt!r}")
    return start, times[0], times, tokens


def percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(url: str, clients: int, args: argparse.Namespace) -> Dict[str, float]:
    results: List[Optional[Tuple[float, float, List[float], int]]] = [None] * clients
    prompts = [" ".join(f"w{(7 * i + j) % 400 + 3}" for j in range(args.prompt_words)) for i in range(clients)]

    def run(i: int) -> None:
        results[i] = one_stream(url, prompts[i], args.max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [r for r in results if r is not None]
    if len(done) != clients:
        raise RuntimeError(f"{clients - len(done)} of {clients} streams failed")
    wall = max(r[2][-1] for r in done) - min(r[0] for r in done)
    ttft = [r[1] - r[0] for r in done]
    gaps = [b - a for r in done for a, b in zip(r[2], r[2][1:])]
    return {
        "tokens_per_s": sum(r[3] for r in done) / wall,
        "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
        "itl_p50": percentile(gaps, 0.5), "itl_p95": percentile(gaps, 0.95),
    }


def newcomer(url: str, args: argparse.Namespace, running: int = 7) -> str:
    """A request with a long prompt joins ``running`` streams: its time to first token, and the longest pause of the
    running streams while it is prefilled (chunked prefill keeps it near one step)."""
    results: List[Optional[Tuple[float, float, List[float], int]]] = [None] * running
    started = [threading.Event() for _ in range(running)]
    prompts = [" ".join(f"w{(7 * i + j) % 400 + 3}" for j in range(args.prompt_words)) for i in range(running)]

    def run(i: int) -> None:
        results[i] = one_stream(url, prompts[i], 2 * args.max_tokens, started[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(running)]
    for thread in threads:
        thread.start()
    for event in started:
        event.wait(600)
    time.sleep(1.0)  # a few steady steps first
    long_prompt = " ".join(f"w{j % 400 + 3}" for j in range(args.newcomer_words))
    start, first, _, _ = one_stream(url, long_prompt, 8)
    for thread in threads:
        thread.join()
    done = [r for r in results if r is not None]
    gaps = [b - a for r in done for a, b in zip(r[2], r[2][1:])]
    during = [b - a for r in done for a, b in zip(r[2], r[2][1:]) if b > start and a < first]
    streaming = sum(any(start < t < first for t in r[2]) for r in done)
    return (f"A {args.newcomer_words}-token prompt joining {running} streams (prefill chunk {args.prefill_chunk}): first token after "
            f"{(first - start) * 1e3:.0f} ms; meanwhile {streaming} of the {running} streams got tokens, their longest pause "
            f"{max(during, default=0) * 1e3:.0f} ms (median inter-token latency {percentile(gaps, 0.5) * 1e3:.0f} ms).\n")


def table(rows: List[Tuple[int, Dict[str, float]]], title: str) -> str:
    base = rows[0][1]["tokens_per_s"] if rows else float("nan")
    lines = [title, "", "| clients | tokens/s | x 1 client | TTFT p50 (ms) | TTFT p95 (ms) | ITL p50 (ms) | ITL p95 (ms) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for clients, m in rows:
        lines.append(f"| {clients} | {m['tokens_per_s']:.1f} | {m['tokens_per_s'] / base:.2f} | {m['ttft_p50'] * 1e3:.0f} | "
                     f"{m['ttft_p95'] * 1e3:.0f} | {m['itl_p50'] * 1e3:.1f} | {m['itl_p95'] * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="L", choices=("S", "M", "L"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated client counts")
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--prompt_words", type=int, default=32, help="prompt length in tokens (one word is one token)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: torch's)")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "llama-bench")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--newcomer_words", type=int, default=512, help="prompt length of the request that joins 7 streams")
    parser.add_argument("--prefill_chunk", type=int, default=128, help="the server's --prefill_chunk")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 1 and 4 clients, 8 tokens: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.max_tokens, args.prompt_words, args.newcomer_words = "1,4", 8, 8, 32
    counts = [int(c) for c in args.clients.split(",")]
    ckpt = checkpoint_dir(args.work_dir, args.shape, args.quick) / "meta"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(ckpt, port, args, max(counts))
    try:
        wait_ready(url, server)
        one_stream(url, "w3 w4 w5", 4)  # warm-up: first-call costs stay out of the numbers
        rows = [(clients, measure(url, clients, args)) for clients in counts]
        joining = newcomer(url, args)
    finally:
        server.terminate()
        server.wait(30)
    title = (f"Server, shape {args.shape}{' (quick)' if args.quick else ''}, {args.dtype}, {args.prompt_words}-token prompts, "
             f"{args.max_tokens} tokens each, greedy, max_batch_size {max(counts)}; {cpu_description()}")
    text = table(rows, title) + "\n" + joining
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
