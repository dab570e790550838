"""SIGTERM / SIGINT during training: the first finishes the step and checkpoints (exit 0), a second aborts."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger("customshift.training.trainer")

__all__ = ["StopFlag"]


class StopFlag:
    """First SIGTERM/SIGINT asks for a clean stop (checkpoint, exit 0); a second one aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {name}: aborting without a checkpoint")
        self.requested = name
        logger.warning("%s received: finishing this step, writing a checkpoint, then stopping", name)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
