"""The server against the bare model it serves, side by side in one run.

Bare model, in this process: decode + preprocess + forward of the same images in a loop, batch 1 and batch 16.
Server: `python -m evaluation.serve` in a process of its own, timed from its start to its first answer (with an
empty index cache, then again restarted with the cache filled), its peak RSS, and p50 / p95 latency and
throughput of /predict with 1, 4 and 16 requests in flight (and the mean batch the model ran at each).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve.py --model MODEL [--images FOLDER]

MODEL is a model saved by `python -m evaluation.run ... --save-model`; the images default to fruits' test images.
The targets: p50 at concurrency 1 <= 1.3x the bare batch-1 time per image, and throughput at concurrency 16
>= 80 % of the bare batch-16 throughput.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from evaluation import folders
from evaluation.data import resolve_data_root
from evaluation.saved_model import load_model

CONCURRENCY = (1, 4, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, cache_dir: str, image: bytes) -> tuple[subprocess.Popen, float]:
    """A server process and the seconds from its start to its first /predict answer (of ``image``)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "evaluation.serve", "--model", model, "--port", str(port),
                             "--cache-dir", cache_dir], stderr=subprocess.PIPE, text=True)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}:\n{proc.stderr.read()}")
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/predict", files={"image": ("first.jpg", image)}, timeout=60)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        if r.status_code != 200:
            raise SystemExit(f"/predict answered {r.status_code}: {r.text}")
        return proc, time.perf_counter() - start


def stop(proc: subprocess.Popen) -> int:
    """Stop the server; its peak resident memory in MiB, read before it goes."""
    peak_kib = 0
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak_kib = int(line.split()[1])
    proc.terminate()
    proc.wait(timeout=30)
    return peak_kib // 1024


async def load(port: int, images: list[bytes], concurrency: int, requests: int) -> tuple[list[float], float]:
    """``requests`` /predict calls, ``concurrency`` in flight at a time: (latency of each in s, wall s)."""
    latencies: list[float] = []
    next_request = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120) as client:
        async def worker():
            nonlocal next_request
            while next_request < requests:
                i = next_request
                next_request += 1
                start = time.perf_counter()
                r = await client.post("/predict", files={"image": (f"{i}.jpg", images[i % len(images)])})
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    raise SystemExit(f"/predict answered {r.status_code}: {r.text}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - start


def bare_seconds_per_image(model, images: list[bytes], batch: int, rounds: int) -> float:
    """Median over rounds of (decode + preprocess + forward of ``batch`` images) / batch."""
    times = []
    for r in range(rounds + 1):  # the first round warms up
        chosen = [images[(r * batch + j) % len(images)] for j in range(batch)]
        start = time.perf_counter()
        with torch.inference_mode():
            model.predict(torch.stack([model.decode(data, f"{j}.jpg") for j, data in enumerate(chosen)]))
        if r:
            times.append((time.perf_counter() - start) / batch)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", help="folder of images to send (default: fruits' test images)")
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level (default 96)")
    args = parser.parse_args()
    folder = Path(args.images or resolve_data_root() / "fruits" / "test_zip" / "test")
    files = [p for p in folders.list_files(folder) if p.suffix.lower() in folders.IMAGE_EXTENSIONS]
    if not files:
        raise SystemExit(f"--images {folder}: no images there")
    images = [p.read_bytes() for p in files]

    port = free_port()
    with tempfile.TemporaryDirectory() as cache:
        proc, cold = start_server(args.model, port, cache, images[0])  # the index embedded afresh
        stop(proc)
        proc, warm = start_server(args.model, port, cache, images[0])  # the index read from the cache
    try:
        rows = []
        for c in CONCURRENCY:
            asyncio.run(load(port, images, c, 2 * c))  # warm-up: connections, and the model at this batch size
            before = httpx.get(f"http://127.0.0.1:{port}/metadata").json()["batching"]
            latencies, wall = asyncio.run(load(port, images, c, args.requests))
            after = httpx.get(f"http://127.0.0.1:{port}/metadata").json()["batching"]
            mean_batch = (after["images"] - before["images"]) / max(1, after["batches"] - before["batches"])
            q = statistics.quantiles(latencies, n=20)
            rows.append((c, statistics.median(latencies), q[18], len(latencies) / wall, mean_batch))
    finally:
        peak = stop(proc)

    model = load_model(args.model)
    bare1 = bare_seconds_per_image(model, images, 1, 30)
    bare16 = bare_seconds_per_image(model, images, 16, 6)

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"model {args.model}, {len(images)} images from {folder}, {args.requests} requests per level, "
          f"OMP_NUM_THREADS={threads}, torch threads {torch.get_num_threads()}\n")
    print("| server | value |\n|---|---:|")
    print(f"| cold start to first answer (index embedded) | {cold:.1f} s |")
    print(f"| restart to first answer (index from cache) | {warm:.1f} s |")
    print(f"| peak RSS | {peak} MiB |\n")
    print("| /predict | p50 ms | p95 ms | throughput img/s | mean batch |\n|---|---:|---:|---:|---:|")
    for c, p50, p95, throughput, mean_batch in rows:
        print(f"| concurrency {c} | {1000 * p50:.1f} | {1000 * p95:.1f} | {throughput:.1f} | {mean_batch:.1f} |")
    print(f"| bare model, batch 1 | {1000 * bare1:.1f} per image | | {1 / bare1:.1f} | 1 |")
    print(f"| bare model, batch 16 | {1000 * bare16:.1f} per image | | {1 / bare16:.1f} | 16 |\n")
    p50_ratio = rows[0][1] / bare1
    throughput_ratio = rows[-1][3] * bare16
    print(f"p50 at concurrency 1 / bare batch-1 time: {p50_ratio:.2f}x (target <= 1.3x: "
          f"{'met' if p50_ratio <= 1.3 else 'NOT met'})")
    print(f"throughput at concurrency 16 / bare batch-16 throughput: {100 * throughput_ratio:.0f} % (target >= 80 %: "
          f"{'met' if throughput_ratio >= 0.8 else 'NOT met'})")


if __name__ == "__main__":
    main()
