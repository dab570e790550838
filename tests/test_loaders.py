"""CustomShift weights travel with the pipeline (save_pretrained / from_pretrained / push_to_hub / the hub),
the diffusers loading idioms work, and a weights folder from anywhere is checked before it is used
(issue 19 items 1 and 5, issue 16 items 2 and 4)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import load_tiny, random_image
from safetensors.torch import load_file, save_file
from test_pipeline import generate, randomize_adapter

from customshift.errors import CustomShiftError, WeightsError, WeightsNotFoundError
from customshift.io import file_sha256
from customshift.loaders import TRAINING_FREE


@pytest.fixture
def trained(tiny_pipe):
    randomize_adapter(tiny_pipe, seed=5)
    return tiny_pipe


def test_save_pretrained_carries_the_weights_and_from_pretrained_restores_them(trained, tmp_path):
    subject = trained.encode_subject(random_image(6), "dog")
    expected = generate(trained, subject=subject)
    trained.save_pretrained(tmp_path / "pipe")

    manifest = json.loads((tmp_path / "pipe" / "customshift" / "customshift.json").read_text())
    assert manifest["config"]["lora_rank"] == 4
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "library_name: diffusers" in card and "CustomShiftPipeline.from_pretrained" in card
    assert '"lora_rank": 4' in card and trained.base_fingerprint in card

    reloaded = load_tiny(str(tmp_path / "pipe"))
    assert reloaded.weights_fingerprint == trained.weights_fingerprint != TRAINING_FREE
    assert reloaded.customshift_config == trained.customshift_config
    reloaded.check_subject(subject)  # an embedding made before saving is still accepted
    assert np.array_equal(generate(reloaded, subject=subject), expected)
    skipped = type(trained).from_pretrained(str(tmp_path / "pipe"), load_customshift=False)
    assert skipped.weights_fingerprint == TRAINING_FREE


def test_save_pretrained_with_a_generation_lora_writes_plain_base_weights(tiny_folder, tmp_path):
    """A generation LoRA (stage 22's kind) must not leave peft's names in the saved transformer."""
    pipe = load_tiny(tiny_folder)
    randomize_adapter(pipe, seed=3, generation_lora_rank=2)
    pipe.add_generation_lora()
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    pipe.customshift_weights_changed()
    subject = pipe.encode_subject(random_image(6), "dog")
    expected = generate(pipe, subject=subject)
    pipe.save_pretrained(tmp_path / "pipe")

    saved = load_file(str(next((tmp_path / "pipe" / "transformer").glob("*.safetensors"))))
    assert not any("base_layer" in k or "lora_" in k for k in saved)
    assert set(saved) == {n.replace(".base_layer", "") for n in pipe.transformer.state_dict() if "lora_" not in n}
    assert np.array_equal(generate(pipe, subject=subject), expected)  # the LoRA is back in place after saving
    reloaded = load_tiny(str(tmp_path / "pipe"))
    assert reloaded.weights_fingerprint == pipe.weights_fingerprint
    assert np.array_equal(generate(reloaded, subject=subject), expected)


def test_save_pretrained_with_a_text_encoder_lora_writes_the_whole_encoder(tiny_pipe, tmp_path):
    """transformers saves only the adapter of an encoder carrying one; the pipeline folder needs the encoder."""
    from peft import LoraConfig, inject_adapter_in_model

    plain = {k: v.clone() for k, v in tiny_pipe.text_encoder.state_dict().items()}
    # what transformers' load_adapter (diffusers' load_lora_weights on a text encoder) leaves behind
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), tiny_pipe.text_encoder, adapter_name="style")
    tiny_pipe.text_encoder._hf_peft_config_loaded = True
    tiny_pipe.save_pretrained(tmp_path / "pipe")

    assert tiny_pipe.text_encoder._hf_peft_config_loaded  # still carries its adapter
    saved = load_file(str(next((tmp_path / "pipe" / "text_encoder").glob("*.safetensors"))))
    assert not any("lora_" in k or "base_layer" in k for k in saved)
    reloaded = load_tiny(str(tmp_path / "pipe"))
    for key, value in reloaded.text_encoder.state_dict().items():
        assert torch.equal(value, plain[key]), key


def test_a_training_free_pipeline_stays_training_free_through_save_and_load(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    reloaded = load_tiny(str(tmp_path / "pipe"))
    assert reloaded.weights_fingerprint == TRAINING_FREE
    reloaded.check_subject(tiny_pipe.encode_subject(random_image(1), "dog"))


def test_the_default_model_loads_trained_from_python():
    from customshift.default_model import default_model_path
    from customshift.pipeline import CustomShiftPipeline

    folder = default_model_path()
    manifest = json.loads((folder / "customshift" / "customshift.json").read_text())
    pipe = CustomShiftPipeline.from_pretrained(folder)  # weights saved by the earlier code keep loading
    assert pipe.weights_fingerprint != TRAINING_FREE
    assert pipe.customshift_config.lora_rank == manifest["config"]["lora_rank"] > 0
    beta = load_file(str(folder / "customshift" / "customshift.safetensors"))["shift.beta"]
    assert torch.equal(pipe.reference_branch.shift.beta.detach(), beta)


def test_push_to_hub_uploads_the_weights_and_the_card(trained, monkeypatch):
    import diffusers.utils.hub_utils as hub_utils

    uploaded: dict[str, object] = {}

    def fake_upload(repo_id, folder_path, **kwargs):
        uploaded.update(repo=repo_id, files=sorted(str(p.relative_to(folder_path)) for p in
                                                  Path(folder_path).rglob("*") if p.is_file()))
        uploaded["card"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr("customshift.loaders.create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(hub_utils, "upload_folder", fake_upload)
    trained.push_to_hub("me/dog-model")
    assert uploaded["repo"] == "me/dog-model"
    assert {"customshift/customshift.json", "customshift/customshift.safetensors", "model_index.json",
            "README.md"} <= set(uploaded["files"])
    assert "customshift" in uploaded["card"]


class FakeHub:
    """hf_hub_download over a local folder, recording each request (snapshot downloads are refused)."""

    def __init__(self, root: Path) -> None:
        self.root, self.calls = root, []

    def __call__(self, repo_id, filename, *, subfolder=None, **kwargs):
        from huggingface_hub.errors import RemoteEntryNotFoundError

        self.calls.append((repo_id, subfolder, filename, kwargs.get("revision")))
        path = self.root / (subfolder or "") / filename
        if not path.is_file():
            raise RemoteEntryNotFoundError("404", response=SimpleNamespace(headers={}, status_code=404, request=None))
        return str(path)


def test_load_customshift_from_the_hub_fetches_exactly_the_manifest_then_the_weights(trained, tmp_path, monkeypatch):
    trained.save_pretrained(tmp_path / "repo")
    hub = FakeHub(tmp_path / "repo")
    monkeypatch.setattr("customshift.loaders.hf_hub_download", hub)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("no snapshots"))
    pipe = load_tiny(str(tmp_path / "repo"))
    pipe.set_customshift_config(trained.customshift_config.replace(lora_rank=0))

    pipe.load_customshift("me/dog-model", subfolder="customshift", revision="v1")
    assert hub.calls == [("me/dog-model", "customshift", "customshift.json", "v1"),
                         ("me/dog-model", "customshift", "customshift.safetensors", "v1")]
    assert pipe.weights_fingerprint == trained.weights_fingerprint
    hub.calls.clear()
    pipe.load_customshift("me/dog-model")  # no subfolder: the top, then customshift/ (a pipeline repository)
    assert [c[1:3] for c in hub.calls] == [(None, "customshift.json"), ("customshift", "customshift.json"),
                                           ("customshift", "customshift.safetensors")]
    with pytest.raises(WeightsNotFoundError, match="not found"):
        pipe.load_customshift("me/dog-model", subfolder="elsewhere")


def test_from_pretrained_of_a_hub_repository_restores_its_weights(trained, tmp_path, monkeypatch):
    from customshift.pipeline import CustomShiftPipeline

    trained.save_pretrained(tmp_path / "repo")
    snapshot = tmp_path / "snapshot"  # what diffusers' own download fetches: the components, not customshift/
    shutil.copytree(tmp_path / "repo", snapshot, ignore=shutil.ignore_patterns("customshift"))
    monkeypatch.setattr(CustomShiftPipeline, "download", classmethod(lambda cls, *a, **k: str(snapshot)))
    hub = FakeHub(tmp_path / "repo")
    monkeypatch.setattr("customshift.loaders.hf_hub_download", hub)
    pipe = CustomShiftPipeline.from_pretrained("me/dog-model", revision="v2")
    assert pipe.weights_fingerprint == trained.weights_fingerprint
    assert [c[1:] for c in hub.calls] == [("customshift", "customshift.json", "v2"),
                                          ("customshift", "customshift.safetensors", "v2")]
    monkeypatch.setattr("customshift.loaders.hf_hub_download", FakeHub(snapshot))  # a repo without weights
    assert CustomShiftPipeline.from_pretrained("me/plain-sd3").weights_fingerprint == TRAINING_FREE


def test_argument_errors_are_argument_errors(tiny_pipe, tmp_path):
    with pytest.raises(TypeError):
        tiny_pipe.load_customshift(tmp_path, revison="main")
    with pytest.raises(WeightsNotFoundError, match="neither a local folder nor a hub"):
        tiny_pipe.load_customshift(str(tmp_path / "no" / "such" / "folder"))


def test_weight_name_picks_one_of_several_weight_sets(trained, tmp_path):
    trained.save_customshift(tmp_path / "w", weight_name="dog.safetensors")
    assert sorted(os.listdir(tmp_path / "w")) == ["dog.json", "dog.safetensors"]
    with pytest.raises(WeightsNotFoundError):
        trained.load_customshift(tmp_path / "w")
    fingerprint = trained.weights_fingerprint
    trained.set_customshift_config(trained.customshift_config.replace(lora_rank=0))
    trained.load_customshift(tmp_path / "w", weight_name="dog.safetensors")
    assert trained.weights_fingerprint == fingerprint


def test_from_pipe_shares_components_and_keeps_the_weights(trained):
    from diffusers import StableDiffusion3Pipeline

    from customshift.pipeline import CustomShiftPipeline

    again = CustomShiftPipeline.from_pipe(trained)
    assert again.transformer is trained.transformer and again.vae is trained.vae
    assert again.weights_fingerprint == trained.weights_fingerprint
    plain = StableDiffusion3Pipeline.from_pipe(trained)
    assert type(plain) is StableDiffusion3Pipeline and plain.transformer is trained.transformer
    back = CustomShiftPipeline.from_pipe(plain)
    assert back.weights_fingerprint == TRAINING_FREE and back.text_encoder is trained.text_encoder


def test_diffusion_pipeline_from_pretrained_through_the_custom_pipeline_route(trained, tmp_path):
    from diffusers import DiffusionPipeline

    from customshift.pipeline import CustomShiftPipeline

    trained.save_pretrained(tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe", custom_pipeline="customshift_pipeline",
                                             trust_remote_code=True)
    assert type(pipe) is CustomShiftPipeline
    assert pipe.weights_fingerprint == trained.weights_fingerprint


def test_the_default_model_through_diffusion_pipeline_is_trained():
    from diffusers import DiffusionPipeline

    from customshift.default_model import default_model_path

    pipe = DiffusionPipeline.from_pretrained(default_model_path(), custom_pipeline="customshift_pipeline",
                                             trust_remote_code=True)
    assert type(pipe).__name__ == "CustomShiftPipeline" and pipe.weights_fingerprint != TRAINING_FREE


def test_from_single_file_with_a_config_folder(tiny_pipe, tmp_path):
    from customshift.pipeline import CustomShiftPipeline

    tiny_pipe.save_pretrained(tmp_path / "pipe")
    with torch.no_grad():
        tiny_pipe.transformer.proj_out.weight.mul_(-1)  # the file holds other weights than the folder
    state = {k: v.contiguous() for k, v in tiny_pipe.transformer.state_dict().items()}
    save_file(state, tmp_path / "sd3-finetune.safetensors")
    parts = {n: getattr(tiny_pipe, n) for n in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                                                  "tokenizer", "tokenizer_2", "tokenizer_3")}
    pipe = CustomShiftPipeline.from_single_file(str(tmp_path / "sd3-finetune.safetensors"),
                                                config=str(tmp_path / "pipe"), local_files_only=True, **parts)
    assert type(pipe) is CustomShiftPipeline
    assert torch.equal(pipe.transformer.proj_out.weight, state["proj_out.weight"])
    assert all(type(p).__name__ == "CADSAttnProcessor" for p in pipe.transformer.attn_processors.values())


# ----------------------------------------------------------------------------------------------------------
# A weights folder from anywhere (issue 16 items 2 and 4)


def _edit_manifest(folder: Path, change) -> None:
    path = folder / "customshift.json"
    manifest = json.loads(path.read_text())
    result = change(manifest)
    path.write_text(result if isinstance(result, str) else json.dumps(manifest))


def _drop_lora_tensor(folder: Path) -> None:
    state = load_file(str(folder / "customshift.safetensors"))
    state.pop(next(k for k in sorted(state) if k.startswith("reference_lora.")))
    save_file(state, folder / "customshift.safetensors", metadata={"format": "customshift-weights/1"})
    _edit_manifest(folder, lambda m: m.update(weights_sha256=file_sha256(folder / "customshift.safetensors")))


def _config(key, value):
    return lambda folder: _edit_manifest(folder, lambda m: m["config"].update({key: value}))


BAD_WEIGHTS = {
    "missing weights file": lambda f: (f / "customshift.safetensors").unlink(),
    "weights /dev/zero": lambda f: _edit_manifest(f, lambda m: m.update(weights="/dev/zero")),
    "weights ../": lambda f: _edit_manifest(f, lambda m: m.update(weights="../customshift.safetensors")),
    "weights a number": lambda f: _edit_manifest(f, lambda m: m.update(weights=3)),
    "weights empty": lambda f: _edit_manifest(f, lambda m: m.update(weights="")),
    "weights a link to /dev/zero": lambda f: ((f / "zero.safetensors").symlink_to("/dev/zero"),
                                              _edit_manifest(f, lambda m: m.update(weights="zero.safetensors"))),
    "weights truncated": lambda f: os.truncate(f / "customshift.safetensors",
                                               os.path.getsize(f / "customshift.safetensors") - 7),
    "unknown config key": _config("lora_rnak", 4),
    "lora_rank text": _config("lora_rank", "x"),
    "lora_rank 2.5": _config("lora_rank", 2.5),
    "lora_targets a string": _config("lora_targets", "attn.to_q"),
    "cads_form 3": _config("cads_form", 3),
    "beta_init text": _config("beta_init", "x"),
    "max_sequence_length text": _config("max_sequence_length", "long"),
    "max_sequence_length too large": _config("max_sequence_length", 100000),
    "config a list": lambda f: _edit_manifest(f, lambda m: m.update(config=[1, 2])),
    "manifest a FIFO": lambda f: ((f / "customshift.json").unlink(), os.mkfifo(f / "customshift.json")),
    "JSON nested 100000 deep": lambda f: _edit_manifest(f, lambda m: "[" * 100000 + "]" * 100000),
    "a LoRA tensor missing": _drop_lora_tensor,
}


@pytest.fixture
def weights_folder(trained, tmp_path) -> Path:
    return trained.save_customshift(tmp_path / "weights")


def _within(seconds: float, function) -> BaseException | None:
    """Run ``function`` in a daemon thread; its exception, or a failure if it does not end (a hang)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            function()
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        pytest.fail(f"still running after {seconds} s")
    return outcome[0]


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weights_folders_are_refused_before_anything_loads(trained, weights_folder, case):
    BAD_WEIGHTS[case](weights_folder)
    fingerprint = trained.weights_fingerprint
    error = _within(60, lambda: trained.load_customshift(weights_folder))
    assert isinstance(error, WeightsError) and isinstance(error, CustomShiftError), repr(error)
    assert "\n" not in str(error)
    assert trained.weights_fingerprint == fingerprint  # the pipeline was left as it was


@pytest.mark.parametrize("case", ["weights /dev/zero", "lora_rank 2.5", "max_sequence_length too large",
                                  "JSON nested 100000 deep", "a LoRA tensor missing"])
def test_bad_weights_on_the_cli_are_one_error_line(tiny_folder, weights_folder, tmp_path, case):
    from typer.testing import CliRunner

    from customshift.cli import app

    BAD_WEIGHTS[case](weights_folder)
    random_image(0).save(tmp_path / "dog.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "--model", tiny_folder, "--weights", str(weights_folder),
                                      "--reference", str(tmp_path / "dog.png"), "--subject", "dog",
                                      "--prompt", "a dog", "--steps", "1", "--out", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output
    assert not out.exists()


def test_a_manifest_copied_next_to_a_legacy_layout_still_loads(trained, tmp_path):
    """A pipeline folder whose weights sit in customshift/ (the CLI's layout since the first release)."""
    from customshift.default_model import default_model_path

    shutil.copytree(default_model_path() / "customshift", tmp_path / "model" / "customshift")
    manifest = json.loads((tmp_path / "model" / "customshift" / "customshift.json").read_text())
    with pytest.raises(CustomShiftError, match="another base model"):
        trained.load_customshift(tmp_path / "model")  # found in customshift/, refused by fingerprint only
    assert manifest["format"] == "customshift-weights/1"
