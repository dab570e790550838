#!/usr/bin/env bash
# A lent GPU session in one command. The device image has a CUDA torch but no diffusers, and nothing can be
# downloaded there, so the diffusers wheel travels with the working tree in the git-ignored .gpu/whl:
#
#   mkdir -p .gpu/whl && pip download --no-deps --only-binary=:all: diffusers==0.42.1 -d .gpu/whl
#
# then, through the device tool (carry [".gpu"]; the tool sets $OUT, whose files come back):
#
#   bash scripts/device_session.sh train 7 [KEY=VALUE ...]   # stage 5 of the default model for 7 minutes
#   bash scripts/device_session.sh matrix 300                # the speed matrix (issue 7) within 300 s
#   bash scripts/device_session.sh both 6 240                # both, training first
#   bash scripts/device_session.sh distributed               # DDP, FSDP, DeepSpeed ZeRO-2 launches (tiny model)
#   bash scripts/device_session.sh realsize 300              # real-size training steps (benchmarks/train_real_size.py)
#   bash scripts/device_session.sh offload                   # GPU-only: offload keeps the subject (issue 19 item 2)
#
# What comes back: $OUT/stage5-gpu.tar.* (the run's final/, train_log.csv and config.yaml, in 15 MB parts:
# restore here with `cat FILES/stage5-gpu.tar.* | tar -x`, which recreates runs/default/stage5-gpu), and
# $OUT/speed-gpu.json, $OUT/speed.md (copy both into docs/) with $OUT/speed-gpu-logs.tar.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    wheels=(.gpu/whl/*.whl)
    [[ -f ${wheels[0]} ]] || { echo "no diffusers here and no wheel in .gpu/whl (see the top of $0)" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}" || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
RUN=${RUN:-runs/default/stage5-gpu}

train() {  # train MINUTES [KEY=VALUE ...]
    local minutes=$1; shift
    echo "== stage 5 for $minutes min" >&2
    "$PY" -m customshift train configs/default-model-v4-gpu.yaml \
        --set "train.max_minutes=$minutes" "output_dir=$RUN" "$@" 2>&1 | tr '\r' '\n' | grep -v "^train: " | tail -30
    local rc=${PIPESTATUS[0]}
    if [[ ! -d $RUN/final ]]; then echo "training ended (rc=$rc) without $RUN/final" >&2; return 1; fi
    local keep=("$RUN/final")
    for file in "$RUN/train_log.csv" "$RUN/config.yaml" "$RUN/train.log"; do [[ -f $file ]] && keep+=("$file"); done
    tar -cf - "${keep[@]}" | split -b 15M - "$OUT/stage5-gpu.tar."
    [[ -f $RUN/train_log.csv ]] && tail -2 "$RUN/train_log.csv" >&2
    echo "== stage 5: rc=$rc, $(ls "$OUT"/stage5-gpu.tar.* | wc -l) parts in $OUT" >&2
}

matrix() {  # matrix SECONDS
    PYTHON=$PY BUDGET_S=$1 OUT_DIR=$OUT bash benchmarks/gpu_matrix.sh
    local rc=$?
    if [[ -d $OUT/speed-gpu-logs ]]; then
        tar -C "$OUT" -cf "$OUT/speed-gpu-logs.tar" speed-gpu-logs && rm -rf "$OUT/speed-gpu-logs"
    fi
    return $rc
}

distributed() {  # every GPU launch command of docs/training.md (DDP, FSDP, DeepSpeed ZeRO-2) on the tiny model:
    # 6 steps with a checkpoint at 4, resumed to 8; the exports must hold full (unsharded), finite tensors.
    local n kind run steps rc=0
    n=$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")
    for kind in ddp fsdp deepspeed-zero2; do
        if [[ $kind == deepspeed-zero2 ]] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
            echo "== $kind: SKIPPED (deepspeed is not installed here)" | tee -a "$OUT/distributed.txt" >&2; continue
        fi
        run=/tmp/dist-$kind
        rm -rf "$run"
        for steps in 6 8; do
            local resume=(); [[ $steps == 8 ]] && resume=(--resume)
            "$PY" -m accelerate.commands.launch --config_file "configs/accelerate/$kind.yaml" --num_processes "$n" \
                --mixed_precision bf16 -m customshift train configs/tiny-smoke.yaml "${resume[@]}" \
                --set "output_dir=$run" "train.max_steps=$steps" checkpoint.every_steps=4 train.mixed_precision=bf16 \
                train.log_every=1 data.num_workers=0 > "$OUT/dist-$kind-$steps.log" 2>&1 || rc=1
        done
        "$PY" scripts/distributed_check.py "$run" "$kind" | tee -a "$OUT/distributed.txt" >&2 || rc=1
    done
    return $rc
}

realsize() {  # realsize SECONDS: benchmarks/train_real_size.py on SD3-medium and SD3.5-large shapes (random init)
    local budget=$1 model batch gc
    for model in sd3-medium sd35-large; do
        for batch in 1 4; do
            for gc in 1 0; do
                timeout "$budget" "$PY" benchmarks/train_real_size.py --model "$model" --batch-size "$batch" \
                    --gradient-checkpointing "$gc" --dtype bf16 --steps 3 --json "$OUT/realsize.jsonl" \
                    > "$OUT/realsize-$model-b$batch-gc$gc.log" 2>&1 \
                    || echo "{\"model\": \"$model\", \"batch_size\": $batch, \"gradient_checkpointing\": $gc, \"failed\": true}" \
                        >> "$OUT/realsize.jsonl"
            done
        done
    done
    cat "$OUT/realsize.jsonl" >&2
}

case ${1:-} in
    train) shift; train "$@" ;;
    matrix) matrix "${2:?seconds}" ;;
    both) train "${2:?minutes}"; matrix "${3:?seconds}" ;;
    offload) "$PY" scripts/offload_check.py "$OUT" ;;  # GPU-only (sequential offload fails on CPU for the parent too)
    distributed) distributed ;;  # GPU-only: accelerate's FSDP refuses CPUs, DeepSpeed needs CUDA (docs/training.md)
    realsize) realsize "${2:-300}" ;;
    *) echo "usage: $0 train MINUTES [KEY=VALUE ...] | matrix SECONDS | both MINUTES SECONDS | offload | distributed" \
            "| realsize SECONDS_PER_RUN" >&2; exit 2 ;;
esac
