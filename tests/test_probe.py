"""The reference-use probe: its cell reading is exact, and a reference with no attention mass changes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from customshift.config import CustomShiftConfig
from customshift.sprites import synthetic
from customshift.sprites.probe import _cell_accuracy, colour_recovery, gate, probe_markdown


@pytest.fixture(scope="module")
def sprite_sized_folder(tmp_path_factory):
    """A tiny random SD3 at the sprite canvas size (64 px)."""
    from customshift.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-64")
    build_tiny_pipeline("sd3", sample_size=32).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("track", ["clean", "distractor"])
def test_cells_are_read_exactly_at_the_known_box(track):
    pairs = synthetic.evaluation_split(n=24, track=track)
    assert all(_cell_accuracy(p.target, p.subject, p.target_context) == 1.0 for p in pairs)
    # Another subject's target in the same context scores what the colourings share, below 1.
    wrong = [_cell_accuracy(synthetic.render(q.subject, p.target_context), p.subject, p.target_context)
             for p, q in zip(pairs, pairs[1:], strict=False)]
    assert max(wrong) < 1.0 and np.mean(wrong) < 0.5


def test_reference_without_mass_gives_the_same_numbers_for_every_condition(sprite_sized_folder):
    from customshift.pipeline import CustomShiftPipeline

    torch.set_num_threads(1)
    pipe = CustomShiftPipeline.from_pretrained(sprite_sized_folder)
    pipe.set_customshift_config(CustomShiftConfig(lora_rank=0, cads_shift="mass", beta_init=-60.0, gamma_init=0.0))
    pairs = synthetic.evaluation_split(n=3)
    result = colour_recovery(pipe, pairs, (0.5, 0.95), max_sequence_length=16)
    assert set(result) == {"right", "wrong", "none"} and set(result["right"]) == {"0.5", "0.95"}
    assert result["right"] == result["wrong"] == result["none"]
    assert all(0.0 <= v <= 1.0 for cond in result.values() for v in cond.values())
    assert gate(result, (0.5, 0.95)) == 0.0
    table = probe_markdown({"random": result})
    assert table.count("| random |") == 3 and "sigma 0.95" in table


def test_cli_probe_prints_the_gate_and_writes_json(sprite_sized_folder, tmp_path):
    from customshift.cli import app

    out = tmp_path / "probe.json"
    result = CliRunner().invoke(app, ["evaluate", "probe", "--model", sprite_sized_folder, "--n", "2",
                                      "--layout", "same_layout", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "same_layout: gate" in result.output
    assert set(json.loads(out.read_text())["same_layout"]) == {"right", "wrong", "none"}
    assert torch.is_grad_enabled()  # an in-process probe leaves autograd as it found it


def test_a_run_holding_only_its_final_export_loads_with_its_weights(sprite_sized_folder, tmp_path):
    """A run copied back from another machine keeps just ``final/{pipeline,customshift}``: the probe reads it."""
    from customshift.pipeline import CustomShiftPipeline
    from customshift.sprites.probe import load_model

    pipe = CustomShiftPipeline.from_pretrained(sprite_sized_folder)
    pipe.set_customshift_config(CustomShiftConfig(lora_rank=2, cads_shift="mass", beta_init=-3.0))
    final = tmp_path / "run" / "final"
    pipe.save_pretrained(final / "pipeline")
    pipe.save_customshift(final / "customshift")
    for folder in (tmp_path / "run", final):
        loaded = load_model(str(folder))
        assert loaded.reference_branch.config.cads_shift == "mass"
        assert torch.equal(loaded.reference_branch.shift.beta, pipe.reference_branch.shift.beta)


@pytest.mark.parametrize("beta", [-2.0, 0.5])
def test_routing_shares_without_subject_relevance_are_even_with_the_mass_of_the_shift(sprite_sized_folder, beta):
    from customshift.pipeline import CustomShiftPipeline
    from customshift.sprites.probe import routing_shares

    torch.set_num_threads(1)
    pipe = CustomShiftPipeline.from_pretrained(sprite_sized_folder)
    # gamma = 0: both subjects get the same shift beta everywhere, so neither region prefers its own reference
    pipe.set_customshift_config(CustomShiftConfig(lora_rank=0, cads_shift="mass", beta_init=beta, gamma_init=0.0))
    result = routing_shares(pipe, synthetic.two_subject_split(n=2), (0.5, 0.9), max_sequence_length=16)
    mass = 2 * np.exp(beta) / (1 + 2 * np.exp(beta))  # softmax(0, beta, beta) on the two references
    for row in result.values():
        assert row["own"] == pytest.approx(0.5, abs=1e-6)
        assert row["region_mass"] == pytest.approx(mass, rel=1e-5)
        assert row["background_mass"] == pytest.approx(mass, rel=1e-5)
    # gamma > 0 makes the shares depend on each name's relevance: no longer exactly even
    pipe.set_customshift_config(CustomShiftConfig(lora_rank=0, cads_shift="mass", beta_init=beta, gamma_init=8.0))
    routed = routing_shares(pipe, synthetic.two_subject_split(n=2), (0.9,), max_sequence_length=16)
    assert routed["0.9"]["own"] != pytest.approx(0.5, abs=1e-4)
    assert 0 <= routed["0.9"]["recovery"] <= 1 and 0 <= routed["0.9"]["recovery_wrong"] <= 1


def test_routing_probe_colour_recovery_control_equals_when_the_references_carry_no_mass(sprite_sized_folder):
    from customshift.pipeline import CustomShiftPipeline
    from customshift.sprites.probe import routing_shares

    torch.set_num_threads(1)
    pipe = CustomShiftPipeline.from_pretrained(sprite_sized_folder)
    pipe.set_customshift_config(CustomShiftConfig(lora_rank=0, cads_shift="mass", beta_init=-80.0, gamma_init=0.0))
    row = routing_shares(pipe, synthetic.two_subject_split(n=3), (0.9,), max_sequence_length=16)["0.9"]
    assert row["region_mass"] < 1e-30 and row["recovery"] == row["recovery_wrong"]
    pipe.set_customshift_config(CustomShiftConfig(lora_rank=0, cads_shift="mass", beta_init=4.0, gamma_init=0.0))
    row = routing_shares(pipe, synthetic.two_subject_split(n=3), (0.9,), max_sequence_length=16)["0.9"]
    assert row["region_mass"] > 0.9  # the same pairs with the references switched on


def test_cli_probe_routing_prints_the_table(sprite_sized_folder, tmp_path):
    from customshift.cli import app

    out = tmp_path / "routing.json"
    result = CliRunner().invoke(app, ["evaluate", "probe", "--model", sprite_sized_folder, "--n", "2", "--routing",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "| sigma | own share |" in result.output
    assert set(json.loads(out.read_text())["0.95"]) == {"own", "region_mass", "background_mass", "recovery",
                                                         "recovery_wrong"}
