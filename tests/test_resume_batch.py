"""A batch killed mid-run and restarted ends with the same files as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import random_image


def _command(manifest, tiny_folder, out):
    return [sys.executable, "-m", "customshift", "generate", "--batch", str(manifest), "--model", tiny_folder,
            "--out", str(out), "--steps", "2", "--device", "cpu"]


def test_killed_batch_resumes_to_the_same_files(tiny_folder, tmp_path):
    random_image(0).save(tmp_path / "ref.png")
    rows = [{"id": f"img{i}", "reference": "ref.png", "subject": "dog", "prompt": f"a dog number {i}"}
            for i in range(6)]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}

    straight = tmp_path / "straight"
    subprocess.run(_command(manifest, tiny_folder, straight), check=True, env=env, capture_output=True)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(_command(manifest, tiny_folder, resumed), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(resumed.glob("*.json")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = {p.name for p in resumed.glob("*.json")}
    assert 0 < len(done_before) < 6, "the kill should land mid-batch"
    subprocess.run(_command(manifest, tiny_folder, resumed), check=True, env=env, capture_output=True)

    def files(folder):
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".png"}

    assert files(resumed) == files(straight)
    assert {p.name for p in resumed.glob("*.json")} == {p.name for p in straight.glob("*.json")}
    assert not [p for p in resumed.iterdir() if p.name.startswith(".")], "no temporary files left behind"
