"""The web demo through its real HTTP API (gradio_client) and its engine, on the tiny pipeline.

One server per module (starting gradio costs seconds); a second, deliberately slow one with a queue
of one checks that overload is refused with a message rather than piling up.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from customshift import webui  # noqa: E402
from customshift.errors import CustomShiftError, ImageLoadError  # noqa: E402
from customshift.reference import SubjectEmbedding  # noqa: E402
from customshift.tiny import build_tiny_pipeline  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CountingPipeline:
    """Delegates to the real pipeline, recording how many generations overlap (must stay 1)."""

    def __init__(self, pipe, delay: float = 0.0) -> None:
        self._pipe, self._delay = pipe, delay
        self._lock = threading.Lock()
        self.active = self.peak = self.calls = self.encodes = 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def encode_subject(self, *args, **kwargs):
        self.encodes += 1
        return self._pipe.encode_subject(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)
        try:
            if self._delay:
                time.sleep(self._delay)
            return self._pipe(*args, **kwargs)
        finally:
            with self._lock:
                self.active -= 1


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pipeline("sd3")


@pytest.fixture(scope="module")
def server(tiny_pipe):
    counting = CountingPipeline(tiny_pipe)
    demo = webui.create_app(counting, notice=webui.TINY_NOTICE, model_name="tiny", examples=2, max_queue=16)
    url = webui.launch(demo, "127.0.0.1", free_port(), block=False, quiet=True)
    client = Client(url, verbose=False)
    yield types.SimpleNamespace(demo=demo, url=url, client=client, pipe=counting, engine=demo.customshift_engine)
    demo.close()


def png(path: Path, size: tuple[int, int] = (48, 48), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def args(refs, subject="robot", prompts="a robot on the beach", shift=1.0, cfg=7.0, ref_cfg=0.0, steps=2,
         seed=3, width=32, height=32, num=1):
    return ([handle_file(str(r)) for r in refs], subject, prompts, shift, cfg, ref_cfg, steps, seed, width, height,
            num)


def refused(client: Client, *arguments) -> str:
    with pytest.raises(Exception) as info:
        client.predict(*arguments, api_name="/generate")
    return str(info.value)


# ------------------------------------------------------------------------------------------------------
# Through the HTTP API


def test_generate_gallery_parameters_downloads_and_cache(server, tmp_path):
    ref = png(tmp_path / "ref.png")
    gallery, status, files, params, params_file = server.client.predict(
        *args([ref], prompts="a robot on the beach\na robot in the snow", seed=7, num=1), api_name="/generate"
    )
    assert len(gallery) == 2 and all(Path(item["image"]).is_file() for item in gallery)
    assert Image.open(gallery[0]["image"]).size == (32, 32)
    assert "seed 7" in gallery[0]["caption"] and "seed 8" in gallery[1]["caption"]
    assert "shift 1" in gallery[0]["caption"] and "a robot in the snow" in gallery[1]["caption"]
    assert [p["seed"] for p in params] == [7, 8] and params[0]["num_inference_steps"] == 2
    assert json.loads(Path(params_file).read_text()) == params
    assert len(files) == 3 and sum(f.endswith(".png") for f in files) == 2
    embedded = json.loads(Image.open(files[0]).text["customshift"])
    assert embedded == params[0]
    assert "computed" in status

    encodes = server.pipe.encodes
    *_, status2, _, params2, _ = server.client.predict(*args([ref], seed=7), api_name="/generate")
    assert "reused from the cache" in status2 and server.pipe.encodes == encodes
    # Same seed and settings: the same image (generation is reproducible from the caption).
    assert params2[0]["seed"] == 7


def test_page_shows_tiny_model_notice_and_examples(server):
    config = httpx.get(server.url + "config", timeout=10).text
    assert "No default model installed: random tiny model" in config
    assert "held-out synthetic subjects" in config


def test_concurrent_requests_all_complete_one_at_a_time(server, tmp_path):
    refs = [png(tmp_path / f"r{i}.png", seed=i % 3) for i in range(6)]
    jobs = [server.client.submit(*args([r], seed=i, steps=3), api_name="/generate") for i, r in enumerate(refs)]
    results = [job.result(timeout=60) for job in jobs]
    assert all(len(r[0]) == 1 for r in results)
    assert sorted(r[3][0]["seed"] for r in results) == list(range(6))
    assert server.pipe.peak == 1  # never two generations at once


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prompts": "a robot\na robot on the beach\na robot in the snow", "num": 2}, "limit is 4 images per request"),
        ({"prompts": "  \n "}, "the prompt is empty"),
        ({"subject": "  "}, "the subject name is missing"),
        ({"width": 30}, "width must be a multiple of 4"),
        ({"steps": 0}, "less than minimum value 1"),  # the slider's own bound, checked by gradio
    ],
)
def test_limits_refused_with_clear_messages(server, tmp_path, overrides, message):
    ref = png(tmp_path / "ref.png")
    calls = server.pipe.calls
    assert message in refused(server.client, *args([ref], **overrides))
    assert server.pipe.calls == calls


def test_no_reference_and_bad_images_refused(server, tmp_path):
    assert "no reference image" in refused(server.client, [], "robot", "a robot", 1.0, 7.0, 0.0, 2, 0, 32, 32, 1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    assert "broken.png" in refused(server.client, *args([broken]))
    # A small file whose header claims a side longer than max_side: refused before decoding.
    long = png(tmp_path / "long.png", size=(5000, 8))
    assert "longer than 4096" in refused(server.client, *args([long]))
    too_many = [png(tmp_path / f"m{i}.png") for i in range(5)]
    assert "limit is 4 per request" in refused(server.client, *args(too_many))


def test_oversized_upload_refused(server, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (10 * 1024 * 1024 + 10))
    # gradio_client knows the server's limit and refuses to send it ...
    assert "exceeds the maximum file size" in refused(server.client, *args([big]))
    # ... and the server's upload route refuses it anyway (a browser or curl does not check).
    with big.open("rb") as handle:
        response = httpx.post(server.url + "gradio_api/upload", files={"files": ("big.png", handle)}, timeout=30)
    assert response.status_code == 413 and "maximum allowed size" in response.text


def _raw_call(url: str, data: list) -> str:
    base = url + "gradio_api/call/generate"
    event = httpx.post(base, json={"data": data}, timeout=10).json()["event_id"]
    return httpx.get(f"{base}/{event}", timeout=30).text


def test_no_endpoint_reads_arbitrary_server_paths(server, tmp_path):
    secret = png(tmp_path / "secret.png")  # a valid image, outside gradio's upload folder
    calls = server.pipe.calls
    for path in (str(secret), "/etc/passwd", "../../../etc/passwd"):
        reply = _raw_call(server.url, [[{"path": path, "meta": {"_type": "gradio.FileData"}}], "robot",
                                       "a robot", 1.0, 7.0, 0.0, 2, 0, 32, 32, 1, None, ""])
        assert "event: error" in reply and "complete" not in reply
    assert server.pipe.calls == calls
    for path in ("/etc/passwd", str(secret), str(Path.cwd() / "pyproject.toml")):
        assert httpx.get(server.url + "gradio_api/file=" + path, timeout=10).status_code == 403


def test_full_queue_refuses_with_a_message(tiny_pipe, tmp_path):
    slow = CountingPipeline(tiny_pipe, delay=0.4)
    demo = webui.create_app(slow, examples=0, max_queue=1)
    url = webui.launch(demo, "127.0.0.1", free_port(), block=False, quiet=True)
    try:
        client = Client(url, verbose=False)
        ref = png(tmp_path / "ref.png")

        def one(seed: int) -> str:
            try:
                client.predict(*args([ref], seed=seed), api_name="/generate")
                return "ok"
            except Exception as error:  # noqa: BLE001 — the message is what is checked
                return str(error)

        with cf.ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(one, range(6)))
        assert "ok" in outcomes
        assert all(o == "ok" or "Queue is full" in o for o in outcomes), outcomes
        assert any("Queue is full" in o for o in outcomes)
        assert slow.peak == 1
    finally:
        demo.close()


# ------------------------------------------------------------------------------------------------------
# Engine and helpers (no server)


def test_engine_refuses_oversized_file_before_decoding(tiny_pipe, tmp_path, monkeypatch):
    engine = webui.DemoEngine(tiny_pipe, webui.Limits(max_upload_mb=0.001), output_dir=tmp_path / "out")
    ref = png(tmp_path / "big.png", size=(64, 64))
    assert ref.stat().st_size > 1100
    monkeypatch.setattr(engine, "decode", lambda *a: pytest.fail("decoded an oversized upload"))
    with pytest.raises(webui.LimitError, match=r"big.png' is 0.0 MB; the limit is 0.001 MB"):
        engine.generate([str(ref)], "robot", "a robot", 1.0, 7.0, 0.0, 2, 0, 32, 32, 1)


def test_engine_reads_only_inside_upload_root(tiny_pipe, tmp_path):
    (tmp_path / "uploads").mkdir()
    engine = webui.DemoEngine(tiny_pipe, output_dir=tmp_path / "out", upload_root=tmp_path / "uploads")
    outside = png(tmp_path / "outside.png")
    with pytest.raises(webui.LimitError, match="not uploaded through this page"):
        engine.read_upload(str(tmp_path / "uploads" / ".." / "outside.png"))
    inside = png(tmp_path / "uploads" / "in.png")
    assert engine.read_upload({"path": str(inside)})[1] == inside.read_bytes()
    assert outside.exists()


def test_engine_messages_are_customshift_errors(tiny_pipe, tmp_path):
    engine = webui.DemoEngine(tiny_pipe, output_dir=tmp_path / "out")
    garbage = tmp_path / "photo.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="cannot load image photo.png"):
        engine.generate([str(garbage)], "robot", "a robot", 1.0, 7.0, 0.0, 2, 0, 32, 32, 1)
    with pytest.raises(CustomShiftError, match="seed must be between"):
        engine.check_request(["x"], "robot", "a robot", 1.0, 7.0, 0.0, 2, -5, 32, 32, 1)
    with pytest.raises(CustomShiftError, match="shift scale must be between"):
        engine.check_request(["x"], "robot", "a robot", float("nan"), 7.0, 0.0, 2, 0, 32, 32, 1)
    result = engine.generate([str(png(tmp_path / "ok.png"))], "robot", "a robot", 1.0, 7.0, 0.0, 2, -1, 32, 32, 2)
    assert len(result.images) == 2 and result.parameters[1]["seed"] == result.parameters[0]["seed"] + 1


def test_engine_reports_progress_and_caches_per_size(tiny_pipe, tmp_path):
    counting = CountingPipeline(tiny_pipe)
    engine = webui.DemoEngine(counting, output_dir=tmp_path / "out")
    ref = str(png(tmp_path / "ref.png"))
    seen = []
    engine.generate([ref], "robot", "a robot\na robot on the beach", 1.0, 7.0, 0.0, 3, 0, 32, 32, 1,
                    progress=lambda value, desc=None: seen.append(value))
    steps = [v for v in seen if isinstance(v, tuple)]
    assert steps[0] == (1, 6) and steps[-1] == (6, 6) and [s[0] for s in steps] == sorted(s[0] for s in steps)
    engine.generate([ref], "robot", "a robot", 1.0, 7.0, 0.0, 2, 0, 32, 32, 1)
    assert counting.encodes == 1  # same references, subject and size: cached
    engine.generate([ref], "robot", "a robot", 1.0, 7.0, 0.0, 2, 0, 64, 32, 1)
    engine.generate([ref], "vase", "a vase", 1.0, 7.0, 0.0, 2, 0, 32, 32, 1)
    assert counting.encodes == 3 and len(engine.cache) == 3
    emb = next(iter(engine.cache._items.values()))[0]
    assert emb.inputs is None and all(t.device.type == "cpu" for t in emb.keys.values())


def _embedding(nbytes: int, name: str = "x") -> SubjectEmbedding:
    tensor = torch.zeros(nbytes // 8, dtype=torch.float32)
    return SubjectEmbedding(keys={"a": tensor}, values={"a": tensor}, subject=name, base_fingerprint="b",
                            weights_fingerprint="w", resolution=(32, 32))


def test_embedding_cache_is_lru_bounded_by_entries_and_bytes():
    cache = webui.EmbeddingCache(max_entries=2, max_bytes=10_000)
    cache.put(("a",), _embedding(1000))
    cache.put(("b",), _embedding(1000))
    assert cache.get(("a",)) is not None  # a is now the most recent
    cache.put(("c",), _embedding(1000))
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None and len(cache) == 2
    cache.put(("big",), _embedding(8000))  # 8000 + 1000 fits 10,000; a is evicted
    assert cache.nbytes <= 10_000 and cache.get(("c",)) is None
    cache.put(("huge",), _embedding(20_000))  # over the whole budget: not kept
    assert cache.get(("huge",)) is None and cache.nbytes <= 10_000
    assert cache.hits >= 2 and cache.misses >= 3


def test_examples_are_held_out_synthetic_subjects(tmp_path):
    rows = webui.write_examples(tmp_path, 3)
    assert len(rows) == 3 and len({r[1] for r in rows}) == 3
    for (paths,), subject, prompt in ((r[:1], r[1], r[2]) for r in rows):
        assert Image.open(paths[0]).size == (64, 64) and subject in prompt


def test_load_pipeline_default_model_or_tiny_fallback(tiny_pipe, tmp_path, monkeypatch):
    import customshift.default_model as default_model

    monkeypatch.setattr("customshift.tiny.build_tiny_pipeline", lambda variant="sd3": tiny_pipe)
    # The module is there but its packaged files are not: the tiny model, with the notice.
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    pipe, notice, name = webui.load_pipeline(None, device="cpu")
    assert pipe is tiny_pipe and notice == webui.TINY_NOTICE and name == "tiny-random-sd3"
    # No module at all: the same.
    monkeypatch.setitem(sys.modules, "customshift.default_model", None)
    assert webui.load_pipeline(None, device="cpu")[1] == webui.TINY_NOTICE
    # An installed default model is used, without a notice.
    fake = types.ModuleType("customshift.default_model")
    fake.default_model_path = lambda: tmp_path
    fake.load_default_pipeline = lambda: tiny_pipe
    monkeypatch.setitem(sys.modules, "customshift.default_model", fake)
    pipe, notice, name = webui.load_pipeline(None, device="cpu")
    assert pipe is tiny_pipe and notice is None and name == "customshift-default"


def test_load_pipeline_reports_a_missing_model(tmp_path):
    with pytest.raises(CustomShiftError, match="cannot load the model"):
        webui.load_pipeline(str(tmp_path / "no-such-model"), device="cpu")


def test_serve_binds_localhost_by_default(tiny_pipe, monkeypatch):
    import inspect

    assert inspect.signature(webui.serve).parameters["host"].default == "127.0.0.1"
    monkeypatch.setattr("customshift.tiny.build_tiny_pipeline", lambda variant="sd3": tiny_pipe)
    monkeypatch.setitem(sys.modules, "customshift.default_model", None)
    demo = webui.serve(port=free_port(), block=False)
    try:
        assert demo.local_url.startswith("http://127.0.0.1:")
        assert demo.server_name == "127.0.0.1"
        assert "No default model installed" in httpx.get(demo.local_url + "config", timeout=10).text
    finally:
        demo.close()


def test_limits_validate_themselves():
    with pytest.raises(ValueError, match="max_images_per_request"):
        webui.Limits(max_images_per_request=0)
    assert webui.Limits(max_side=1000).max_pixels == 1_000_000


def test_text_guidance_default_follows_the_model(tiny_pipe):
    assert webui.default_guidance_for("customshift-default") == 2.0  # what the default model was evaluated with
    assert webui.default_guidance_for("stabilityai/stable-diffusion-3-medium-diffusers") == 7.0
    demo = webui.create_app(tiny_pipe, default_guidance=2.5)
    sliders = [c["props"] for c in demo.config["components"] if c["props"].get("label") == "Text guidance scale"]
    assert [s["value"] for s in sliders] == [2.5]
