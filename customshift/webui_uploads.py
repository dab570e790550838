"""Upload budgets and cleanup for the web UI (`customshift.webui`): what gradio's own limits leave open.

gradio checks each uploaded file against ``max_file_size`` but not how many files one request carries,
their total, or how much its upload folder already holds. `UploadBudget` sits in front of the upload
route (ASGI middleware) and refuses, with a plain-text message, a request past any of the three.
`cleanup_on_exit` removes the server's folders on a normal exit and on SIGTERM (``kill``, systemd,
docker stop), not only on Ctrl-C.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_MULTIPART_SLACK = 64 * 1024  # headers and boundaries of a multipart body, on top of the files themselves


def folder_size(folder: str | os.PathLike[str]) -> int:
    """Bytes of the regular files under ``folder`` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


class UploadBudget:
    """ASGI middleware: per-request file count and bytes, and a total for the upload folder.

    The body of an upload is read (at most ``max_request_bytes``) before gradio sees it, so a request
    that lies about its length, or has none, is held to the same budget.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, folder: Callable[[], str],
                 max_files: int, max_request_bytes: int, max_folder_bytes: int) -> None:
        self.app, self.folder = app, folder
        self.max_files, self.max_request_bytes, self.max_folder_bytes = max_files, max_request_bytes, max_folder_bytes
        self._reserved = 0  # bytes of uploads let through and still being written
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/upload"):
            await self.app(scope, receive, send)
            return
        limit = self.max_request_bytes + _MULTIPART_SLACK
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, 413, self._too_large())
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await _refuse(send, 413, self._too_large())
                return
            if not message.get("more_body", False):
                break
        files = _count_parts(bytes(body), headers.get("content-type", ""))
        if files > self.max_files:
            await _refuse(send, 413, f"{files} files in one upload; the limit is {self.max_files} per request")
            return
        with self._lock:
            used = folder_size(self.folder()) + self._reserved
            if used + len(body) > self.max_folder_bytes:
                refused = True
            else:
                refused, self._reserved = False, self._reserved + len(body)
        if refused:
            await _refuse(send, 507, f"the server's upload space is full ({self.max_folder_bytes / 1048576:g} MB); "
                                     "try again in a few minutes")
            return
        sent = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            with self._lock:
                self._reserved -= len(body)

    def _too_large(self) -> str:
        return (f"upload refused: more than {self.max_request_bytes / 1048576:g} MB in one request (the limit for "
                "all the reference images of a request together)")


def _count_parts(body: bytes, content_type: str) -> int:
    """How many parts (files) a multipart/form-data body holds; 0 for anything else."""
    for piece in content_type.split(";"):
        key, _, value = piece.strip().partition("=")
        if key.lower() == "boundary" and value:
            delimiter = b"--" + value.strip('"').encode("latin-1")
            return max(body.count(delimiter) - 1, 0)
    return 0


async def _refuse(send: Send, status: int, message: str) -> None:
    data = message.encode("utf-8")
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def cleanup_on_exit(*folders: str | os.PathLike[str]) -> Callable[[], None]:
    """Remove ``folders`` at exit, SIGTERM included (turned into KeyboardInterrupt, which gradio's
    ``block_thread`` handles by closing the server); returns the cleanup, to call early as well."""

    def remove() -> None:
        for folder in folders:
            shutil.rmtree(Path(folder), ignore_errors=True)

    atexit.register(remove)
    if threading.current_thread() is threading.main_thread():
        def on_sigterm(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_sigterm)
    return remove
