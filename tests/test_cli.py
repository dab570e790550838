"""`customshift generate` end to end on a tiny pipeline saved to a folder (in-process, through typer)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from conftest import random_image
from typer.testing import CliRunner

from customshift.cli import app
from customshift.pipeline import CustomShiftPipeline

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def ref_path(tmp_path):
    path = tmp_path / "dog.png"
    random_image(0).save(path)
    return path


def base_args(tiny_folder, out):
    return ["generate", "--model", tiny_folder, "--out", out, "--steps", "2", "--device", "cpu"]


def test_generate_writes_images_and_reproducible_sidecars(tiny_folder, ref_path, tmp_path):
    out = tmp_path / "out"
    result = invoke(*base_args(tiny_folder, out), "--reference", ref_path, "--subject", "dog",
                    "--prompt", "a dog on the beach", "--prompt", "a dog in the snow", "--num-images", "2",
                    "--seed", "5")
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    sidecar = json.loads(pngs[0].with_suffix(".json").read_text())
    assert sidecar["seed"] == 5 and sidecar["steps"] == 2 and sidecar["subject"] == "dog"
    assert sidecar["references"][0]["sha256"] and sidecar["base_fingerprint"]
    assert "--seed 5" in sidecar["command"]
    # A rerun keeps what exists (never overwrites unless asked) ...
    before = {p: p.stat().st_mtime_ns for p in pngs}
    result = invoke(*base_args(tiny_folder, out), "--reference", ref_path, "--subject", "dog",
                    "--prompt", "a dog on the beach", "--prompt", "a dog in the snow", "--num-images", "2",
                    "--seed", "5")
    assert "kept 4 existing" in result.output
    assert before == {p: p.stat().st_mtime_ns for p in pngs}
    # ... and regenerates identically with --overwrite.
    first = pngs[0].read_bytes()
    invoke(*base_args(tiny_folder, out), "--reference", ref_path, "--subject", "dog", "--prompt",
           "a dog on the beach", "--num-images", "1", "--seed", "5", "--overwrite")
    assert pngs[0].read_bytes() == first


def test_reference_dtype_option_reaches_the_cache_and_the_sidecar(tiny_folder, ref_path, tmp_path):
    out = tmp_path / "out"
    args = [*base_args(tiny_folder, out), "--reference", ref_path, "--subject", "dog", "--prompt", "a dog"]
    result = invoke(*args, "--reference-dtype", "bf16")
    assert result.exit_code == 0, result.output
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["reference_dtype"] == "bf16" and "--reference-dtype bf16" in sidecar["command"]
    emb = tmp_path / "dog.safetensors"
    result = invoke("encode", "--model", tiny_folder, "--reference", ref_path, "--subject", "dog", "--out", emb,
                    "--reference-dtype", "bf16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    from customshift.reference import SubjectEmbedding

    assert {t.dtype.itemsize for t in SubjectEmbedding.load(emb).keys.values()} == {2}
    result = runner.invoke(app, [*map(str, args), "--reference-dtype", "int4", "--overwrite"])
    assert result.exit_code == 2 and "unknown --reference-dtype 'int4'" in result.output


def test_a_model_folder_brings_its_own_customshift_weights(tiny_folder, tmp_path):
    """``--model FOLDER`` with trained weights in FOLDER/customshift (a packaged model) uses them."""
    import shutil

    from customshift.generate import load_pipeline

    folder = tmp_path / "packaged"
    shutil.copytree(tiny_folder, folder)
    trained = CustomShiftPipeline.from_pretrained(tiny_folder)
    with torch.no_grad():
        trained.reference_branch.shift.beta.fill_(1.5)
    trained.save_customshift(folder / "customshift")
    pipe = load_pipeline(str(folder), None, device="cpu")
    assert torch.all(pipe.reference_branch.shift.beta == 1.5)
    assert pipe._customshift_source["weights"] == str(folder / "customshift")
    assert torch.all(load_pipeline(tiny_folder, None, device="cpu").reference_branch.shift.beta != 1.5)


def test_batch_encodes_each_subject_once(tiny_folder, tmp_path, monkeypatch):
    refs = tmp_path / "refs"
    refs.mkdir()
    random_image(1).save(refs / "a.png")
    random_image(2).save(refs / "b.png")
    rows = [
        {"id": "a1", "reference": "refs/a.png", "subject": "dog", "prompt": "a dog on the beach", "note": "x"},
        {"id": "a2", "reference": "refs/a.png", "subject": "dog", "prompt": "a dog in the snow"},
        {"id": "b1", "reference": "refs/b.png", "subject": "robot", "prompt": "a robot on the beach"},
    ]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    calls = []
    original = CustomShiftPipeline.encode_subject

    def counting(self, *args, **kwargs):
        calls.append(args[1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CustomShiftPipeline, "encode_subject", counting)
    out = tmp_path / "out"
    result = invoke("generate", "--batch", manifest, "--model", tiny_folder, "--out", out, "--steps", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["a1.png", "a2.png", "b1.png"]
    assert sorted(calls) == ["dog", "robot"]


def _bomb_png(path, side=100_000):
    """A PNG whose header claims side x side pixels: must be refused before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("case", ["missing", "zero-byte", "not-an-image", "bomb", "empty-prompt", "foreign-embedding",
                                  "bad-manifest"])
