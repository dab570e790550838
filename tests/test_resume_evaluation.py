"""An evaluation killed mid-run (SIGKILL) and restarted ends with the same files as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from customshift.eval.tiny_models import build_tiny_metric_models, make_dreambench_fixture
from customshift.tiny import build_tiny_pipeline


def test_killed_dreambench_run_resumes_to_the_same_images(tmp_path):
    data = make_dreambench_fixture(tmp_path / "dreambench", {"dog": "dog", "backpack": "backpack"})
    dino, clip = build_tiny_metric_models(tmp_path / "metric-models")
    model = tmp_path / "tiny"
    build_tiny_pipeline("sd3", seed=0).save_pretrained(model)

    def command(out):
        return [sys.executable, "-m", "customshift", "evaluate", "dreambench", "--data", str(data), "--out", str(out),
                "--model", str(model), "--prompts", "3", "--images-per-prompt", "1", "--steps", "3", "--height", "32",
                "--width", "32", "--device", "cpu", "--dino-model", str(dino), "--clip-model", str(clip),
                "--no-grids"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    straight = tmp_path / "straight"
    subprocess.run(command(straight), check=True, env=env, capture_output=True)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(command(resumed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not list(resumed.rglob("*.png")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = len(list(resumed.rglob("*.png")))
    assert 0 < before < 6, "the kill should land mid-run"
    subprocess.run(command(resumed), check=True, env=env, capture_output=True)

    def images(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in (folder / "images").rglob("*.png")}

    assert images(resumed) == images(straight)
    assert (resumed / "summary.json").is_file()
