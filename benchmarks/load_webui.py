"""Bounded load test of the web demo: N concurrent requests against a server on 127.0.0.1.

Starts ``customshift.webui.serve`` (default model, or the tiny random model where none is installed)
in a subprocess on a free local port, fires ``--requests`` requests at once for ``--rounds`` rounds,
and reports what happened to each kind of request and the server's resident memory. Every request
must complete or be refused with a message; the script exits 1 otherwise.

Request kinds (cycled): valid generations (several subjects, so the embedding cache both hits and
misses), too many images, an empty prompt, an oversized upload (straight to the upload route, as a
browser would send it) and a PNG whose header claims 20000x20000 pixels.

    python benchmarks/load_webui.py [--requests 20] [--rounds 5] [--out docs/webui-load.md]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

HOST = "127.0.0.1"  # never anything else: this is a load test of one's own machine
KINDS = ("valid", "valid", "valid", "too many images", "valid", "empty prompt", "valid", "oversized upload",
         "valid", "header bomb")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A few hundred bytes whose PNG header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")


class RssSampler(threading.Thread):
    """Peak resident memory of the server process (and any children), sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.peak = self.current = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        try:
            procs = [self.process] + self.process.children(recursive=True)
            return sum(p.memory_info().rss for p in procs)
        except Exception:  # the process is exiting
            return self.current

    def reset(self) -> None:
        self.peak = self.current = self.rss()

    def run(self) -> None:
        while not self._stop.is_set():
            self.current = self.rss()
            self.peak = max(self.peak, self.current)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()


def start_server(port: int, max_queue: int, log: Path) -> subprocess.Popen:
    code = (
        "from customshift.webui import serve; "
        f"serve(None, None, {HOST!r}, {port}, max_queue={max_queue})"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(url + "config", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not come up within {timeout:.0f} s")


def one_request(url: str, kind: str, index: int, files: dict[str, Path], steps: int, size: int,
                timeout: float) -> tuple[str, str]:
    """('completed' | 'refused' | 'FAILED', detail) for one request of ``kind``."""
    import httpx
    from gradio_client import Client, handle_file

    if kind == "oversized upload":
        with files["big"].open("rb") as handle:
            response = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", handle)}, timeout=timeout)
        if response.status_code == 413:
            return "refused", f"HTTP 413: {response.text.strip()[:90]}"
        return "FAILED", f"HTTP {response.status_code}"
    reference = {"header bomb": files["bomb"]}.get(kind, files[f"ref{index % 4}"])
    prompts = {"empty prompt": "   ", "too many images": "a robot\na robot on the beach"}.get(kind,
                                                                                           "a robot on a beach")
    per_prompt = 4 if kind == "too many images" else 1
    try:
        client = Client(url, verbose=False)
        job = client.submit([handle_file(str(reference))], "robot", prompts, 1.0, 7.0, 0.0, steps, index, size, size,
                            per_prompt, api_name="/generate")
        result = job.result(timeout=timeout)
    except Exception as error:  # noqa: BLE001 — a refusal is an exception with the user's message
        message = " ".join(str(error).split())
        return ("refused" if message else "FAILED"), f"{type(error).__name__}: {message[:160]}"
    return ("completed", "") if result and len(result[0]) == 1 else ("FAILED", "empty gallery")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="concurrent requests per round (at most 64)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queue", type=int, default=16, help="the server's max_queue")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per round (bounded run)")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    args = parser.parse_args()
    if not 1 <= args.requests <= 64 or not 1 <= args.rounds <= 5:
        parser.error("--requests must be 1..64 and --rounds 1..5 (this is a bounded test)")

    import numpy as np
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="customshift-load-"))
    files: dict[str, Path] = {}
    for i in range(4):
        files[f"ref{i}"] = work / f"ref{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(files[f"ref{i}"])
    files["big"] = work / "big.png"
    files["big"].write_bytes(b"\x89PNG" + os.urandom(11 * 1024 * 1024))
    files["bomb"] = work / "bomb.png"
    files["bomb"].write_bytes(bomb_png())

    port = free_port()
    url = f"http://{HOST}:{port}/"
    log = work / "server.log"
    started = time.monotonic()
    proc = start_server(port, args.queue, log)
    try:
        wait_until_up(url, proc, 180)
        startup = time.monotonic() - started
        sampler = RssSampler(proc.pid)
        sampler.reset()
        idle_rss = sampler.current
        sampler.start()
        rows, failures = [], 0
        details: dict[str, Counter] = defaultdict(Counter)
        for round_ in range(1, args.rounds + 1):
            sampler.reset()
            kinds = [KINDS[i % len(KINDS)] for i in range(args.requests)]
            start = time.monotonic()
            with cf.ThreadPoolExecutor(args.requests) as pool:
                futures = [pool.submit(one_request, url, kind, i, files, args.steps, args.size, args.timeout)
                           for i, kind in enumerate(kinds)]
                outcomes = [f.result(timeout=args.timeout + 30) for f in futures]
            wall = time.monotonic() - start
            counts = Counter(o for o, _ in outcomes)
            failures += counts["FAILED"]
            for kind, (outcome, detail) in zip(kinds, outcomes, strict=True):
                details[kind][(outcome, detail.split(":")[0] if outcome == "completed" else detail)] += 1
            rows.append((round_, len(kinds), counts["completed"], counts["refused"], counts["FAILED"], wall,
                         sampler.peak / 2**20, sampler.current / 2**20))
        sampler.stop()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()

    lines = [
        "# Web demo load test",
        "",
        f"`python benchmarks/load_webui.py --requests {args.requests} --rounds {args.rounds} --queue {args.queue} "
        f"--steps {args.steps} --size {args.size}` on {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}: `customshift.webui.serve()` with its default model (the tiny random "
        f"model where none is installed) on {HOST}, one generation at a time, at most {args.queue} requests waiting. "
        f"Server start-up {startup:.1f} s; resident memory when idle {idle_rss / 2**20:.0f} MiB.",
        "",
        "| round | requests at once | completed | refused with a message | failed | wall time (s) | "
        "peak RSS (MiB) | RSS after (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r} | {n} | {c} | {ref} | {f} | {w:.1f} | {p:.0f} | {a:.0f} |" for r, n, c, ref, f, w, p, a in rows]
    lines += ["", "What each kind of request got (all rounds):", "", "| request | outcome | count |", "|---|---|---:|"]
    for kind in dict.fromkeys(KINDS):
        for (outcome, detail), count in sorted(details[kind].items()):
            text = outcome if not detail else f"{outcome}: {detail}"
            lines.append(f"| {kind} | {text.replace('|', '/')} | {count} |")
    lines += ["", "Every request completed or was refused with a message." if failures == 0 else
              f"**{failures} request(s) failed without a message.**", ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
