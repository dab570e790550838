"""The sprite domain is its own package: the core never imports it, and it plugs in by name like a user's package."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from customshift.training.config import ConfigError, TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "customshift"
# The application layer composes the core with the sprite domain (commands, web UI examples).
APP_MODULES = {"cli.py", "webui.py"}


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved), at any depth."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_no_core_module_imports_the_sprite_package():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "sprites" or str(relative) in APP_MODULES:
            continue
        if any(name == "customshift.sprites" or name.startswith("customshift.sprites.")
               for name in _imported_modules(path)):
            offenders.append(str(relative))
    assert offenders == []


def test_the_scan_sees_relative_imports_of_the_sprite_package():
    """The scan above would catch the imports this project used before the move (not a vacuous check)."""
    assert "customshift.sprites.synthetic" in _imported_modules(PACKAGE / "cli.py")
    assert "customshift.sprites" in _imported_modules(PACKAGE / "sprites" / "evaluate.py")  # ``from . import``


def _loaded_after(code: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\n"
                             "print(json.dumps(sorted(m for m in sys.modules if m.startswith('customshift.'))))"],
                            capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_core_runs_without_loading_the_sprite_package(tmp_path):
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("")
    loaded = _loaded_after(
        "import customshift.pipeline, customshift.generate, customshift.training.trainer, customshift.eval.harness\n"
        "from customshift.training.config import TrainingConfig\n"
        f"TrainingConfig.from_dict({{'data': {{'kind': 'manifest', 'path': {str(manifest)!r}}}}})\n")
    assert "customshift.training.trainer" in loaded
    assert not [m for m in loaded if m.startswith("customshift.sprites")]


def test_the_synthetic_kind_is_found_by_entry_point():
    loaded = _loaded_after("from customshift.training.config import TrainingConfig\n"
                           "TrainingConfig.from_dict({'data': {'kind': 'synthetic', 'track': 'distractor'}})\n")
    assert "customshift.sprites.data" in loaded


def test_the_sprite_source_checks_its_own_names_and_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.placement: unknown placement \['sideways'\]"):
        TrainingConfig.from_dict({"data": {"kind": "synthetic", "placement": {"sideways": 1.0}}})
    with pytest.raises(ConfigError, match=r"data\.curriculum: stage 1: unknown track \['nope'\]"):
        TrainingConfig.from_dict({"data": {"curriculum": [{"until_step": 2}, {"until_step": 4, "track": "nope"}]}})


def test_an_unknown_data_kind_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"data\.kind: unknown name 'sprits'; registered: synthetic .*manifest"):
        TrainingConfig.from_dict({"data": {"kind": "sprits"}})
    with pytest.raises(ConfigError, match=r"data\.kind: 'no_such_module:Source' could not be imported"):
        TrainingConfig.from_dict({"data": {"kind": "no_such_module:Source"}})


class _OnePairSource:
    """A user's own source, named ``module:Class`` in a config without packaging it."""

    length = 1
    checked: list[str] = []

    @classmethod
    def check_config(cls, data) -> None:
        if data.track != "clean":
            raise ValueError("data.track: this source has one track")
        cls.checked.append(data.kind)

    @classmethod
    def from_config(cls, data, seed: int, items_per_step: int) -> _OnePairSource:
        return cls()


def test_a_dotted_source_plugs_in_and_checks_its_config(monkeypatch):
    from customshift.training.data import build_source

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    kind = f"{Path(__file__).stem}:_OnePairSource"
    config = TrainingConfig.from_dict({"data": {"kind": kind}})
    source, order = build_source(config.data, 0, 1)
    assert type(source).__name__ == "_OnePairSource" and order.length == 1
    with pytest.raises(ConfigError, match="data.track: this source has one track"):
        TrainingConfig.from_dict({"data": {"kind": kind, "track": "distractor"}})
    with pytest.raises(ConfigError, match="has one target per reference"):
        TrainingConfig.from_dict({"data": {"kind": kind, "targets_per_reference": 2}})


def test_model_vae_needs_a_registered_model():
    with pytest.raises(ConfigError, match=r"model\.vae applies to a registered model \(sprite\) only"):
        TrainingConfig.from_dict({"model": {"pretrained": "tiny", "vae": "some/folder"}})
