"""The training config: typed schema, one `error:` line naming the key, recipes as a base plus differences."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from customshift.cli import app
from customshift.training.config import ConfigError, TrainingConfig, load_config, read_config_file

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "tiny-smoke.yaml"
FIXTURES = Path(__file__).parent / "fixtures"
# keys added since the snapshot
NEW_DEFAULTS = {"train": {"report_to": "auto", "detect_anomaly": False, "routing_loss_weight": 0.0,
                          "subject_reference_dropout": 0.0},
                "data": {"reference_size": None, "distractor_touching": None}}


def test_every_recipe_resolves_to_the_config_it_had_before_the_rewrite():
    """tests/fixtures/resolved_configs.json holds each configs/*.yaml as the previous config loader resolved it."""
    before = json.loads((FIXTURES / "resolved_configs.json").read_text())
    assert set(before) == {p.name for p in (ROOT / "configs").glob("*.yaml")}
    for name, old in before.items():
        old = {k: v for k, v in old.items() if k != "debug"}  # the removed test-hook section, at its defaults
        for section, keys in NEW_DEFAULTS.items():
            old[section] = {**keys, **old[section]}
        now = json.loads(json.dumps(load_config(ROOT / "configs" / name).to_dict()))
        assert now == old, name


def test_default_model_recipes_inherit_and_hold_only_their_differences():
    stages = sorted((ROOT / "configs").glob("default-model-*.yaml"))
    inheriting = [p for p in stages if "base" in read_config_file_raw(p)]
    assert len(inheriting) >= 8
    for path in inheriting:
        raw = read_config_file_raw(path)
        base = read_config_file(path.parent / raw["base"])
        resolved = read_config_file(path)
        assert resolved != base
        for section, value in raw.items():  # every key written differs from what the base says
            if section == "base":
                continue
            if isinstance(value, dict) and section != "model.customshift":
                for key, item in value.items():
                    assert base.get(section, {}).get(key, object()) != item or isinstance(item, dict), \
                        f"{path.name}: {section}.{key} repeats its base"


def read_config_file_raw(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_base_chains_merge_sections_and_replace_choices(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 1\ntrain: {max_steps: 5, learning_rate: 0.01}\n"
                                     "data: {track: {clean: 1, distractor: 1}}\nmodel: {customshift: {lora_rank: 2}}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {max_steps: 7}\ndata: {track: {clean: 1}}\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\nmodel: {customshift: {}}\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.seed == 1 and config.train.max_steps == 7 and config.train.learning_rate == 0.01
    assert config.data.track == {"clean": 1.0}  # a weighted choice is replaced, never half inherited
    assert config.model.customshift == {}  # an empty mapping clears the base's
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
        load_config(tmp_path / "d.yaml")


def test_configs_saved_by_earlier_trainers_still_load():
    saved = read_config_file(FIXTURES / "legacy-run" / "ckpt-0000002" / "config.yaml")
    assert saved["debug"] == {"inject_nan_at_step": None, "checkpoint_sleep": 0.0, "detect_anomaly": False}
    assert TrainingConfig.from_dict(saved).model.customshift["generation_lora_rank"] == 2
    with pytest.raises(ConfigError, match="debug: this section was removed"):
        TrainingConfig.from_dict({**saved, "debug": {"inject_nan_at_step": 3}})


# issue 16, item 8: each bad value is one `error:` line naming the key, exit status 2, before any model loads
BAD = [
    ("train.adam_beta1=1.5", "train.adam_beta1 must be < 1, got 1.5"),
    ("train.logit_std=-1", "train.logit_std must be > 0, got -1"),
    ("train.lr_scheduler=bogus", "train.lr_scheduler must be one of 'linear'"),
    (f"seed={2**70}", "seed must be < 4294967296"),
    ("seed=-1", "seed must be >= 0"),
    ("train.bogus=1", "unknown config key train.bogus"),
    ("bogus=1", "unknown config key bogus"),
    ("data.track=bogus", "data.track: unknown track ['bogus']"),
    ("data.track={clean: 1, nope: 2}", "data.track: unknown track ['nope']"),
    ("train.max_grad_norm=nan", "train.max_grad_norm must be a finite number"),
    ("train.logit_mean=inf", "train.logit_mean must be a finite number"),
    ("train.logit_mean=.inf", "train.logit_mean must be a finite number"),
    ("train.max_steps=many", "train.max_steps must be an integer, got 'many'"),
    ("train.max_steps=true", "train.max_steps must be an integer, got True"),
    ("train.max_steps=2.5", "train.max_steps must be an integer, got 2.5"),
    ("train.max_steps=0", "train.max_steps must be >= 1"),
    ("train.mixed_precision=fp8", "train.mixed_precision must be one of"),
    ("data.batch_size=[1]", "data.batch_size must be an integer"),
    ("model.customshift.lora_rank=x", "model.customshift.lora_rank must be an integer, got 'x'"),
    ("model.customshift.lora_rank=2.5", "model.customshift.lora_rank must be an integer, got 2.5"),
    ("model.customshift.lora_targets=abc", "model.customshift.lora_targets must be a list"),
    ("model.customshift.cads_form=3", "model.customshift.cads_form must be 'split' or 'mask', got 3"),
    ("model.customshift.beta_init=x", "model.customshift.beta_init must be a number"),
    ("model.customshift.nope=1", "unknown config key model.customshift.nope"),
    ("data.reference_size=huge", "data.reference_size: unknown reference size ['huge']"),
    ("data.distractor_touching=1.5", "data.distractor_touching must be <= 1"),
    ("data.distractor_touching=yes", "data.distractor_touching must be a number"),
    ("data.curriculum=[{until_step: 2, layout: bogus}]", "data.curriculum: stage 0: unknown layout"),
    ("train.prompt_dropout=0.9", "must be at most 1"),
    ("output_dir=5", "output_dir must be a string, got 5"),
    ("model=3", "model must be a mapping, got 3"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[b[0][:30] for b in BAD])
def test_a_bad_override_is_one_error_line_naming_the_key(override, message, tmp_path):
    result = CliRunner().invoke(app, ["train", str(SMOKE), "--set", f"output_dir={tmp_path / 'run'}",
                                      "--set", override])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_an_unwritable_output_dir_is_one_error_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["train", str(SMOKE), "--set", f"output_dir={blocker / 'run'}"])
    assert result.exit_code == 2
    assert result.output.startswith("error: output_dir=") and "cannot be written" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_resume_with_a_changed_adapter_shape_names_the_key(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "legacy-run", run)
    saved = read_config_file(run / "ckpt-0000002" / "config.yaml")
    args = ["train", str(SMOKE), "--resume", "--set", f"output_dir={run}",
            "--set", "model.customshift.generation_lora_rank=2", "--set", "model.customshift.lora_rank=2"]
    result = CliRunner().invoke(app, args)
    assert saved["model"]["customshift"]["lora_rank"] == 4
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --resume: model.customshift.lora_rank is 2 here but 4 in ")
    assert (run / "latest").read_text().strip() == "ckpt-0000002" and not (run / "ckpt-0000003").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--resume", "/no/such/run"], "error: no complete checkpoint at /no/such/run"),  # --resume PATH, no config
    (["--resume"], "error: give a config file, or --resume RUN_FOLDER"),  # bare --resume needs a config
    ([str(SMOKE), "--set", "train.max_steps=0", "train.log_every=1"], "error: train.max_steps must be >= 1"),
])
def test_train_resume_takes_an_optional_folder_and_set_several_overrides(args, message):
    """``--resume`` bare or with a folder; ``--set a=1 b=2`` as the argparse entry point took it."""
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(message) and len(result.output.strip().splitlines()) == 1, result.output
