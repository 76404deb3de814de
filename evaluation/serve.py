"""python -m evaluation.serve: a saved model behind HTTP (FastAPI on uvicorn).

    python -m evaluation.serve --model out/runs/.../model.pt [--index FOLDER] [--host 127.0.0.1] [--port 8000]

``POST /predict`` (multipart field ``image``) answers the top-3 classes with their
probabilities; ``POST /similar?k=5`` the k nearest images of an index (``--index FOLDER``,
else the model's training images), each named by its path relative to the index folder,
with its class and distance; ``GET /health`` and ``GET /metadata``.

Requests are decoded in the request handlers (a thread pool), then queued (bounded) for one
model thread, which runs everything queued together as one batch (up to ``--max-batch``,
waiting at most ``--max-wait-ms`` for more): under load the model runs full batches, alone it
runs each request as it comes. A bad request gets a 4xx JSON ``{"error": ...}`` naming the
problem, and the server goes on serving.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import pathlib
import queue
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from torch import Tensor

from . import folders
from .files import WriteError, write_atomically
from .images import ImageDecodeError, ImageTooLargeError, decode_image_bytes

FIELD = "image"  # the multipart field the image comes in
TOP = 3  # classes /predict answers
MAX_K = 100  # the most neighbours /similar answers
DEFAULT_CACHE_DIR = "~/.cache/lossbank/index"
# Part of the index cache key: bump when what an index entry holds, or how it is computed, changes.
INDEX_VERSION = 1
INDEX_BATCH = 16  # images embedded at once while building an index
BACKENDS = ("exact", "faiss")
# HNSW's breadth of search: with at least this many candidates it finds the exact neighbours
# of indexes of many thousands of images (the test checks it against exact search).
HNSW_LINKS, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128


class ServeError(Exception):
    """A request cannot be answered as sent: ``status`` is its HTTP code, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# Batching: one model thread runs whatever requests are queued as one batch

