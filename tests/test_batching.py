"""Batched generation (customshift/batching.py): the same files at any batch size and any number of processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_image

from customshift.batching import group_batches, shard

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")


def _manifest(folder: Path) -> Path:
    """Nine jobs: eight of one subject (prompts and seeds all different), one of another subject."""
    random_image(0).save(folder / "dog.png")
    random_image(1).save(folder / "cat.png")
    rows = [{"id": f"dog{i}", "reference": "dog.png", "subject": "dog", "prompt": f"a dog number {i}", "seed": 10 + i}
            for i in range(8)]
    rows.insert(3, {"id": "cat0", "reference": "cat.png", "subject": "cat", "prompt": "a cat", "seed": 5})
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".png", ".json")}


def test_group_batches_keeps_plan_order_within_a_subject_and_cuts_at_the_size():
    items = ["a1", "b1", "a2", "a3", "b2", "a4"]
    assert group_batches(items, lambda s: s[0], 3) == [["a1", "a2", "a3"], ["a4"], ["b1", "b2"]]
    assert group_batches(items, lambda s: s[0], 1) == [[s] for s in ("a1", "a2", "a3", "a4", "b1", "b2")]
    with pytest.raises(ValueError):
        group_batches(items, lambda s: s[0], 0)


def test_shards_cover_every_item_once():
    items = list(range(11))
    shares = [shard(items, i, 3) for i in range(3)]
    assert sorted(x for s in shares for x in s) == items and [len(s) for s in shares] == [4, 4, 3]
    with pytest.raises(ValueError):
        shard(items, 3, 3)


def test_batch_sizes_1_and_8_write_identical_files(tiny_folder, tmp_path, monkeypatch):
    from customshift import generate as gen

    jobs = gen.read_manifest(_manifest(tmp_path))
    pipe = gen.load_pipeline(tiny_folder, None, "cpu")
    params = gen.GenerationParams(steps=3, guidance_scale=3.0)
    calls: list[int] = []
    real = gen.generate_batch

    def spy(pipe, subject, prompts, seeds, **call):
        calls.append(len(prompts))
        return real(pipe, subject, prompts, seeds, **call)

    monkeypatch.setattr(gen, "generate_batch", spy)
    one, eight = tmp_path / "one", tmp_path / "eight"
    assert gen.run_jobs(pipe, jobs, one, params, batch_size=1, progress=False) == {"generated": 9, "kept": 0}
    assert calls == [1] * 9
    calls.clear()
    assert gen.run_jobs(pipe, jobs, eight, params, batch_size=8, progress=False) == {"generated": 9, "kept": 0}
    assert sorted(calls) == [1, 8], "the eight dog jobs in one call, the cat in its own"
    a, b = _files(one), _files(eight)
    assert len(a) == 18 and a == b
    # Different seeds and prompts inside the batch really give different images.
    assert len({a[f"dog{i}.png"] for i in range(8)}) == 8

    # Resumable as one at a time: only the deleted outputs are made again, to the same bytes.
    for name in ("dog2.png", "dog6.json", "cat0.png"):
        (eight / name).unlink()
    calls.clear()
    assert gen.run_jobs(pipe, jobs, eight, params, batch_size=8, progress=False) == {"generated": 3, "kept": 6}
    assert sorted(calls) == [1, 2] and _files(eight) == a


def _launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                # No GPU: --multi_gpu picks accelerate's multi-process launcher, ACCELERATE_USE_CPU makes it gloo
                # on CPU (`--cpu --num_processes 2` alone may start one process).
                "ACCELERATE_USE_CPU": "1"})
    return env


@pytest.mark.skipif(not Path(ACCELERATE).exists(), reason="accelerate CLI not installed")
def test_two_processes_write_the_files_of_one_process(tiny_folder, tmp_path):
    from customshift import generate as gen

    manifest = _manifest(tmp_path)
    single = tmp_path / "single"
    pipe = gen.load_pipeline(tiny_folder, None, "cpu")
    gen.run_jobs(pipe, gen.read_manifest(manifest), single, gen.GenerationParams(steps=3, guidance_scale=3.0),
                 batch_size=4, progress=False)
    expected = _files(single)
    assert len(expected) == 18
    double = tmp_path / "double"
    double.mkdir()
    for name in ("dog0", "dog5", "cat0"):  # finished before: the launch resumes around them
        for ext in (".png", ".json"):
            shutil.copy(single / f"{name}{ext}", double / f"{name}{ext}")
    port = str(29600 + os.getpid() % 300)
    launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port, "-m", "customshift",
              "generate", "--batch", str(manifest), "--model", tiny_folder, "--steps", "3", "--guidance-scale", "3",
              "--batch-size", "4", "--device", "cpu", "--out", str(double)]
    result = subprocess.run(launch, cwd=ROOT, env=_launch_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # The world size really was 2: each process reports its own share of the 6 images still to make.
    assert "wrote 3 image(s)" in result.stdout and "(process 1 of 2)" in result.stdout, result.stdout
    assert "(process 2 of 2)" in result.stdout, result.stdout
    assert _files(double) == expected


def test_evaluation_harness_batches_one_subject_to_the_same_images(tiny_pipe, tmp_path):
    from customshift.eval import harness as H

    for name in ("dog", "cat"):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        random_image(len(name)).save(folder / "0.png")
    subjects = [H.BenchmarkSubject(name, name, [f"a {name} on a beach", f"a {name} in snow"],
                                   [tmp_path / "data" / name / "0.png"]) for name in ("dog", "cat")]
    items = H.plan_work(subjects, images_per_prompt=1, reference_policy="first", seed=0)
    generator = H.PipelineGenerator(H.GenerationSettings(model="tiny", steps=2, height=32, width=32,
                                                         guidance_scale=3.0), device="cpu", pipeline=tiny_pipe)
    calls: list[int] = []
    real = generator.generate_batch
    generator.generate_batch = lambda s, p, seeds: calls.append(len(p)) or real(s, p, seeds)
    stats = {}
    for size in (1, 8):
        stats[size] = H.run_generation(items, tmp_path / f"b{size}", lambda: generator, batch_size=size,
                                       show_progress=False)
    assert calls == [1] * 4 + [2, 2] and stats[8].generated == stats[1].generated == 4
    assert stats[8].subjects_encoded == 2
    one = {p.relative_to(tmp_path / "b1"): p.read_bytes() for p in (tmp_path / "b1").rglob("*.png")}
    eight = {p.relative_to(tmp_path / "b8"): p.read_bytes() for p in (tmp_path / "b8").rglob("*.png")}
    assert len(one) == 4 and one == eight
