#!/usr/bin/env bash
# Every measurement of the shipped default model that docs/default-model.md, docs/synthetic.md and the README show,
# rerun after a new model is packaged into customshift/assets/default-model (about 30 minutes on 2 CPU cores).
#   bash scripts/evaluate_default_model.sh vN    # vN: the new version; its gap and routing go to docs/results/default-model-vN
# Save the previous model's docs/results/default-model/{summary.md,summary.json,probe.json} first (as
# docs/results/default-model-vPREVIOUS/all-tracks-summary.* and probe.json): this overwrites them.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/evaluate_default_model.sh vN}
export HF_HUB_OFFLINE=1
versioned=docs/results/default-model-$version
mkdir -p "$versioned"
customshift evaluate synthetic --out docs/results/default-model --n 64 --steps 20 --guidance-scale 2.0 --batch-size 8
customshift evaluate synthetic --out docs/results/default-model-same-layout --n 64 --layout same_layout --track clean \
  --guidance-scale 2 --batch-size 8
python scripts/two_subject_gap.py customshift/assets/default-model --n 32 --json "$versioned/two-subject-gap.json"
customshift evaluate probe --n 64 --layout same_layout --layout same_size --layout random \
  --json docs/results/default-model/probe.json
customshift evaluate probe --n 16 --routing --json "$versioned/routing-$version.json"
customshift demo --out docs/images
customshift demo --out docs/images --layout same_layout
customshift demo --track two-subject --guidance-scale 2 --out docs/images
python scripts/screenshot_webui.py
