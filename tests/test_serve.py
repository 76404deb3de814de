"""python -m evaluation.serve: real uvicorn processes on a tiny trained model, talked to over HTTP."""
import asyncio
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FRUITS = Path(os.environ.get("LOSSBANK_DATA") or ROOT.parent / "shared" / "datasets") / "fruits" / "train_zip" / "train"
CLASSES = ["apple", "banana", "orange"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model file, image folder): Lite0 frozen, cross-entropy, on 8 real photos of each of three fruits (6 train,
    2 valid). Real photos, not flat colours: their embeddings are far enough apart for nearest neighbours to be
    told apart."""
    tmp = tmp_path_factory.mktemp("serve")
    images = tmp / "images"
    for c in CLASSES:
        for i in range(1, 9):
            (images / ("train" if i <= 6 else "valid") / c).mkdir(parents=True, exist_ok=True)
            shutil.copy(FRUITS / f"{c}_{i}.jpg", images / ("train" if i <= 6 else "valid") / c)
    subprocess.run([sys.executable, "-m", "evaluation.run", "--data-dir", str(images), "--backbone",
                    "efficientnet_lite0", "--losses", "cross_entropy", "--epochs", "15", "--views", "1", "--hidden", "0",
                    "--save-model", "--out", str(tmp / "out"), "--cache-dir", str(tmp / "features"), "--no-progress"],
                   check=True, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL)
    (model,) = (tmp / "out").rglob("*.model.pt")
    return model, images


class Server:
    def __init__(self, model, *args, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "evaluation.serve", "--model", str(model),
                                          "--port", str(self.port), *map(str, args)],
                                         env=_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited: {log.read_text()}"
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"the server did not answer in 120 s: {log.read_text()}")

    def post(self, path, image: bytes, name="x.png", field="image", **kw):
        return httpx.post(f"{self.url}{path}", files={field: (name, image)}, timeout=60, **kw)

    def get(self, path):
        return httpx.get(f"{self.url}{path}", timeout=60).json()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(trained, tmp_path_factory):
    """The same index served with exact search (body limit 2 MiB) and, started second, with faiss."""
    model, images = trained
    tmp = tmp_path_factory.mktemp("servers")
    exact = Server(model, "--index", images, "--cache-dir", tmp / "index", "--max-body-mb", 2, log=tmp / "exact.log")
    try:
        faiss = Server(model, "--index", images, "--cache-dir", tmp / "index", "--index-backend", "faiss",
                       log=tmp / "faiss.log")
    except BaseException:
        exact.stop()
        raise
    yield exact, faiss
    exact.stop()
    faiss.stop()


def _read(images: Path, rel: str) -> bytes:
    return (images / rel).read_bytes()


@pytest.fixture(scope="module")
def loaded(trained):
    from evaluation.saved_model import load_model

    return load_model(trained[0])


def test_predict_similar_health_and_metadata(trained, servers, loaded):
    model, images = trained
    exact, _ = servers
    image = _read(images, "valid/banana/banana_7.jpg")
    r = exact.post("/predict", image)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    want = loaded.predict(loaded.decode(image, "x.png")[None])[0].topk(3)  # what the model says in this process
    assert [p["class"] for p in predictions] == [loaded.classes[i] for i in want.indices]
    assert [p["probability"] for p in predictions] == pytest.approx(want.values.tolist(), abs=1e-5)

    neighbours = exact.post("/similar?k=5", _read(images, "train/orange/orange_3.jpg")).json()["neighbours"]
    assert len(neighbours) == 5
    assert neighbours[0]["image"] == "train/orange/orange_3.jpg" and neighbours[0]["distance"] == pytest.approx(0, abs=1e-3)
    assert all(n["class"] == Path(n["image"]).parent.name and n["class_from"] == "folder" for n in neighbours)
    distances = [n["distance"] for n in neighbours]
    assert distances == sorted(distances)
    for n in neighbours:  # named relative to the index folder, never by where they lie on the server
        assert not Path(n["image"]).is_absolute() and (images / n["image"]).is_file()

    meta = exact.get("/metadata")
    assert meta["classes"] == CLASSES
    assert meta["model_hash"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert meta["loss"]["name"] == "cross_entropy" and meta["backbone"]["weights_hash"]
    assert meta["index"]["images"] == 24 and meta["index"]["folder"] == images.name
    assert str(images) not in r.text + str(meta)
    health = exact.get("/health")
    assert health["status"] == "ok" and health["requests"]["POST /predict 200"] >= 1


def test_faiss_finds_the_same_neighbours_as_exact_search(trained, servers):
    _, images = trained
    exact, faiss = servers
    assert faiss.get("/metadata")["index"] | {"build_seconds": 0} == {
        "folder": images.name, "images": 24, "backend": "faiss", "from_cache": True, "build_seconds": 0, "skipped": 0}
    for rel in ("train/apple/apple_1.jpg", "valid/banana/banana_7.jpg", "valid/orange/orange_8.jpg"):
        every = exact.post("/similar?k=24", _read(images, rel)).json()["neighbours"]
        distance = {n["image"]: n["distance"] for n in every}
        got = faiss.post("/similar?k=12", _read(images, rel)).json()["neighbours"]
        # The 12 nearest, as exact search ranks them; images at the same distance may come in either order.
        assert len({n["image"] for n in got}) == 12
        assert [n["distance"] for n in got] == pytest.approx([n["distance"] for n in every[:12]], abs=1e-5)
        assert [distance[n["image"]] for n in got] == pytest.approx([n["distance"] for n in got], abs=1e-5)


def _image_bytes(size, fmt="PNG", mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, fmt)
    return out.getvalue()


def _streamed_upload(size: int):
    """A multipart upload of ``size`` bytes sent in chunks, without a Content-Length: the limit must count them."""
    yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
    for _ in range(size // (64 << 10)):
        yield os.urandom(64 << 10)
    yield b"\r\n--b--\r\n"


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(trained, servers):
    _, images = trained
    exact, _ = servers
    good = _read(images, "valid/apple/apple_7.jpg")
    bad = [
        (lambda: exact.post("/predict", b"this is not an image", name="notes.txt"), 400, "notes.txt"),
        (lambda: exact.post("/predict", good[:len(good) // 2], name="half.png"), 400, "half.png"),
        (lambda: exact.post("/predict", b"", name="empty.png"), 400, "empty"),
        (lambda: exact.post("/predict", _image_bytes((10_000, 5_000), mode="L"), name="huge.png"), 413, "10000x5000"),
        (lambda: exact.post("/predict", good, field="file"), 422, "no field 'image'"),
        (lambda: httpx.post(f"{exact.url}/predict", content=good, headers={"content-type": "image/png"}), 415,
         "multipart/form-data"),
        (lambda: exact.post("/predict", os.urandom(3 << 20)), 413, "limit of 2097152 bytes"),
        (lambda: httpx.post(f"{exact.url}/predict", content=_streamed_upload(3 << 20), timeout=60,
                            headers={"content-type": "multipart/form-data; boundary=b"}), 413, "at least"),
        (lambda: exact.post("/similar?k=many", good), 422, "k must be"),
        (lambda: httpx.get(f"{exact.url}/predict"), 405, "POST /predict"),
    ]
    for send, status, words in bad:
        r = send()
        assert (r.status_code, words in r.json()["error"]) == (status, True), r.text
        assert exact.post("/predict", good).status_code == 200
    counts = exact.get("/health")["requests"]
    assert counts["POST /predict 400"] >= 3 and counts["POST /predict 413"] >= 2


def test_concurrent_requests_are_run_together_with_the_same_answers(trained, servers):
    _, images = trained
    exact, _ = servers
    rels = [f"valid/{c}/{c}_{i}.jpg" for c in CLASSES for i in (7, 8)] * 3
    alone = {rel: exact.post("/predict", _read(images, rel)).json() for rel in set(rels)}
    before = exact.get("/metadata")["batching"]

    async def all_at_once():
        async with httpx.AsyncClient(base_url=exact.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/predict", files={"image": ("x.png", _read(images, rel))})
                                          for rel in rels))

    answers = asyncio.run(all_at_once())
    after = exact.get("/metadata")["batching"]
    assert after["images"] - before["images"] == len(rels)
    assert after["batches"] - before["batches"] < len(rels) and after["largest_batch"] > 1
    for rel, r in zip(rels, answers):
        got, want = r.json()["predictions"], alone[rel]["predictions"]
        assert [p["class"] for p in got] == [p["class"] for p in want]
        assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in want], abs=2e-3)


def test_without_an_index_similar_answers_409_and_predict_still_works(trained, loaded):
    from fastapi.testclient import TestClient

    from evaluation import serve

    model, images = trained
    _, index, problem = serve.load_served(serve.build_parser().parse_args(["--model", str(model)]), progress=False)
    assert index is None and "--index FOLDER" in problem
    with TestClient(serve.create_app(loaded, None, index_problem=problem)) as client:
        image = {"image": ("x.png", _read(images, "valid/orange/orange_7.jpg"))}
        r = client.post("/similar", files=image)
        assert r.status_code == 409 and r.json()["error"] == problem
        assert client.post("/predict", files=image).status_code == 200


@pytest.mark.parametrize("args, words", [
    (["--model", "nowhere.pt"], "cannot read model nowhere.pt"),
    (["--index", "no-such-folder"], "is not a folder"),
])
def test_command_line_mistakes_exit_with_one_line(trained, args, words, tmp_path, monkeypatch, capsys):
    from evaluation import serve

    monkeypatch.chdir(tmp_path)
    model, _ = trained
    with pytest.raises(SystemExit) as exc:
        serve.main(["--model", str(model), *args])
    assert words in str(exc.value) and "\n" not in str(exc.value)
