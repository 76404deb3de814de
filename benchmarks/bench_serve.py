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
ROUNDS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, cache_dir: str, image: bytes) -> tuple[subprocess.Popen, float]:
    """A server process and the seconds from its start to its first /predict answer (of ``image``)."""
    log = Path(cache_dir) / "server.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "evaluation.serve", "--model", model, "--port", str(port),
                                 "--cache-dir", cache_dir], stdout=out, stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}:\n{log.read_text()}")
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


async def load(client: httpx.AsyncClient, images: list[bytes], concurrency: int, requests: int):
    """``requests`` /predict calls, ``concurrency`` in flight at a time: (latency of each in s, wall s)."""
    latencies: list[float] = []
    next_request = 0

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


def bare_seconds_per_image(model, images: list[bytes], batch: int, repeats: int, first: int = 0) -> list[float]:
    """(decode + preprocess + forward of ``batch`` images) / batch, timed ``repeats`` times, images from ``first`` on."""
    times = []
    for r in range(repeats):
        chosen = [images[(first + r * batch + j) % len(images)] for j in range(batch)]
        start = time.perf_counter()
        with torch.inference_mode():
            model.predict(torch.stack([model.decode(data, f"{j}.jpg") for j, data in enumerate(chosen)]))
        times.append((time.perf_counter() - start) / batch)
    return times


async def measure(port: int, model, images: list[bytes], requests: int) -> tuple[list[tuple], dict, dict]:
    """Per concurrency (c, p50, p95, throughput, mean batch); bare model {batch: median s per image}; and
    {batch: median over rounds of the paired ratio} (p50 at c=1 / bare batch 1, throughput at c=16 / bare batch 16).

    Each level runs in ROUNDS rounds, each followed by the bare model at the matching batch size, so that both
    sides of a ratio are timed within seconds of each other on this shared, drifting CPU.
    """
    limits = httpx.Limits(max_connections=max(CONCURRENCY), max_keepalive_connections=max(CONCURRENCY))
    rows, bare, ratios = [], {}, {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120) as client:
        for c in CONCURRENCY:
            batch = {1: 1, max(CONCURRENCY): 16}.get(c)
            await load(client, images, c, 2 * c)  # warm-up: connections, and the model at this batch size
            if batch:
                bare_seconds_per_image(model, images, batch, 1)
            before = (await client.get("/metadata")).json()["batching"]
            latencies, wall, bare_times, paired = [], 0.0, [], []
            for r in range(ROUNDS):
                lat, seconds = await load(client, images, c, max(2 * c, requests // ROUNDS))
                latencies += lat
                wall += seconds
                if batch:
                    times = bare_seconds_per_image(model, images, batch, 8 if batch == 1 else 1, first=r * 16)
                    bare_times += times
                    b = statistics.median(times)
                    paired.append(statistics.median(lat) / b if batch == 1 else len(lat) / seconds * b)
            after = (await client.get("/metadata")).json()["batching"]
            mean_batch = (after["images"] - before["images"]) / max(1, after["batches"] - before["batches"])
            q = statistics.quantiles(latencies, n=20)
            rows.append((c, statistics.median(latencies), q[18], len(latencies) / wall, mean_batch))
            if batch:
                bare[batch] = statistics.median(bare_times)
                ratios[batch] = statistics.median(paired)
    return rows, bare, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", help="folder of images to send (default: fruits' test images)")
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level (default 96; at "
                                                                "least 2 x concurrency per round)")
    args = parser.parse_args()
    folder = Path(args.images or resolve_data_root() / "fruits" / "test_zip" / "test")
    files = [p for p in folders.list_files(folder) if p.suffix.lower() in folders.IMAGE_EXTENSIONS]
    if not files:
        raise SystemExit(f"--images {folder}: no images there")
    images = [p.read_bytes() for p in files]
    model = load_model(args.model)

    port = free_port()
    with tempfile.TemporaryDirectory() as cache:
        proc, cold = start_server(args.model, port, cache, images[0])  # the index embedded afresh
        stop(proc)
        proc, warm = start_server(args.model, port, cache, images[0])  # the index read from the cache
        try:
            rows, bare, ratios = asyncio.run(measure(port, model, images, args.requests))
        finally:
            peak = stop(proc)

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"model {args.model}, {len(images)} images from {folder}, OMP_NUM_THREADS={threads}, "
          f"torch threads {torch.get_num_threads()}, {ROUNDS} rounds per level\n")
    print("| server | value |\n|---|---:|")
    print(f"| cold start to first answer (index embedded) | {cold:.1f} s |")
    print(f"| restart to first answer (index from cache) | {warm:.1f} s |")
    print(f"| peak RSS | {peak} MiB |\n")
    print("| /predict | p50 ms | p95 ms | throughput img/s | mean batch |\n|---|---:|---:|---:|---:|")
    for c, p50, p95, throughput, mean_batch in rows:
        print(f"| concurrency {c} | {1000 * p50:.1f} | {1000 * p95:.1f} | {throughput:.1f} | {mean_batch:.1f} |")
    for batch, seconds in bare.items():
        print(f"| bare model, batch {batch} | {1000 * seconds:.1f} per image | | {1 / seconds:.1f} | {batch} |")
    p50_ratio, throughput_ratio = ratios[1], ratios[16]
    print(f"\np50 at concurrency 1 / bare batch-1 time (median of paired rounds): {p50_ratio:.2f}x "
          f"(target <= 1.3x: {'met' if p50_ratio <= 1.3 else 'NOT met'})")
    print(f"throughput at concurrency 16 / bare batch-16 throughput (median of paired rounds): "
          f"{100 * throughput_ratio:.0f} % (target >= 80 %: {'met' if throughput_ratio >= 0.8 else 'NOT met'})")


if __name__ == "__main__":
    main()
