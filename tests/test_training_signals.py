"""Process-level reliability: SIGKILL mid-checkpoint, SIGTERM, and a 2-process accelerate launch."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "tiny-smoke.yaml"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class Child:
    """The trainer in a forked child: the parent's imports are inherited, so it starts in a fraction of a
    second instead of re-importing torch/diffusers; signals and exit codes are those of a real process."""

    def __init__(self, output: Path, *overrides: str, resume: bool = False, **env: str) -> None:
        from customshift.training.trainer import train_main

        args = [f"output_dir={output}", "train.max_steps=100000", "checkpoint.every_steps=1",
                "checkpoint.keep_last=2", "train.log_every=1", *overrides]
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # child
            code = 1
            try:
                os.environ.update(env)
                train_main(str(SMOKE), args, resume)
                code = 0
            except BaseException:  # noqa: BLE001 - report and exit non-zero
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                self.kill()
                raise AssertionError("trainer did not exit in time")
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        self.wait(30) if self.returncode is None else None


def _wait(condition, process: Child, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"trainer exited with {process.returncode} while waiting for {what}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def slow_checkpoint_writes(monkeypatch, seconds: float) -> None:
    """Widen the window between writing a checkpoint's files and publishing it, so a kill lands inside it."""
    from customshift.training import checkpoint

    write = checkpoint.atomic_write_json

    def slow(path, data):
        if Path(path).name == "state.json":
            time.sleep(seconds)
        write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_json", slow)


def test_sigkill_mid_checkpoint_keeps_the_latest_loadable_and_sigterm_stops_cleanly(tmp_path, monkeypatch):
    import torch

    from customshift.training.config import load_config
    from customshift.training.trainer import Trainer, find_checkpoint

    torch.set_num_threads(1)
    # Import everything the trainer lazily imports once here, so that both children start warm.
    Trainer(load_config(SMOKE, [f"output_dir={tmp_path / 'warm'}"])).close()
    run = tmp_path / "run"
    slow_checkpoint_writes(monkeypatch, 0.2)  # inherited by the forked child
    trainer = Child(run)
    try:
        _wait(lambda: (run / "latest").exists(), trainer, 90, "the first checkpoint")
        _wait(lambda: any(run.glob(".tmp-ckpt-*")), trainer, 30, "a checkpoint being written")
        time.sleep(random.uniform(0.0, 0.3))  # somewhere inside (or just after) the checkpoint write
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
    assert trainer.returncode == -signal.SIGKILL
    found = find_checkpoint(run)
    assert found is not None, sorted(p.name for p in run.iterdir())
    killed_at = json.loads((found / "state.json").read_text())["step"]

    # The resumed run loads that checkpoint (proof it is loadable), then SIGTERM stops it cleanly.
    resumed = Child(run, resume=True)
    try:
        def stepped() -> bool:
            text = (run / "train.log").read_text()
            return "resumed from" in text and " loss " in text.split("resumed from", 1)[1]
        _wait(stepped, resumed, 90, "a step after resuming")
        assert f"resumed from {found} at step {killed_at}" in (run / "train.log").read_text()
        resumed.send_signal(signal.SIGTERM)
        assert resumed.wait(60) == 0
    finally:
        resumed.kill()
    final = find_checkpoint(run)
    state = json.loads((final / "state.json").read_text())
    assert state["reason"] == "signal" and state["step"] > killed_at
    assert not any(run.glob(".tmp-ckpt-*")) and not (run / "final").exists()
    assert "SIGTERM received" in (run / "train.log").read_text()


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")
def test_two_process_accelerate_launch(tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    run = tmp_path / "ddp"
    port = str(29500 + os.getpid() % 500)
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
               "-m", "customshift", "train", str(SMOKE), "--set", f"output_dir={run}", "--set", "train.max_steps=3",
               "--set", "checkpoint.every_steps=2", "--set", "train.log_every=1"]  # as docs/training.md says
    # No GPU here: ACCELERATE_USE_CPU makes accelerate's torchrun launch use gloo on CPUs.
    result = subprocess.run(command, cwd=ROOT, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((run / "ckpt-0000003" / "state.json").read_text())
    assert state["world_size"] == 2 and [d["cursor"] for d in state["data"]] == [6, 6]
    assert (run / "latest").read_text().strip() == "ckpt-0000003"
    assert len((run / "train_log.csv").read_text().splitlines()) == 4  # header + one row per step, rank 0 only