class Batcher:
    """Runs ``run(stacked images)`` on a thread of its own, for as many queued images at once as it can.

    ``run`` takes a uint8 tensor (N, 3, S, S) and returns tensors whose rows answer the images
    in order. The queue is bounded: a request that finds it full is refused (503) at once
    instead of waiting behind minutes of work. A batch waits (up to max_wait) for more images only
    while requests are on their way (``coming``: being read and decoded), so a lone request never waits.
    """

    def __init__(self, run, *, max_batch: int = 16, max_wait_ms: float = 2.0, queue_size: int = 64):
        self._run = run
        self.max_batch, self.max_wait, self.queue_size = max_batch, max_wait_ms / 1000.0, queue_size
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self.batch_sizes: Counter = Counter()  # batch size -> how many batches of that size ran
        self._coming = 0  # requests being read and decoded, whose images will be submitted soon
        self._thread = threading.Thread(target=self._loop, name="lossbank-model", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def coming(self):
        """Around reading and decoding a request: while it lasts, a batch about to run waits for its image."""
        with self._lock:
            self._coming += 1
        try:
            yield
        finally:
            with self._lock:
                self._coming -= 1

    def submit(self, image: Tensor) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put_nowait((image, future))
        except queue.Full:
            raise ServeError(503, f"the server is busy: {self.queue_size} images are already waiting for the "
                                  f"model; retry in a moment") from None
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def stats(self) -> dict:
        with self._lock:
            sizes = dict(sorted(self.batch_sizes.items()))
        return {"max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000, "queue_size": self.queue_size,
                "queued": self._queue.qsize(), "batches": sum(sizes.values()),
                "images": sum(size * n for size, n in sizes.items()), "largest_batch": max(sizes, default=0),
                "batch_sizes": {str(size): n for size, n in sizes.items()}}

    def _take(self) -> list | None:
        """The next batch: the first queued item (waiting for it), everything else already queued, and, while
        requests are coming, what arrives within max_wait of the first; up to max_batch. None when closed."""
        first = self._queue.get()
        if first is None:
            return None
        items = [first]
        deadline = time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._coming:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:  # closing: answer what was taken, then stop
                self._queue.put(None)
                break
            items.append(item)
        return items

    def _loop(self) -> None:
        while (items := self._take()) is not None:
            futures = [f for _, f in items if f.set_running_or_notify_cancel()]
            images = [image for image, f in items if f.running()]
            if not images:
                continue
            try:
                outputs = self._run(torch.stack(images))
            except Exception as exc:  # answered to every request of the batch as a 500, naming the error
                for f in futures:
                    f.set_exception(exc)
                continue
            with self._lock:
                self.batch_sizes[len(images)] += 1
            for i, f in enumerate(futures):
                f.set_result(tuple(out[i] for out in outputs))


# ---------------------------------------------------------------------------
# The index /similar searches

def _images_under(root: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in folders.list_files(root) if folders.is_image_name(p)]


def folder_class(rel: str, classes: list[str]) -> str | None:
    """The class the folders on an image's path name: the nearest folder whose name (as the harness reads class
    folder names) is one of the model's classes, so DIR/<class>/x.jpg and DIR/train/<class>/x.jpg both count;
    None when no folder does."""
    known = set(classes)
    for folder in reversed(pathlib.PurePosixPath(rel).parts[:-1]):
        name = folders.canonical_class(folder)
        if name in known:
            return name
    return None


@dataclass
class ImageIndex:
    """Embeddings of the images of a folder, searched by Euclidean distance between L2-normalised embeddings
    (sqrt(2 - 2 cos), between 0 and 2): exactly, or approximately with faiss's HNSW graph."""
    root: str
    names: list[str]  # paths relative to root, posix
    classes: list[str]
    class_sources: list[str]  # "folder" (named by a folder on its path) or "predicted" (the model's top class)
    embeddings: Tensor  # (N, D) float32, L2-normalised
    skipped: list[str]  # files that would not decode, with the reason
    backend: str = "exact"
    from_cache: bool = False
    build_seconds: float = 0.0
    _faiss = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"index backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "faiss":
            import faiss  # the command line checks it is installed (_check_args)

            index = faiss.IndexHNSWFlat(self.embeddings.shape[1], HNSW_LINKS)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.add(self.embeddings.numpy())
            self._faiss = index

    def __len__(self) -> int:
        return len(self.names)

    def search(self, query: Tensor, k: int) -> list[tuple[int, float]]:
        """The k nearest images to one embedding: (row, distance), nearest first."""
        k = min(k, len(self))
        q = torch.nn.functional.normalize(query.float().reshape(1, -1), dim=1)
        if self._faiss is not None:
            import faiss

            params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, k))
            squared, rows = self._faiss.search(q.numpy(), k, params=params)
            return [(int(r), float(max(d, 0.0)) ** 0.5) for r, d in zip(rows[0], squared[0]) if r >= 0]
        distances = torch.cdist(q, self.embeddings)[0]
        order = torch.sort(distances, stable=True).indices[:k]
        return [(int(r), float(distances[r])) for r in order]

    def describe(self) -> dict:
        # The folder's name, not its path: answers never show where files lie on the server.
        return {"folder": pathlib.Path(self.root).name, "images": len(self), "backend": self.backend, "from_cache": self.from_cache,
                "build_seconds": round(self.build_seconds, 2), "skipped": len(self.skipped)}


