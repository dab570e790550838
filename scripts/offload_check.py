"""GPU-only check (issue 19 item 2): offload and device moves keep the subject, on the tiny offline model.

Run on a machine with CUDA: ``python scripts/offload_check.py [OUT_DIR]`` (``scripts/device_session.sh offload``).
Each of ``pipe.to("cuda")``, ``enable_model_cpu_offload()`` and ``enable_sequential_cpu_offload()`` must give
the image of the plain CUDA run, with a subject, with and without reference guidance; under sequential offload
``transformer.device`` is ``meta``, so CADS tensors must come from ``_execution_device``. Exit status 1 on a
mismatch; a JSON summary is written to OUT_DIR/offload-check.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def main(out: Path) -> int:
    from customshift.pipeline import CustomShiftPipeline
    from customshift.tiny import build_tiny_pipeline

    if not torch.cuda.is_available():
        print("offload_check: no CUDA device; this check is GPU-only", file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp()
    build_tiny_pipeline("sd3", seed=0).save_pretrained(folder)
    reference = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")

    def run(mode: str) -> dict[str, np.ndarray]:
        pipe = CustomShiftPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        if mode == "to":
            pipe.to("cuda")
            assert all(p.device.type == "cuda" for p in pipe.reference_branch.parameters())
        else:
            getattr(pipe, mode)()
        subject = pipe.encode_subject(reference, "dog")
        images = {}
        for w_ref in (0.0, 1.5):
            images[f"w_ref={w_ref}"] = pipe(
                "a dog on the beach", subject=subject, reference_guidance_scale=w_ref, num_inference_steps=3,
                generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
        return images

    expected = run("to")
    report: dict[str, dict[str, float | str]] = {}
    failed = False
    for mode in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        try:
            got = run(mode)
            report[mode] = {key: float(np.abs(got[key] - expected[key]).max()) for key in expected}
            failed |= any(value > 1e-4 for value in report[mode].values())
        except Exception as error:  # noqa: BLE001 - the report says which mode failed and how
            report[mode] = {"error": f"{type(error).__name__}: {error}"}
            failed = True
    out.mkdir(parents=True, exist_ok=True)
    (out / "offload-check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