def test_bad_input_is_one_clear_line_and_no_output(tiny_folder, tmp_path, case):
    out = tmp_path / "out"
    ref = tmp_path / "ref.png"
    prompt = "a dog on the beach"
    if case == "zero-byte":
        ref.write_bytes(b"")
    elif case == "not-an-image":
        ref.write_text("hello")
    elif case == "bomb":
        _bomb_png(ref)
    elif case in ("empty-prompt", "bad-manifest"):
        random_image(0).save(ref)
        prompt = "  "
    elif case == "foreign-embedding":
        from customshift.tiny import build_tiny_pipeline

        ref = tmp_path / "other.safetensors"
        build_tiny_pipeline("sd3", seed=7).encode_subject(random_image(0), "dog").save(ref)
    if case == "bad-manifest":
        manifest = tmp_path / "m.jsonl"
        manifest.write_text('{"id": "ok", "reference": "ref.png", "subject": "dog", "prompt": "a dog"}\n{broken\n'
                            '{"id": "x/../../y", "reference": "ref.png", "subject": "dog", "prompt": "a dog"}\n')
        result = runner.invoke(app, ["generate", "--batch", str(manifest), "--model", tiny_folder, "--out", str(out)])
    else:
        args = [*map(str, base_args(tiny_folder, out)), "--reference", str(ref), "--subject", "dog", "--prompt", prompt]
        result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output
    expected = {"missing": "not found", "zero-byte": "empty", "not-an-image": "not", "bomb": "pixels",
                "empty-prompt": "prompt is empty", "foreign-embedding": "another base model",
                "bad-manifest": ":2:"}[case]
    assert expected in lines[0].lower() or expected in lines[0], lines[0]
    assert not list(out.glob("*.png")) if out.exists() else True
    if case == "bad-manifest":
        assert ":3:" in lines[0]


def test_help_lists_the_commands():
    result = invoke("--help")
    for command in ("generate", "encode", "train", "evaluate", "demo"):
        assert command in result.output


def test_evaluate_synthetic_scores_the_layout_asked_for(tiny_folder, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "synthetic", "--model", tiny_folder, "--n", "2", "--steps", "1", "--track", "clean",
            "--device", "cpu"]
    result = invoke(*args, "--out", out, "--layout", "same_layout")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layout"] == "same_layout" and summary["n"] == 2
    clean = summary["clean"]
    assert 0 <= clean["identity"] <= 1 and 0 <= clean["identity_wrong_reference"] <= 1
    assert (out / "grid-clean.png").is_file() and "| clean |" in result.output

    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--layout", "sideways"])
    assert bad.exit_code != 0 and "--layout must be one of random, same_layout, same_size" in bad.output
    assert not (tmp_path / "bad").exists()
