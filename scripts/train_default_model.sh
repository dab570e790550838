#!/usr/bin/env bash
# The recipe of the packaged default model (customshift/assets/default-model). CPU-only, resumable:
# rerun the same command after an interruption and each stage continues from its last checkpoint.
#   bash scripts/train_default_model.sh            # stage 1 (VAE) then stage 2 (transformer + CustomShift)
# Then: python scripts/package_default_model.py runs/default/stage2
set -euo pipefail
cd "$(dirname "$0")/.."
VAE_MINUTES=${VAE_MINUTES:-30}
mkdir -p runs/default
if [ ! -f runs/default/stage1-vae/vae_stats.json ]; then
  python -m customshift.training.vae --out runs/default/stage1-vae --minutes "$VAE_MINUTES" --threads 1
fi
resume=()
if ls runs/default/stage2/ckpt-* >/dev/null 2>&1; then resume=(--resume); fi
python -m customshift.training.trainer configs/default-model.yaml "${resume[@]}"
