"""Issue 16, item 3: web UI upload budgets, refused server paths, and the folders removed on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("gradio")

from customshift import webui  # noqa: E402
from customshift.tiny import build_tiny_pipeline  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pipeline("sd3")


@pytest.fixture
def small_server(tiny_pipe, tmp_path, monkeypatch):
    """A server with 2 references of 50 kB per request and 0.3 MB of upload folder, in a folder of its own."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    demo = webui.create_app(tiny_pipe, model_name="tiny", examples=0, max_upload_mb=0.05, max_references=2,
                            max_upload_cache_mb=0.3)
    url = webui.launch(demo, "127.0.0.1", free_port(), block=False, quiet=True)
    yield url
    demo.close()


def upload(url: str, *sizes: int) -> httpx.Response:
    files = [("files", (f"f{i}.png", os.urandom(size))) for i, size in enumerate(sizes)]
    return httpx.post(url + "gradio_api/upload", files=files, timeout=30)


def test_uploads_have_a_budget_per_request_and_for_the_folder(small_server):
    too_many = upload(small_server, 1000, 1000, 1000)
    assert too_many.status_code == 413 and "3 files in one upload; the limit is 2 per request" in too_many.text
    too_big = upload(small_server, 300_000)
    assert too_big.status_code == 413 and "in one request" in too_big.text
    ok = upload(small_server, 40_000, 40_000)
    assert ok.status_code == 200, ok.text
    statuses = [upload(small_server, 40_000, 40_000) for _ in range(4)]
    full = [r for r in statuses if r.status_code != 200]
    assert full and full[0].status_code == 507 and "upload space is full" in full[0].text
    uploads = Path(os.environ["GRADIO_TEMP_DIR"])
    assert sum(p.stat().st_size for p in uploads.rglob("*") if p.is_file()) <= 0.3 * 1024 * 1024


def _raw_call(url: str, data: list) -> str:
    base = url + "gradio_api/call/generate"
    event = httpx.post(base, json={"data": data}, timeout=10).json()["event_id"]
    return httpx.get(f"{base}/{event}", timeout=30).text


def test_a_server_path_is_refused_with_a_message_and_no_traceback(small_server, tmp_path, capfd):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not really")
    capfd.readouterr()
    for path in (str(secret), "/etc/passwd", "../../../etc/passwd"):
        reply = _raw_call(small_server, [[{"path": path, "meta": {"_type": "gradio.FileData"}}], "robot",
                                         "a robot", 1.0, 7.0, 0.0, 2, 0, 32, 32, 1, None, ""])
        assert "event: error" in reply and "not uploaded through this page" in reply, reply
        assert '"error": null' not in reply and '"error":null' not in reply
    log = capfd.readouterr()
    assert "Traceback" not in log.err + log.out


def test_sigterm_removes_the_upload_cache_and_the_output_folders(tiny_folder, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(temp), "HF_HUB_OFFLINE": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    server = subprocess.Popen([sys.executable, "-m", "customshift", "serve", "--model", tiny_folder, "--port",
                               str(port), "--device", "cpu"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the server never came up"
            try:
                if httpx.get(url + "config", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        response = httpx.post(url + "gradio_api/upload", files=[("files", ("marker-upload.png", b"x" * 100))],
                              timeout=30)
        assert response.status_code == 200, response.text
        assert list(temp.rglob("marker-upload.png")) and list(temp.glob("customshift-webui-*"))
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        server.kill()
        server.wait()
    assert not list(temp.rglob("marker-upload.png"))  # the uploads are gone ...
    assert not list(temp.glob("customshift-webui-*"))  # ... and so are the server's own folders
