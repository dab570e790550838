"""benchmarks/synthetic.py end to end at toy size: every row of the table is produced and measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import synthetic as bench  # noqa: E402


def test_benchmark_trains_evaluates_and_writes_the_table(tmp_path, monkeypatch):
    from customshift.tiny import build_tiny_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    base = tmp_path / "base"
    model = build_tiny_pipeline("sd3", sample_size=32)  # 64 px images, as the spec
    model.save_pretrained(str(base))
    model.save_customshift(base / "customshift")  # the base's own weights: scored as they are, one row
    out, runs = tmp_path / "out", tmp_path / "runs"
    args = [
        "--base", str(base), "--steps", "2", "--n", "2", "--runs", str(runs), "--out", str(out),
        "--markdown", str(tmp_path / "table.md"), "--figure", str(tmp_path / "figure.png"),
        "--variants", "CustomShift", "naive concatenation", "--sampling-steps", "2", "--finetune-subjects", "1",
        "--finetune-max-steps", "2", "--max-sequence-length", "8",
        "--set", "data.batch_size=1", "data.targets_per_reference=1", "data.num_workers=0",
        "train.mixed_precision=no", "checkpoint.every_steps=0", "data.max_sequence_length=8",
    ]
    try:
        assert bench.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["methods"]
    assert set(methods) == {"copy the reference", "text only", bench.SHIPPED, "CustomShift", "naive concatenation"}
    assert set(methods[bench.SHIPPED]["probe"]) == {"right", "wrong", "none"}
    # Copying the reference is exact where the target keeps the reference's layout, never perfect overall.
    assert methods["copy the reference"]["clean"]["identity"] > 0
    for name in ("CustomShift", "naive concatenation"):
        for track in ("clean", "distractor"):
            row = methods[name][track]
            assert 0 <= row["identity"] <= 1 and 0 <= row["prompt_accuracy"] <= 1
            assert "identity_wrong_reference" in row
        assert set(methods[name]["probe"]) == {"right", "wrong", "none"}
        assert (runs / bench.slug(name) / "ckpt-0000002").is_dir()  # trained exactly the budget
    cost = summary["finetune"]["median"]
    assert cost["per-subject LoRA"]["steps"] == 2 and cost["CustomShift"]["steps"] == 0
    for name in ("CustomShift", "naive concatenation", "text only", "copy the reference"):
        two = methods[name]["two-subject"]  # the default tracks include two subjects
        assert 0 <= two["identity"] <= 1 and 0 <= two["swap_rate"] <= 1 and "identity_wrong_reference" in two
    table = (tmp_path / "table.md").read_text()
    assert "| CustomShift |" in table and "| naive concatenation |" in table and "seconds" in table
    assert "Two subjects in one image" in table
    assert (tmp_path / "figure.png").stat().st_size > 0
    assert not (out / "partial.json").exists()
    # A second run with the same settings reuses the trained variants and their scores.
    cut = args.index("--set")
    assert bench.main([*args[:cut], "--skip-finetune", *args[cut:]]) == 0
    assert sorted(p.name for p in (runs / "customshift").glob("ckpt-*")) == ["ckpt-0000002"]
    again = json.loads((out / "summary.json").read_text())
    assert again["methods"] == methods and again["finetune"] == summary["finetune"]
    # A changed recipe (here one more --set): neither the earlier scores nor the runs trained on it are reused.
    with pytest.raises(SystemExit, match="another recipe"):
        bench.main([*args[:cut], "--skip-finetune", *args[cut:], "train.learning_rate=0.5"])
    rescored = json.loads((out / "partial.json").read_text())["methods"]
    assert set(rescored) == {"copy the reference", "text only", bench.SHIPPED}  # scored afresh, up to the refusal
    (out / "partial.json").unlink()
    # The docs page keeps its hand-written analysis: only the generated block is replaced.
    page = tmp_path / "table.md"
    page.write_text("# Title\n\nanalysis written by hand\n\n" + page.read_text().split("\n", 2)[2])
    (tmp_path / "figure.png").unlink()
    assert bench.main([*args[:cut], "--report-only"]) == 0
    text = page.read_text()
    assert text.startswith("# Title\n\nanalysis written by hand") and text.count("synthetic:table:begin") == 1
    assert (tmp_path / "figure.png").is_file()
    # An unfinished run (only partial.json, e.g. a session that ended mid-benchmark) can be reported too.
    (out / "summary.json").rename(out / "partial.json")
    page.unlink()
    assert bench.main([*args[:cut], "--report-only"]) == 0
    assert f"| {bench.SHIPPED} |" in page.read_text()
    (out / "partial.json").unlink()
    with pytest.raises(SystemExit, match="no results"):
        bench.main([*args[:cut], "--report-only"])
    # Another model saved into the same base folder: runs trained on the old one are not reused.
    from safetensors.torch import load_file, save_file

    weights = next((base / "transformer").glob("*.safetensors"))
    state = load_file(str(weights))
    first = next(iter(state))
    state[first] = state[first] + 1
    save_file(state, str(weights))
    with pytest.raises(SystemExit, match="trained on another base"):
        bench.main([*args[:cut], "--skip-finetune", *args[cut:]])