def _index_key(model_hash: str, listing: list) -> str:
    text = json.dumps({"version": INDEX_VERSION, "model": model_hash, "files": listing})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def build_index(model, root, *, backend: str = "exact", cache_dir=DEFAULT_CACHE_DIR, labels: dict | None = None,
                progress: bool = False) -> ImageIndex:
    """The index of every image under ``root`` (or of the images ``labels`` names), each named by its path relative
    to root.

    An image's class is given by ``labels`` (relative path -> class: a training split's), else by a folder on its
    path (``folder_class``), else it is the model's prediction. The embeddings are kept in ``cache_dir``
    under the model's hash and the folder's listing (paths, sizes, modification times), so a restart on the same
    files embeds nothing.
    """
    start = time.perf_counter()
    root = pathlib.Path(root).expanduser().absolute()
    if not root.is_dir():
        raise ServeError(400, f"--index {root} is not a folder; give a folder of images (class folders or not)")
    if labels is not None:
        rels = sorted(labels, key=folders.natural_key)
        paths = [root / rel for rel in rels]
    else:
        paths = _images_under(root)
        rels = [folders.relative(p, root) for p in paths]
    if not paths:
        raise ServeError(400, f"--index {root} holds no images (files ending in {', '.join(folders.IMAGE_EXTENSIONS)})")
    listing = []
    for rel, p in zip(rels, paths):
        st = p.stat()
        listing.append([rel, st.st_size, st.st_mtime_ns, (labels or {}).get(rel)])
    cache_file = (pathlib.Path(cache_dir).expanduser() / f"{_index_key(model.metadata['model_hash'], listing)}.pt"
                  if cache_dir else None)
    if cache_file is not None and cache_file.is_file():
        try:
            entry = torch.load(cache_file, map_location="cpu", weights_only=True)
            return ImageIndex(str(root), entry["names"], entry["classes"], entry["class_sources"], entry["embeddings"],
                              entry["skipped"], backend, True, time.perf_counter() - start)
        except Exception as exc:  # a damaged cache file only costs its reuse
            warnings.warn(f"cannot read the index cache {cache_file} ({type(exc).__name__}: {exc}); embedding afresh")
    names, classes, sources, skipped, rows = [], [], [], [], []
    batch: list[tuple[str, Tensor]] = []

    def flush():
        probs, emb = model.predict_and_embed(torch.stack([image for _, image in batch]))
        for (rel, _), p, e in zip(batch, probs, emb):
            named = (labels or {}).get(rel) or folder_class(rel, model.classes)
            names.append(rel)
            classes.append(named or model.classes[int(p.argmax())])
            sources.append("folder" if named else "predicted")
            rows.append(e.float())
        batch.clear()

    for i, (rel, p) in enumerate(zip(rels, paths)):
        try:
            batch.append((rel, model.decode(p.read_bytes(), rel)))
        except (ImageDecodeError, OSError) as exc:
            skipped.append(f"{rel}: {exc}")
        if len(batch) == INDEX_BATCH:
            flush()
        if progress and (i + 1) % 200 == 0:
            print(f"indexing {root}: {i + 1} of {len(paths)} images", file=sys.stderr, flush=True)
    if batch:
        flush()
    if not rows:
        raise ServeError(400, f"--index {root}: none of its {len(paths)} images decodes; first: {skipped[0]}")
    if skipped:
        warnings.warn(f"--index {root}: {len(skipped)} of {len(paths)} images cannot be decoded and are left out: "
                      + "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else ""))
    embeddings = torch.nn.functional.normalize(torch.stack(rows), dim=1).contiguous()
    if cache_file is not None:
        entry = {"names": names, "classes": classes, "class_sources": sources, "embeddings": embeddings,
                 "skipped": skipped}
        try:
            write_atomically(cache_file, lambda tmp: torch.save(entry, tmp))
        except WriteError as exc:
            warnings.warn(f"{exc}; the index is embedded again at the next start")
    return ImageIndex(str(root), names, classes, sources, embeddings, skipped, backend, False,
                      time.perf_counter() - start)


# ---------------------------------------------------------------------------
# The app

class _Guard:
    """Pure ASGI middleware: refuses a body over ``max_body`` bytes (413, by its Content-Length before reading it,
    or as it streams in), and counts the answers by route and status for /health and /metadata."""

    def __init__(self, app, *, max_body: int, counts: Counter, routes: set):
        self.app, self.max_body, self.counts, self.routes = app, max_body, counts, routes

    def _too_large(self, size: int, streamed: bool) -> ServeError:
        return ServeError(413, f"the request body is {'at least ' if streamed else ''}{size} bytes, over this "
                               f"server's limit of {self.max_body} bytes (--max-body-mb); send a smaller image")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # raised inside the handler: the app answers it as a ServeError
                    raise self._too_large(seen, streamed=True)
            return message

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await JSONResponse({"error": str(self._too_large(int(length), streamed=False))}, 413)(scope, receive, send_counted)
                return
            await self.app(scope, receive_limited, send_counted)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.counts[f"{scope['method']} {route} {status}"] += 1


def create_app(model, index: ImageIndex | None = None, *, index_problem: str = "", max_batch: int = 16,
               max_wait_ms: float = 2.0, queue_size: int = 64, max_body_bytes: int = 32 << 20,
               max_pixels: int = 40_000_000):
    """The FastAPI app serving ``model`` (an evaluation.saved_model.SavedModel) and, for /similar, ``index``.

    Without an index /similar answers 409 with ``index_problem`` (why there is none). The model thread starts
    here and stops when the app shuts down.
    """
    classes = list(model.classes)

    def run_model(images: Tensor):
        with torch.inference_mode():
            return model.predict_and_embed(images)

    batcher = Batcher(run_model, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size)
    counts: Counter = Counter()
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="lossbank", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, max_body=max_body_bytes, counts=counts,
                       routes={"/predict", "/similar", "/health", "/metadata"})

    @app.exception_handler(ServeError)
    async def refused(request, exc: ServeError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"error": str(exc)}, exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # unknown routes and methods, in the same JSON shape
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}; this server answers "
                                      f"POST /predict, POST /similar?k=5, GET /health and GET /metadata"},
                            exc.status_code)

    def decode(data: bytes, name: str) -> Tensor:
        if not data:
            raise ServeError(400, f"the file '{name}' in the field '{FIELD}' is empty (0 bytes); send an image")
        try:
            # As SavedModel.decode decodes, with this server's pixel limit.
            return decode_image_bytes(data, max_pixels, size=model.decode_size, name=name)
        except ImageTooLargeError as exc:
            raise ServeError(413, str(exc)) from None
        except ImageDecodeError as exc:
            raise ServeError(400, str(exc)) from None

    async def read_image(request: Request) -> Tensor:
        kind = request.headers.get("content-type", "")
        if not kind.startswith("multipart/form-data"):
            raise ServeError(415, f"send the image as multipart/form-data in the field '{FIELD}' "
                                  f"(curl -F {FIELD}=@photo.jpg), not as {kind or 'a body without a content type'}")
        try:
            async with request.form(max_files=1, max_fields=16) as form:
                upload = form.get(FIELD)
                if upload is None:
                    found = ", ".join(f"'{k}'" for k in form.keys()) or "no fields"
                    raise ServeError(422, f"no field '{FIELD}' in the form (it has {found}); send the image as "
                                          f"-F {FIELD}=@photo.jpg")
                if isinstance(upload, str):
                    raise ServeError(422, f"the field '{FIELD}' holds text, not a file; send the file: "
                                          f"-F {FIELD}=@photo.jpg")
                data = await upload.read()
                name = upload.filename or FIELD
        except MultiPartException as exc:
            raise ServeError(400, f"the multipart body cannot be read: {exc}") from None
        return await run_in_threadpool(decode, data, name)

    @app.post("/predict")
    async def predict(request: Request):
        with batcher.coming():
            image = await read_image(request)
        future = batcher.submit(image)
        probs, _ = await asyncio.wrap_future(future)
        top = probs.float().topk(min(TOP, len(classes)))
        return {"predictions": [{"class": classes[i], "probability": round(p, 6)}
                                for p, i in zip(top.values.tolist(), top.indices.tolist())]}

    @app.post("/similar")
    async def similar(request: Request):
        if index is None:
            raise ServeError(409, index_problem or "this server has no index to search; start it with --index FOLDER")
        text = request.query_params.get("k", "5")
        if not text.isdigit() or not 1 <= int(text) <= MAX_K:
            raise ServeError(422, f"k must be a whole number from 1 to {MAX_K}, got '{text}'")
        with batcher.coming():
            image = await read_image(request)
        future = batcher.submit(image)
        _, embedding = await asyncio.wrap_future(future)
        found = await run_in_threadpool(index.search, embedding, int(text))
        return {"neighbours": [{"image": index.names[row], "class": index.classes[row],
                                "class_from": index.class_sources[row], "distance": round(distance, 6)}
                               for row, distance in found]}

    def served() -> dict:
        return {"uptime_s": round(time.time() - started, 1), "requests": dict(sorted(counts.items()))}

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": batcher.stats()["queued"], **served()}

    @app.get("/metadata")
    async def metadata():
        return {**model.metadata, "classes": classes,
                "index": index.describe() if index is not None else {"error": index_problem},
                "batching": batcher.stats(), **served()}

    return app


