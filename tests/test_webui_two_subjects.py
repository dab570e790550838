"""The web UI's optional second subject: both subjects through the pipeline, checked like the first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")

from customshift import webui  # noqa: E402
from customshift.tiny import build_tiny_pipeline  # noqa: E402


def png(path, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = build_tiny_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_second_subject_is_the_pipelines_two_subject_image(tiny_pipe, tmp_path):
    engine = webui.DemoEngine(tiny_pipe, output_dir=tmp_path / "out")
    robot, tree = png(tmp_path / "robot.png", 0), png(tmp_path / "tree.png", 1)
    prompt = "a robot and a tree"
    result = engine.generate([robot], "robot", prompt, 1.0, 2.0, 0.0, 2, 5, 32, 32, 1, [tree], "tree")
    assert result.parameters[0]["subjects"] == ["robot", "tree"]
    subjects = [tiny_pipe.encode_subject([Image.open(p).convert("RGB")], name, 32, 32)
                for p, name in ((robot, "robot"), (tree, "tree"))]
    direct = tiny_pipe(prompt, subject=subjects, shift_scale=1.0, guidance_scale=2.0, num_inference_steps=2,
                       height=32, width=32, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    np.testing.assert_array_equal(np.asarray(result.images[0]), np.asarray(direct))
    alone = engine.generate([robot], "robot", prompt, 1.0, 2.0, 0.0, 2, 5, 32, 32, 1)
    assert alone.parameters[0]["subjects"] == ["robot"]
    assert not np.array_equal(np.asarray(alone.images[0]), np.asarray(result.images[0]))


@pytest.mark.parametrize(("uploads", "name", "message"), [
    (["x.png"], "", "needs both"),
    ([], "tree", "needs both"),
    (["x.png"], "Robot", "different names"),
    (["x.png"] * 9, "tree", "allows up to"),
])
def test_second_subject_refused_with_a_message(tiny_pipe, tmp_path, uploads, name, message):
    engine = webui.DemoEngine(tiny_pipe, output_dir=tmp_path / "out")
    with pytest.raises(webui.LimitError, match=message):
        engine.check_request(["r.png"], "robot", "a robot", 1.0, 7.0, 0.0, 2, 0, 32, 32, 1, uploads, name)
    assert engine.check_request(["r.png"], "robot", "a robot", 1.0, 7.0, 0.0, 2, 0, 32, 32, 1)["second"] == []
