"""Trainer: config, data sources, the objective on a tiny model, NaN stop, exports."""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from customshift.errors import ManifestError
from customshift.sprites.data import SyntheticSource
from customshift.training.config import ConfigError, load_config
from customshift.training.data import (
    GroupLoader,
    ItemOrder,
    ManifestSource,
    Subjects200KSource,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "tiny-smoke.yaml"


@pytest.fixture(scope="module")
def tiny_pipe():
    """Built once; every trainer gets a deep copy (building takes seconds, copying milliseconds)."""
    torch.set_num_threads(1)
    from customshift.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd3")


def make_trainer(tiny_pipe, tmp_path: Path, *overrides: str, resume=False):
    from customshift.training.trainer import Trainer

    config = load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", *overrides])
    return Trainer(config, resume=resume, pipe=copy.deepcopy(tiny_pipe))


def solid(color, size=(40, 40)) -> Image.Image:
    return Image.new("RGB", size, color)


# --------------------------------------------------------------------------------------------------
# Config


def test_config_file_overrides_and_errors(tmp_path):
    config = load_config(SMOKE, ["train.max_steps=7", "train.learning_rate=2e-4", "data.layout={random: 1}"])
    assert config.train.max_steps == 7 and config.train.learning_rate == pytest.approx(2e-4)
    assert config.data.layout == {"random": 1.0}
    toml = tmp_path / "run.toml"
    toml.write_text('output_dir = "x"\n[train]\nmax_steps = 3\n')
    assert load_config(toml).train.max_steps == 3
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_config(SMOKE, ["train.max_stepz=1"])
    with pytest.raises(ConfigError, match="train.max_steps must be an integer, got 'many'"):
        load_config(SMOKE, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(SMOKE, ["data.kind=manifest"])
    with pytest.raises(ConfigError, match="model.customshift"):
        load_config(SMOKE, ["model.customshift.no_such_field=1"])
    with pytest.raises(ConfigError, match="mode=base"):
        load_config(SMOKE, ["mode=base"])
    assert load_config(SMOKE, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML 1.1's "no"
    for example in sorted((ROOT / "configs").glob("*.yaml")):  # every shipped recipe validates
        load_config(example)


# --------------------------------------------------------------------------------------------------
# Data sources


def test_synthetic_source_is_indexable_with_curriculum():
    source = SyntheticSource(3, targets_per_reference=2, layout="random",
                             curriculum=[{"until_step": 2, "layout": "same_layout"}], items_per_step=4)
    a, b = source.get(5), source.get(5)
    assert np.array_equal(np.asarray(a.reference), np.asarray(b.reference)) and a.prompts == b.prompts
    assert len(a.targets) == 2 and a.subject in a.prompts[0]
    assert all(p.layout == "same_layout" for p in source.get(7).pairs)  # step 1
    assert all(p.layout == "random" for p in source.get(8).pairs)  # step 2
    loader = GroupLoader(source, ItemOrder(None, 0), batch_size=3, num_workers=2)
    first = loader.next_batch()
    assert [g.origin for g in first] == ["synthetic item 0", "synthetic item 1", "synthetic item 2"]
    assert loader.state()["cursor"] == 3
    loader.close()


def test_manifest_rows_validated_skipped_and_counted(tmp_path, caplog, monkeypatch):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    solid((255, 0, 0)).save(images / "ref.png")
    solid((0, 0, 255)).save(images / "tgt.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = {"reference": "images/ref.png", "target": "images/tgt.png", "caption": "a dog on snow", "subject": "dog"}
    lines = [
        json.dumps(good),                                              # line 1: good (relative paths)
        "{not json",                                                   # line 2: bad JSON
        json.dumps({**good, "subject": None}),                         # line 3: missing field
        json.dumps({**good, "target": "images/missing.png"}),          # line 4: missing file
        "",                                                            # blank: ignored
        json.dumps({**good, "target": "images/corrupt.png"}),          # line 6: unreadable at read time
        json.dumps({**good, "reference": str(images / "ref.png"), "prompt": "x", "caption": None}),  # 7: missing
        json.dumps({k: v for k, v in good.items() if k != "caption"} | {"prompt": "a dog"}),  # 8: prompt alias
    ]
    manifest = tmp_path / "data" / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the manifest's folder, not the cwd
    with caplog.at_level(logging.WARNING, logger="customshift"):
        source = ManifestSource(manifest)
    assert source.length == 3
    assert dict(source.skipped) == {"bad_json": 1, "missing_field": 2, "missing_file": 1}
    for number in (2, 3, 4, 7):
        assert f"train.jsonl line {number}" in caplog.text
    loader = GroupLoader(source, ItemOrder(source.length, 0, shuffle=False), batch_size=2)
    with caplog.at_level(logging.WARNING, logger="customshift"):
        groups = loader.next_batch()
    assert [g.origin.rsplit(" ", 1)[-1] for g in groups] == ["1", "8"]
    assert loader.skipped == {"unreadable_image": 1} and "line 6" in caplog.text
    assert np.asarray(groups[0].targets[0])[0, 0].tolist() == [0, 0, 255]
    assert groups[1].prompts == ["a dog"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    with pytest.raises(ManifestError, match="no usable rows"):
        ManifestSource(bad)


def _composite(left, right, half=48, pad=4) -> bytes:
    image = Image.new("RGB", (2 * half, half), (255, 255, 255))
    image.paste(solid(left, (half - 2 * pad, half - 2 * pad)), (pad, pad))
    image.paste(solid(right, (half - 2 * pad, half - 2 * pad)), (half + pad, pad))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_subjects200k(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        ((255, 0, 0), (0, 255, 0), "red mug", "a red mug on a desk", "a red mug in the snow", 5, "collection_2"),
        ((0, 0, 255), (255, 255, 0), "blue car", "a blue car", "a blue car at night", 5, "collection_2"),
        ((9, 9, 9), (9, 9, 9), "grey box", "a grey box", "", 5, "collection_2"),  # empty description_1
        ((1, 2, 3), (4, 5, 6), "low", "low quality", "low quality", 2, "collection_2"),  # filtered
        ((7, 7, 7), (8, 8, 8), "other", "other", "other", 5, "collection_1"),  # filtered
    ]
    images = [{"bytes": _composite(a, b), "path": None} for a, b, *_ in rows]
    images.append({"bytes": b"not an image", "path": None})
    descriptions = [{"item": r[2], "description_0": r[3], "description_1": r[4], "category": "x",
                     "description_valid": True} for r in rows]
    descriptions.append({"item": "broken", "description_0": "a broken", "description_1": "b broken",
                         "category": "x", "description_valid": True})
    quality = [{"compositeStructure": r[5], "objectConsistency": 5, "imageQuality": 5} for r in rows] + [
        {"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5}]
    table = pa.table({
        "image": images,
        "collection": [r[6] for r in rows] + ["collection_2"],
        "quality_assessment": quality,
        "description": descriptions,
    })
    pq.write_table(table, path, row_group_size=4)


def test_subjects200k_parquet_halves_and_descriptions(tmp_path):
    path = tmp_path / "s200k" / "train-00000.parquet"
    path.parent.mkdir()
    write_subjects200k(path)
    source = Subjects200KSource(path.parent, padding=4, min_quality=5, collections=["collection_2"])
    assert source.length == 6  # rows 0, 1 and the broken-image row, two directions each
    assert source.skipped["missing_field"] == 1 and source.skipped["filtered"] == 2
    forward, backward = source.get(0), source.get(1)
    assert forward.subject == "red mug" and forward.prompts == ["a red mug in the snow"]
    assert np.asarray(forward.reference).shape == (40, 40, 3)
    assert (np.asarray(forward.reference) == [255, 0, 0]).all()  # left half, padding cropped
    assert (np.asarray(forward.targets[0]) == [0, 255, 0]).all()  # right half
    assert backward.prompts == ["a red mug on a desk"]
    assert (np.asarray(backward.reference) == [0, 255, 0]).all()
    assert source.get(2).prompts == ["a blue car at night"]
    order = ItemOrder(source.length, 0, blocks=source.blocks)
    assert sorted(order(i) for i in range(6)) == list(range(6))
    loader = GroupLoader(source, ItemOrder(source.length, 0, shuffle=False), batch_size=4)
    assert len(loader.next_batch()) == 4 and loader.state()["cursor"] == 4 and not loader.skipped
    loader.next_batch()  # positions 4 and 5 (the broken image, both directions) are skipped, 6..9 wrap around
    assert loader.state()["cursor"] == 10 and loader.skipped == {"unreadable_image": 2}
    with pytest.raises(ManifestError):
        Subjects200KSource(tmp_path / "nothing-here")


# --------------------------------------------------------------------------------------------------
# Objective


NO_DROPOUT = ("train.prompt_dropout=0", "train.reference_dropout=0", "train.both_dropout=0")


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_pipe, tmp_path):
    trainer = make_trainer(tiny_pipe, tmp_path, *NO_DROPOUT, "train.learning_rate=1e-2",
                           "model.customshift.generation_lora_rank=4", "checkpoint.every_steps=0")
    groups = trainer.loader.next_batch()
    frozen = trainer.pipe.vae.encoder.conv_in.weight.clone()
    base = next(p for n, p in trainer.pipe.transformer.named_parameters() if "base_layer" in n)
    base_before = base.detach().clone()
    before = trainer.loss_on(groups, seed=0)
    for _ in range(8):
        trainer.train_step([groups])
    after = trainer.loss_on(groups, seed=0)
    assert after < 0.97 * before, (before, after)
    assert torch.equal(trainer.pipe.vae.encoder.conv_in.weight, frozen)
    assert torch.equal(base.detach(), base_before)
    beta = trainer.pipe.reference_branch.shift.beta.detach()
    assert not torch.equal(beta, torch.full_like(beta, 1.0))  # beta_init 1.0 in the smoke config


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_pipe, tmp_path, monkeypatch):
    from customshift.training.trainer import TrainingDiverged, find_checkpoint, load_pipeline_from_checkpoint

    trainer = make_trainer(tiny_pipe, tmp_path, "checkpoint.every_steps=2", "train.max_steps=6")
    forward = trainer.model.forward

    def poisoned(batch):  # the loss of step 3 becomes NaN
        loss, per_sample = forward(batch)
        return (loss * float("nan") if trainer.step + 1 == 3 else loss), per_sample

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3 .*synthetic item"):
        trainer.train()
    run = tmp_path / "run"
    assert find_checkpoint(run).name == "ckpt-0000002"
    assert not (run / "ckpt-0000003").exists() and not (run / "final").exists()
    pipe = load_pipeline_from_checkpoint(run)
    assert pipe.reference_branch.config.lora_rank == 4


def test_max_minutes_ends_the_run_like_max_steps(tiny_pipe, tmp_path):
    """A time-boxed run stops at the first step past its limit and still writes its checkpoint and final/."""
    from customshift.training.trainer import find_checkpoint

    trainer = make_trainer(tiny_pipe, tmp_path, "train.max_steps=50", "train.max_minutes=1e-9",
                           "checkpoint.every_steps=0")
    trainer.train()
    run = tmp_path / "run"
    assert trainer.step == 1 and find_checkpoint(run).name == "ckpt-0000001"
    assert json.loads((run / "final" / "info.json").read_text())["step"] == 1
    with pytest.raises(ConfigError, match="train.max_minutes must be >= 0"):
        load_config(SMOKE, ["train.max_minutes=-1"])


def test_base_mode_full_training_exports_a_loadable_pipeline(tiny_pipe, tmp_path):
    from customshift.pipeline import CustomShiftPipeline

    trainer = make_trainer(tiny_pipe, tmp_path, "mode=base", "train.trainable=full", "train.max_steps=2",
                           "checkpoint.every_steps=0")
    assert all(n.startswith("transformer.") for n in trainer.trainable)
    trainer.train()
    final = tmp_path / "run" / "final" / "pipeline"
    pipe = CustomShiftPipeline.from_pretrained(final)
    trained = dict(trainer.pipe.transformer.named_parameters())["proj_out.weight"]
    assert torch.equal(pipe.transformer.proj_out.weight, trained.detach())
    assert not torch.equal(tiny_pipe.transformer.proj_out.weight, trained.detach())


def test_foreground_weights_mark_the_subject_and_weigh_the_loss(tiny_pipe, tmp_path):
    from customshift.training.trainer import foreground_weights

    image = np.full((32, 32, 3), 240, dtype=np.uint8)
    image[8:16, 20:28] = (220, 50, 50)  # an 8 x 8 subject on a uniform background
    weights = foreground_weights([Image.fromarray(image)], 32, (8, 8), 5.0)
    assert weights.shape == (1, 1, 8, 8)
    expected = torch.ones(8, 8)
    expected[2:4, 5:7] = 5.0  # 4-px latent cells covering the subject
    assert torch.equal(weights[0, 0], expected)
    # Images of other sizes are brought to the training resolution first (here 64 px -> 32 px).
    large = Image.fromarray(image).resize((64, 64), Image.NEAREST)
    assert torch.equal(foreground_weights([large, Image.fromarray(image)], 32, (8, 8), 5.0)[0, 0], expected)
    # In the trainer the weighted loss differs from the plain one on the same batch, noise and sigmas.
    plain = make_trainer(tiny_pipe, tmp_path / "a", *NO_DROPOUT, "checkpoint.every_steps=0")
    weighted = make_trainer(tiny_pipe, tmp_path / "b", *NO_DROPOUT, "checkpoint.every_steps=0",
                            "train.foreground_loss_weight=5")
    groups = plain.loader.next_batch()
    batch = weighted.prepare_batch(groups, torch.Generator().manual_seed(0))
    assert batch["loss_weights"].max() == 5.0 and batch["loss_weights"].min() == 1.0
    assert plain.loss_on(groups, seed=0) != pytest.approx(weighted.loss_on(groups, seed=0), rel=1e-4)


def test_a_later_stage_starts_from_saved_customshift_weights(tiny_pipe, tmp_path):
    first = make_trainer(tiny_pipe, tmp_path / "a", *NO_DROPOUT, "train.learning_rate=1e-2",
                         "model.customshift.generation_lora_rank=4", "checkpoint.every_steps=0")
    groups = first.loader.next_batch()
    for _ in range(3):
        first.train_step([groups])
    first.pipe.save_customshift(tmp_path / "weights")
    saved = first.pipe.customshift_state_dict()
    second = make_trainer(tiny_pipe, tmp_path / "b", *NO_DROPOUT, "checkpoint.every_steps=0",
                          f"model.customshift_weights={tmp_path / 'weights'}", "model.customshift={}")
    loaded = second.pipe.customshift_state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert second.loss_on(groups, seed=0) == pytest.approx(first.loss_on(groups, seed=0), rel=1e-5)
    with pytest.raises(ConfigError, match="differs from the config saved"):
        make_trainer(tiny_pipe, tmp_path / "c", f"model.customshift_weights={tmp_path / 'weights'}",
                     "model.customshift.lora_rank=2")


def test_a_later_stage_may_add_a_generation_lora_which_starts_as_the_same_model(tiny_pipe, tmp_path):
    first = make_trainer(tiny_pipe, tmp_path / "a", *NO_DROPOUT, "checkpoint.every_steps=0")
    weights = first.pipe.save_customshift(tmp_path / "weights")
    groups = first.loader.next_batch()
    later = make_trainer(tiny_pipe, tmp_path / "b", *NO_DROPOUT, "checkpoint.every_steps=0",
                         f"model.customshift_weights={weights}", "model.customshift.generation_lora_rank=4")
    assert later.pipe.customshift_config.generation_lora_rank == 4
    saved, loaded = first.pipe.customshift_state_dict(), later.pipe.customshift_state_dict()
    added = set(loaded) - set(saved)
    assert added and all(torch.equal(loaded[k], saved[k]) for k in saved)  # the old parts exactly as saved
    assert later.loss_on(groups, seed=0) == pytest.approx(first.loss_on(groups, seed=0), rel=1e-6)  # LoRA B = 0
    trained = {id(p) for group in later.optimizer.param_groups for p in group["params"]}
    lora = [p for n, p in later.pipe.transformer.named_parameters() if "lora_B" in n]
    assert lora and all(id(p) in trained and p.requires_grad for p in lora)
    with_lora = later.pipe.save_customshift(tmp_path / "with-lora")
    with pytest.raises(ConfigError, match="differs from the config saved"):  # switched on once, never resized
        make_trainer(tiny_pipe, tmp_path / "c", f"model.customshift_weights={with_lora}",
                     "model.customshift.generation_lora_rank=2")


@pytest.mark.parametrize("size", [1, 64])
def test_prompt_cache_gives_the_same_batch_and_skips_the_text_encoders(tiny_pipe, tmp_path, monkeypatch, size):
    plain = make_trainer(tiny_pipe, tmp_path / "a", "checkpoint.every_steps=0")
    cached = make_trainer(tiny_pipe, tmp_path / "b", "checkpoint.every_steps=0", f"data.prompt_cache_size={size}")
    groups = plain.loader.next_batch()
    expected = plain.prepare_batch(groups, torch.Generator().manual_seed(0))
    calls = []
    encode = cached.pipe.encode_prompt
    monkeypatch.setattr(cached.pipe, "encode_prompt", lambda **kw: calls.append(kw["prompt"]) or encode(**kw))
    for _ in range(2):  # the second time every prompt is known (when the cache holds a batch)
        batch = cached.prepare_batch(groups, torch.Generator().manual_seed(0))
        for key in ("prompt_embeds", "pooled_embeds", "subject_weights"):
            torch.testing.assert_close(batch[key], expected[key], rtol=1e-5, atol=1e-6)
    calls = [c for c in calls if isinstance(c, list)]  # (subject names are encoded, and cached, apart)
    prompts = len(set(batch["prompts"]))
    if size >= prompts:
        assert len(calls) == 1 and sorted(calls[0]) == sorted(set(batch["prompts"]))
    else:  # smaller than a batch: still right, by encoding the batch again
        assert len(cached._prompt_cache) <= size and len(calls) >= 2


def test_validation_writes_a_grid_and_metrics_through_the_trackers(tiny_pipe, tmp_path):
    import csv
    import importlib.util

    trainer = make_trainer(tiny_pipe, tmp_path, "train.max_steps=2", "validation.every_steps=2",
                           "validation.num_pairs=2", "validation.num_inference_steps=2", "checkpoint.every_steps=0",
                           "train.log_every=1", "train.ema_decay=0.5")
    trainer.train()
    run = tmp_path / "run"
    assert (run / "validation" / "step-0000002.png").is_file()
    rows = list(csv.DictReader((run / "validation.csv").open()))
    assert [r["step"] for r in rows] == ["2"] and 0 <= float(rows[0]["identity"]) <= 1
    assert "identity_wrong_reference" in rows[0]
    assert [r["step"] for r in csv.DictReader((run / "train_log.csv").open())] == ["1", "2"]
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="train.report_to asks for tensorboard, which is not installed"):
            make_trainer(tiny_pipe, tmp_path / "tb", "train.report_to=[tensorboard]")