# ---------------------------------------------------------------------------
# The command line

EXAMPLES = """\
examples:
  # the model a run saved, its training images as the index of /similar
  python -m evaluation.serve --model out/runs/fruits/efficientnet_lite0-frozen/cross_entropy-seed0.model.pt
  # another folder of images as the index, searched with faiss (HNSW), 2 server processes, reachable from outside
  python -m evaluation.serve --model MODEL --index ~/catalogue --index-backend faiss --workers 2 --host 0.0.0.0
  # then
  curl -F image=@photo.jpg http://127.0.0.1:8000/predict
  curl -F image=@photo.jpg 'http://127.0.0.1:8000/similar?k=5'
"""

# --workers > 1 starts each server process from an import string, so they find the command line here.
ARGV_ENV = "LOSSBANK_SERVE_ARGV"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.serve", description=__doc__.splitlines()[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="PATH", help="a model saved by python -m evaluation.run --save-model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                                                      "0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own copy of the model "
                                                        "and a share of the CPU threads (default 1)")
    p.add_argument("--index", metavar="FOLDER", help="images /similar searches (default: the model's training images)")
    p.add_argument("--index-backend", choices=BACKENDS, default="exact",
                   help="exact search, or faiss's HNSW graph for catalogues too large for it (default exact)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, metavar="DIR",
                   help=f"where index embeddings are kept between starts (default {DEFAULT_CACHE_DIR}); '' = nowhere")
    p.add_argument("--max-batch", type=int, default=16, help="the most images one forward pass takes (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a batch waits for more images before it runs (default 2)")
    p.add_argument("--queue-size", type=int, default=64, help="images waiting for the model before requests are "
                                                             "refused with 503 (default 64)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32)")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="largest image, in pixels (default 40)")
    return p


