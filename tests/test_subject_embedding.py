"""Subject embeddings: the compact form gives the same image as the full one (issue 19 item 6), their sizes
follow scripts/embedding_sizes.py, and a damaged or mismatched file is refused (issue 16 item 5)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tiny, random_image
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from test_pipeline import generate, randomize_adapter

from customshift.errors import CustomShiftError, IncompatibleWeightsError, SubjectEmbeddingError
from customshift.reference import SubjectEmbedding

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_pipe(tiny_folder):
    pipe = load_tiny(tiny_folder)
    randomize_adapter(pipe, seed=3)
    return pipe


@settings(max_examples=4, deadline=None, phases=[Phase.generate],  # no shrinking: each example generates
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1000), references=st.integers(1, 2), bf16=st.booleans())
def test_compact_embedding_gives_the_same_image_as_the_full_one(trained_pipe, tmp_path_factory, seed, references, bf16):
    folder = tmp_path_factory.mktemp("emb")
    images = [random_image(seed + i) for i in range(references)]
    dog = trained_pipe.encode_subject(images, "dog", dtype=torch.bfloat16 if bf16 else None)
    full = SubjectEmbedding.load(dog.save(folder / "full.safetensors"))
    compact = SubjectEmbedding.load(dog.save(folder / "compact.safetensors", compact=True), pipeline=trained_pipe)
    assert (folder / "compact.safetensors").stat().st_size < (folder / "full.safetensors").stat().st_size
    for name in full.keys:
        assert compact.keys[name].dtype == full.keys[name].dtype
        assert torch.equal(compact.keys[name], full.keys[name]) and torch.equal(compact.values[name], full.values[name])
    expected = generate(trained_pipe, subject=full, steps=2)
    assert np.array_equal(generate(trained_pipe, subject=compact, steps=2), expected)


def test_a_compact_embedding_needs_the_pipeline_and_its_weights(trained_pipe, tiny_folder, tmp_path):
    path = trained_pipe.encode_subject(random_image(2), "dog").save(tmp_path / "dog.safetensors", compact=True)
    lazy = SubjectEmbedding.load(path)
    assert lazy.compact and lazy.inputs["reference_latents"].dim() == 4
    with pytest.raises(SubjectEmbeddingError, match="compact"):
        trained_pipe.check_subject(lazy)
    assert not lazy.expand(trained_pipe).compact
    untrained = load_tiny(tiny_folder)
    with pytest.raises(IncompatibleWeightsError, match="other CustomShift weights"):
        SubjectEmbedding.load(path, pipeline=untrained)
    loaded = SubjectEmbedding.load(trained_pipe.encode_subject(random_image(2), "dog").save(tmp_path / "full.st"))
    with pytest.raises(SubjectEmbeddingError, match="from encode_subject"):
        loaded.save(tmp_path / "again.safetensors", compact=True)  # a loaded full embedding has no inputs


def test_an_embedding_saved_before_the_compact_form_still_loads(good_embedding, tiny_pipe, tmp_path):
    path = tmp_path / "old.safetensors"
    path.write_bytes(good_embedding[0].read_bytes())
    _rewrite(path, metadata=_drop_meta("form"))  # the earlier format had no "form" entry
    old = SubjectEmbedding.load(path)
    assert not old.compact and old.subject == "dog"
    tiny_pipe.check_subject(old)


def _sizes_module():
    spec = importlib.util.spec_from_file_location("embedding_sizes", ROOT / "scripts" / "embedding_sizes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_embedding_sizes_follow_the_documented_formulas(tiny_folders, variant, tmp_path):
    sizes = _sizes_module()
    pipe = load_tiny(tiny_folders[variant])
    dog = pipe.encode_subject([random_image(0), random_image(1)], "dog", height=32, width=32)
    config = dict(pipe.transformer.config)
    tokens = dog.inputs["subject_embeds"].shape[1]
    item = dog.keys[next(iter(dog.keys))].element_size()
    full = sum(t.numel() * t.element_size() for t in [*dog.keys.values(), *dog.values.values()])
    compact = sum(t.numel() * t.element_size() for t in dog.inputs.values())
    scale = pipe.vae_scale_factor
    assert full == sizes.full_bytes(config, 32, 32, item, scale, references=2)
    assert compact == sizes.compact_bytes(config, 32, 32, item, scale, references=2, subject_tokens=tokens)
    table = sizes.table()
    assert "| SD3-medium | 1024² | 576 MiB |" in table and "| SD3.5-large | 1024² | 1.41 GiB |" in table
    docs = (ROOT / "docs" / "diffusers.md").read_text()
    assert table in docs  # the docs show what the script computes


# ----------------------------------------------------------------------------------------------------------
# Damaged or mismatched files (issue 16 item 5)


def _rewrite(path: Path, tensors=None, metadata=None) -> None:
    with safe_open(str(path), framework="pt") as handle:
        old_meta = handle.metadata()
        old = {name: handle.get_tensor(name) for name in handle.keys()}
    new_tensors = tensors(old) if tensors else old
    save_file(new_tensors, str(path), metadata=metadata(dict(old_meta)) if metadata else old_meta)


def _first(tensors, prefix="k::"):
    return next(name for name in sorted(tensors) if name.startswith(prefix))


def _poison(value):
    def change(tensors):
        name = _first(tensors, "v::")
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value
        return tensors
    return change


def _shorter(tensor):
    return tensor[:, :, :-1].clone()


def _drop_meta(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def _regroup_heads(tensors):
    """Consistent keys and values, but with twice the heads of half the size: not this model's layers."""
    return {n: t.reshape(1, t.shape[1] * 2, t.shape[2], t.shape[3] // 2).contiguous() for n, t in tensors.items()}


BAD_EMBEDDINGS = {
    "NaN": dict(tensors=_poison(float("nan"))),
    "inf": dict(tensors=_poison(float("inf"))),
    "value and key shapes differ": dict(tensors=lambda t: {**t, _first(t, "v::"): _shorter(t[_first(t, "v::")])}),
    "a v:: layer missing": dict(tensors=lambda t: {n: v for n, v in t.items() if n != _first(t, "v::")}),
    "shapes that do not fit the layers": dict(tensors=_regroup_heads),
    "a layer this model does not have": dict(tensors=lambda t: {**t, "k::extra.attn": t[_first(t)].clone(),
                                                                "v::extra.attn": t[_first(t)].clone()}),
    "metadata: no subject": dict(metadata=_drop_meta("subject")),
    "metadata: no fingerprint": dict(metadata=_drop_meta("base_fingerprint")),
    "metadata: resolution unparsable": dict(metadata=lambda m: {**m, "resolution": "[64, "}),
    "metadata: num_references text": dict(metadata=lambda m: {**m, "num_references": "two"}),
}


@pytest.fixture(scope="module")
def good_embedding(tiny_folder, tmp_path_factory) -> tuple[Path, str]:
    pipe = load_tiny(tiny_folder)
    path = pipe.encode_subject(random_image(4), "dog").save(tmp_path_factory.mktemp("good") / "dog.safetensors")
    return path, tiny_folder


@pytest.mark.parametrize("case", list(BAD_EMBEDDINGS))
def test_damaged_embeddings_are_refused(good_embedding, tiny_pipe, tmp_path, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(good_embedding[0].read_bytes())
    _rewrite(path, **BAD_EMBEDDINGS[case])
    with pytest.raises(CustomShiftError) as error:
        tiny_pipe.check_subject(SubjectEmbedding.load(path))
    assert isinstance(error.value, IncompatibleWeightsError) and "\n" not in str(error.value)


def _cli(args):
    from typer.testing import CliRunner

    from customshift.cli import app

    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("case", ["NaN", "value and key shapes differ", "a v:: layer missing",
                                  "shapes that do not fit the layers", "metadata: resolution unparsable"])
def test_damaged_embeddings_on_the_cli_are_one_error_line(good_embedding, tmp_path, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(good_embedding[0].read_bytes())
    _rewrite(path, **BAD_EMBEDDINGS[case])
    out = tmp_path / "out"
    result = _cli(["generate", "--model", good_embedding[1], "--reference", str(path), "--subject", "dog",
                   "--prompt", "a dog", "--steps", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.output
    assert not out.exists()


def test_a_subject_other_than_the_embeddings_is_an_error(good_embedding, tmp_path):
    out = tmp_path / "out"
    result = _cli(["generate", "--model", good_embedding[1], "--reference", str(good_embedding[0]),
                   "--subject", "cat", "--prompt", "a cat", "--steps", "1", "--out", str(out)])
    assert result.exit_code == 2 and "'dog', not 'cat'" in result.output and not out.exists()


def test_encode_compact_on_the_cli_gives_the_same_images(tiny_folder, tmp_path):
    random_image(5).save(tmp_path / "dog.png")
    for form in ("full", "compact"):
        args = ["encode", "--model", tiny_folder, "--reference", str(tmp_path / "dog.png"), "--subject", "dog",
                "--out", str(tmp_path / f"{form}.safetensors")] + (["--compact"] if form == "compact" else [])
        assert _cli(args).exit_code == 0
        result = _cli(["generate", "--model", tiny_folder, "--reference", str(tmp_path / f"{form}.safetensors"),
                       "--subject", "dog", "--prompt", "a dog", "--steps", "2", "--out", str(tmp_path / form)])
        assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "compact.safetensors"), framework="pt") as handle:
        assert handle.metadata()["form"] == "compact"
    full, compact = (sorted((tmp_path / f).glob("*.png")) for f in ("full", "compact"))
    assert [p.read_bytes() for p in full] == [p.read_bytes() for p in compact] and full
    assert json.loads(sorted((tmp_path / "compact").glob("*.json"))[0].read_text())["subject"] == "dog"
