"""``customshift serve``: bad numbers are one error line before any model loads; the upload-folder budget reaches
the app."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from customshift import webui
from customshift.cli import app


@pytest.mark.parametrize(("args", "message"), [
    (["--max-upload-mb", "-1"], "--max-upload-mb must be a positive number, got -1"),
    (["--max-upload-mb", "nan"], "--max-upload-mb must be a positive number, got nan"),
    (["--max-upload-cache-mb", "0"], "--max-upload-cache-mb must be a positive number, got 0"),
    (["--max-images-per-request", "0"], "--max-images-per-request must be a positive number"),
    (["--port", "70000"], "--port must be between 1 and 65535"),
    (["--device", "cuda:99"], "--device cuda:99"),
])
def test_bad_serve_options_are_one_error_line_before_loading(args, message, monkeypatch):
    monkeypatch.setattr(webui, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(app, ["serve", *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        result.output


def test_the_upload_cache_budget_reaches_the_app(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_create_app(pipe, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(webui, "load_pipeline", lambda *a, **k: (object(), None, "model"))
    monkeypatch.setattr(webui, "create_app", fake_create_app)
    with pytest.raises(Stop):
        webui.serve(max_upload_cache_mb=5.0, block=False)
    assert seen["max_upload_cache_mb"] == 5.0
    monkeypatch.setattr(webui, "serve", lambda *a, **kwargs: seen.update(cli=kwargs))
    assert CliRunner().invoke(app, ["serve", "--max-upload-cache-mb", "7.5"]).exit_code == 0
    assert seen["cli"]["max_upload_cache_mb"] == 7.5
