"""Check a distributed tiny run of scripts/device_session.sh `distributed`: resumed to step 8, full exports.

    python scripts/distributed_check.py RUN_FOLDER KIND

Prints one line; exit status 1 unless the run reached step 8, its final CustomShift export holds every
tensor at its full (unsharded) shape, finite, and validation ran at steps 4, 6 and 8.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run: Path, kind: str) -> int:
    from safetensors.torch import load_file

    from customshift.tiny import build_tiny_pipeline
    from customshift.training.config import load_config
    from customshift.training.model import setup_model

    try:
        state = json.loads((run / "ckpt-0000008" / "state.json").read_text())
        exported = load_file(str(run / "final" / "customshift" / "customshift.safetensors"))
    except OSError as error:
        print(f"== {kind}: FAILED ({error})")
        return 1
    fresh = build_tiny_pipeline("sd3")
    setup_model(fresh, load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny-smoke.yaml"))
    shapes = {k: tuple(v.shape) for k, v in fresh.customshift_state_dict().items()}
    full = set(exported) == set(shapes) and all(tuple(exported[k].shape) == s for k, s in shapes.items())
    finite = all(bool(v.float().isfinite().all()) for v in exported.values())
    validation = run / "validation.csv"
    steps = [r.split(",")[0] for r in validation.read_text().splitlines()[1:]] if validation.is_file() else []
    validated = steps == ["4", "6", "8"]  # every 4 steps, and at the end of the first invocation (max_steps 6)
    ok = full and finite and validated and state["step"] == 8
    print(f"== {kind}: {'ok' if ok else 'FAILED'}: world_size {state['world_size']}, step {state['step']}, "
          f"full tensors {full}, finite {finite}, validated at 4, 6, 8 {validated}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
