#!/usr/bin/env bash
# The recipe of the packaged default model (customshift/assets/default-model). Resumable: rerun the same
# command after an interruption and each stage continues from its last checkpoint.
#   bash scripts/train_default_model.sh
# Stage 1 (VAE, ~30 CPU-minutes), stage 2 (transformer + CustomShift from scratch, ~65 minutes on 2 CPU cores)
# stage 4 (moved subjects, batch 8, ~1 hour on 2 CPU cores), stage 5 (more distractors, ~90 minutes) and stage 6
# (learning-rate cooldown, ~50 minutes) run anywhere; stage 3 (batch 32, 1,323 steps)
# took 7.4 minutes on one H100 and would take hours on a laptop CPU: the trainer picks the GPU through
# accelerate when there is one (accelerate launch -m customshift train ... for several).
# Then: python scripts/package_default_model.py runs/default/stage28-cooldown (the shipped v28; v26 was stage 26,
# v20 stage 20, v6 stage 6).
set -euo pipefail
cd "$(dirname "$0")/.."
VAE_MINUTES=${VAE_MINUTES:-30}
mkdir -p runs/default
if [ ! -f runs/default/stage1-vae/vae_stats.json ]; then
  python -m customshift train-vae --out runs/default/stage1-vae --minutes "$VAE_MINUTES" --threads 1
fi
stage() {  # stage CONFIG RUN: train to the config's max_steps, resuming if the run has checkpoints
  local resume=()
  if ls "$2"/ckpt-* >/dev/null 2>&1; then resume=(--resume); fi
  if [ ! -f "$2/final/info.json" ]; then python -m customshift train "$1" "${resume[@]}"; fi
}
stage configs/default-model-v2.yaml runs/default/stage2-v2
stage configs/default-model-v3-gpu.yaml runs/default/stage3-gpu
stage configs/default-model-v3-stage4.yaml runs/default/stage4-v3
# Stage 5 starts from stage 4 packaged as the v4 default model was (EMA weights, fp16-stored).
if [ ! -f runs/default/v4/model_index.json ]; then
  python scripts/package_default_model.py runs/default/stage4-v3 --dest runs/default/v4
fi
stage configs/default-model-v5-stage5.yaml runs/default/stage5-cpu
# Stage 6 (the cooldown) starts from stage 5 packaged the same way.
if [ ! -f runs/default/v5-4460/model_index.json ]; then
  python scripts/package_default_model.py runs/default/stage5-cpu --dest runs/default/v5-4460
fi
stage configs/default-model-v6-cooldown.yaml runs/default/stage6-cooldown
# Stage 7 (the v7 candidate: spec version 2, two subjects) starts from stage 6 packaged the same way (= v6 as shipped).
if [ ! -f runs/default/v6/model_index.json ]; then
  python scripts/package_default_model.py runs/default/stage6-cooldown --dest runs/default/v6
fi
stage configs/default-model-v7-free.yaml runs/default/stage7-free
# Stages 8-18 (docs/default-model.md, items 8-18): each config's model.pretrained names its start, the previous stage
# packaged with scripts/package_default_model.py --dest runs/default/vN or a committed candidates/ folder (each
# config's header has the command). Stage 18's start, v17, is committed as candidates/v17, so the shipped model's
# last two stages rerun from here: stage 19 from candidates/v17, stage 20 from candidates/v19 (stage 19 packaged).
stage configs/default-model-v19-contact.yaml runs/default/stage19-contact
stage configs/default-model-v20-contact.yaml runs/default/stage20-contact
# Stage 23 starts from stage 20 packaged (= v20 as shipped); stage 26 from stage 23 packaged, committed as candidates/v23.
if [ ! -f runs/default/v20/model_index.json ]; then
  python scripts/package_default_model.py runs/default/stage20-contact --dest runs/default/v20
fi
stage configs/default-model-v23-two.yaml runs/default/stage23-two
stage configs/default-model-v26-cooldown.yaml runs/default/stage26-cooldown
# Stage 27 starts from stage 26 packaged (= v26 as shipped); stage 28 from stage 27 packaged, committed as candidates/v27.
if [ ! -f runs/default/v26/model_index.json ]; then
  python scripts/package_default_model.py runs/default/stage26-cooldown --dest runs/default/v26
fi
stage configs/default-model-v27-two.yaml runs/default/stage27-two
stage configs/default-model-v28-cooldown.yaml runs/default/stage28-cooldown