def _check_args(parser, args) -> None:
    for name, value, low in (("--workers", args.workers, 1), ("--max-batch", args.max_batch, 1),
                             ("--queue-size", args.queue_size, 1)):
        if value < low:
            parser.error(f"{name} must be at least {low}, got {value}")
    for name, value in (("--max-body-mb", args.max_body_mb), ("--max-megapixels", args.max_megapixels)):
        if not value > 0:
            parser.error(f"{name} must be positive, got {value}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, got {args.port}")
    if not args.max_wait_ms >= 0:
        parser.error(f"--max-wait-ms must be 0 or more, got {args.max_wait_ms}")
    if args.index_backend == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            parser.error("--index-backend faiss needs the faiss-cpu package: pip install faiss-cpu (or the eval extra)")


def training_index_folder(model):
    """(folder, {relative path: class}) of the training images of a model trained on a named dataset, when they are
    on this machine (under $LOSSBANK_DATA, as the harness finds them), else (None, why not)."""
    from . import data

    name = str(model.metadata.get("dataset", "")).removesuffix("-dedup")
    if name not in data.DATASETS:
        return None, (f"no index: the model was trained on {name or 'a dataset it does not name'}, not a named "
                      f"dataset whose images this server can find; start it with --index FOLDER")
    try:
        splits = data.load_dataset(name)
    except data.DatasetError as exc:
        return None, (f"no index: the model's training images ({name}) are not available here "
                      f"({str(exc).splitlines()[0]}); start the server with --index FOLDER")
    root = pathlib.Path(splits.root)
    return root, {folders.relative(pathlib.Path(s.path), root): splits.classes[s.label] for s in splits.train}


def load_served(args, *, progress: bool):
    """The model and the index (or why there is none) a command line asks for; errors exit with one line."""
    from .saved_model import ModelFileError, load_model

    try:
        model = load_model(args.model)
    except ModelFileError as exc:
        raise SystemExit(f"python -m evaluation.serve: error: --model: {exc}") from None
    labels, folder, problem = None, args.index, ""
    if folder is None:
        folder, found = training_index_folder(model)
        if folder is None:
            return model, None, found
        labels = found
    try:
        index = build_index(model, folder, backend=args.index_backend, cache_dir=args.cache_dir or None,
                            labels=labels, progress=progress)
    except ServeError as exc:
        if args.index is None:  # the training images are gone or unusable: serve /predict anyway
            return model, None, f"no index: {exc}; start the server with --index FOLDER"
        raise SystemExit(f"python -m evaluation.serve: error: {exc}") from None
    return model, index, problem


def _app(args, model, index, problem):
    return create_app(model, index, index_problem=problem, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                      queue_size=args.queue_size, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                      max_pixels=int(args.max_megapixels * 1_000_000))


def app_from_environment():
    """One of --workers server processes: the app of the command line main() left in the environment (the index
    comes from the cache main() filled)."""
    args = build_parser().parse_args(json.loads(os.environ[ARGV_ENV]))
    # Processes share the cores: never more threads each than their share (nor than OMP_NUM_THREADS allows).
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // args.workers)))
    return _app(args, *load_served(args, progress=False))


def main(argv=None) -> int:
    import uvicorn

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    model, index, problem = load_served(args, progress=True)
    where = (f"{len(index)} images of {index.root} ({index.backend}"
             f"{', from the cache' if index.from_cache else ''})" if index is not None else problem)
    print(f"serving {args.model} ({len(model.classes)} classes) on http://{args.host}:{args.port}; "
          f"/similar: {where}", file=sys.stderr, flush=True)
    if args.workers == 1:
        uvicorn.run(_app(args, model, index, problem), host=args.host, port=args.port, log_level="warning")
    else:
        del model, index
        os.environ[ARGV_ENV] = json.dumps(argv)
        uvicorn.run("evaluation.serve:app_from_environment", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
