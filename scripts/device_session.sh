#!/usr/bin/env bash
# A lent GPU session in one command. The device image has a CUDA torch but no diffusers, and nothing can be
# downloaded there, so the diffusers wheel travels with the working tree in the git-ignored .gpu/whl:
#
#   mkdir -p .gpu/whl && pip download --no-deps --only-binary=:all: diffusers==0.42.1 -d .gpu/whl
#
# then, through the device tool (carry [".gpu"]; the tool sets $OUT, whose files come back):
#
#   bash scripts/device_session.sh v2 8 [KEY=VALUE ...]      # stage 24 (spec version 2, issue 18): train, package, score
#   DRY_RUN=1 bash scripts/device_session.sh v2 1            # the same steps on this CPU, 2 steps and 2 pairs
#   bash scripts/device_session.sh train 7 [KEY=VALUE ...]   # stage 5 of the default model for 7 minutes
#   bash scripts/device_session.sh matrix 300                # the speed matrix (issue 7) within 300 s
#   bash scripts/device_session.sh both 6 240                # both, training first
#   bash scripts/device_session.sh distributed               # DDP, FSDP, DeepSpeed ZeRO-2/3 launches (tiny model)
#   bash scripts/device_session.sh realsize 300              # real-size training steps (benchmarks/train_real_size.py)
#   bash scripts/device_session.sh offload                   # GPU-only: offload keeps the subject (issue 19 item 2)
#   bash scripts/device_session.sh issue17 570               # issue 17 item 5, one run under 10 minutes (below)
#   DRY_RUN=1 bash scripts/device_session.sh issue17         # the same python on this CPU, tiny shapes, nothing kept
#
# issue17: the speed matrix (SD3-medium at 1024² with 512² and 1024² references, SD3.5-large at 1024² with 512²),
# peak memory on the GPU / with model offload / with sequential offload (SD3-medium 1024², 512² reference), and
# the real-size training memory (the training issue's benchmarks/train_real_size.py, one line: the slot below).
# Results land in $OUT/docs/results/speed/ (copy back with `cp -r FILES/docs .`): issue17-speed-gpu.json,
# issue17-speed.md (the gpu block of docs/speed.md), offload-memory.json, train-real-size.jsonl, logs.
#
# v2: configs/default-model-v24-gpu.yaml for at most MINUTES (1,200 steps), packaged (EMA, fp16) and scored on the
# GPU: $OUT/v24/eval (every track of `customshift evaluate synthetic`, 64 pairs, guidance 2) and $OUT/v24/compare.json
# (scripts/compare_models.py against the shipped model on v6's tracks and two subjects, paired), and the package
# itself as $OUT/v24-package.tar.* (restore with `cat FILES/v24-package.tar.* | tar -x`, which recreates
# runs/default/v24). Budget: the machine's start, MINUTES of training and about 2 minutes of scoring.
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

v2() {  # v2 MINUTES [KEY=VALUE ...]: stage 24 on the version-2 distribution, then package and score it
    local minutes=$1 run=runs/default/stage24-gpu package=runs/default/v24 n=64 device=cuda extra=(); shift
    if [[ ${DRY_RUN:-0} == 1 ]]; then  # CPU: every step runs, nothing is worth keeping
        run=/tmp/stage24-dry package=/tmp/v24-dry n=2 device=cpu
        extra=(train.max_steps=2 data.batch_size=2 data.num_workers=0 checkpoint.every_steps=2)
    fi
    mkdir -p "$OUT/v24"
    echo "== stage 24 for $minutes min" >&2
    "$PY" -m customshift train configs/default-model-v24-gpu.yaml --set "train.max_minutes=$minutes" "output_dir=$run" \
        "${extra[@]}" "$@" 2>&1 | tr '\r' '\n' | grep -v "^train: " | tail -30
    [[ -f $run/train_log.csv ]] && cp "$run/train_log.csv" "$OUT/v24/"
    "$PY" scripts/package_default_model.py "$run" --dest "$package" \
        --recipe "configs/default-model-v24-gpu.yaml from the shipped default model (scripts/device_session.sh v2)" \
        || { echo "stage 24: nothing to package in $run" >&2; return 1; }
    tar -cf - "$package" | split -b 15M - "$OUT/v24-package.tar."
    echo "== scoring $package" >&2
    "$PY" -m customshift evaluate synthetic --model "$package" --n "$n" --guidance-scale 2 --batch-size 16 \
        --device "$device" --out "$OUT/v24/eval" 2>&1 | tail -12
    "$PY" scripts/compare_models.py customshift/assets/default-model "$package" --n "$n" --track clean \
        --track distractor --track two-subject --device "$device" --batch-size 16 --json "$OUT/v24/compare.json"
}

matrix() {  # matrix SECONDS
    PYTHON=$PY BUDGET_S=$1 OUT_DIR=$OUT bash benchmarks/gpu_matrix.sh
    local rc=$?
    if [[ -d $OUT/speed-gpu-logs ]]; then
        tar -C "$OUT" -cf "$OUT/speed-gpu-logs.tar" speed-gpu-logs && rm -rf "$OUT/speed-gpu-logs"
    fi
    return $rc
}

distributed() {  # every GPU launch command of docs/training.md (DDP, FSDP, DeepSpeed ZeRO-2/3) on the tiny model:
    # 6 steps with a checkpoint at 4, resumed to 8, validation at 4, 6 and 8; the exports must hold full (unsharded),
    # finite tensors and validation.csv a row per validation.
    local n kind run steps rc=0
    n=$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")
    for kind in ddp fsdp deepspeed-zero2 deepspeed-zero3; do
        if [[ $kind == deepspeed-* ]] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
            echo "== $kind: SKIPPED (deepspeed is not installed here)" | tee -a "$OUT/distributed.txt" >&2; continue
        fi
        run=/tmp/dist-$kind
        rm -rf "$run"
        for steps in 6 8; do
            local resume=(); [[ $steps == 8 ]] && resume=(--resume)
            "$PY" -m accelerate.commands.launch --config_file "configs/accelerate/$kind.yaml" --num_processes "$n" \
                --mixed_precision bf16 -m customshift train configs/tiny-smoke.yaml "${resume[@]}" \
                --set "output_dir=$run" "train.max_steps=$steps" checkpoint.every_steps=4 train.mixed_precision=bf16 \
                train.log_every=1 data.num_workers=0 validation.every_steps=4 validation.num_pairs=2 \
                validation.num_inference_steps=2 > "$OUT/dist-$kind-$steps.log" 2>&1 || rc=1
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

issue17() {  # issue17 SECONDS: each part under its own limit, so a short lease keeps the parts already done
    local budget=${1:-570} start res dry=${DRY_RUN:-0}
    start=$(date +%s)
    res=$OUT/docs/results/speed
    mkdir -p "$res/issue17-logs"
    left() { echo $(( budget - ($(date +%s) - start) )); }
    part() {  # part NAME SECONDS COMMAND...: the limit is cut to what is left of the budget
        local name=$1 limit=$2; shift 2
        (( limit > $(left) )) && limit=$(left)
        if (( limit < 20 )); then echo "== $name: SKIPPED (${limit}s left)" >&2; return 1; fi
        echo "== $name (limit ${limit}s)" >&2
        timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$res/issue17-logs/$name.log" 2>&1
        local rc=$?
        tail -3 "$res/issue17-logs/$name.log" >&2
        echo "== $name: rc=$rc at $(( $(date +%s) - start ))s" >&2
        return $rc
    }
    if [[ $dry == 1 ]]; then  # CPU, tiny shapes: checks that every python part runs; the results are not kept
        part speed 200 "$PY" benchmarks/speed.py --size toy --level transformer --device cpu --dtype fp32 --runs 1 \
            --warmup 0 --steps 2 --no-finetune --out "$res/issue17-speed-dry.json"
        part offload-memory 200 "$PY" benchmarks/offload_memory.py --dry-run --out "$res/offload-memory-dry.json"
        part train-real-size 200 "$PY" benchmarks/train_real_size.py --model tiny --dtype fp32 --steps 1 \
            --json "$res/train-real-size-dry.jsonl"
        return 0
    fi
    # 1. the speed matrix (bf16, random weights): benchmarks/gpu_matrix.sh with MATRIX=issue17
    part speed-matrix 330 env PYTHON="$PY" BUDGET_S=320 OUT_DIR="$res" MATRIX=issue17 bash benchmarks/gpu_matrix.sh
    [[ -f $res/speed-gpu.json ]] && mv "$res/speed-gpu.json" "$res/issue17-speed-gpu.json"
    [[ -f $res/speed.md ]] && mv "$res/speed.md" "$res/issue17-speed.md"
    # 2. memory: on the GPU, model offload, sequential offload
    part offload-memory 140 "$PY" benchmarks/offload_memory.py --arch sd3-medium --size 1024 --reference 512 \
        --out "$res/offload-memory.json"
    # 3. SLOT (the training issue, engineer D): real-size training memory, one line of benchmarks/train_real_size.py
    part train-real-size 90 "$PY" benchmarks/train_real_size.py --model sd3-medium --batch-size 1 \
        --gradient-checkpointing 1 --dtype bf16 --steps 3 --json "$res/train-real-size.jsonl"
    echo "== issue17 done in $(( $(date +%s) - start ))s; results in $res" >&2
}

case ${1:-} in
    train) shift; train "$@" ;;
    v2) shift; v2 "$@" ;;
    matrix) matrix "${2:?seconds}" ;;
    both) train "${2:?minutes}"; matrix "${3:?seconds}" ;;
    offload) "$PY" scripts/offload_check.py "$OUT" ;;  # GPU-only (sequential offload fails on CPU for the parent too)
    distributed) distributed ;;  # GPU-only: accelerate's FSDP refuses CPUs, DeepSpeed needs CUDA (docs/training.md)
    realsize) realsize "${2:-300}" ;;
    issue17) issue17 "${2:-570}" ;;
    *) echo "usage: $0 train MINUTES [KEY=VALUE ...] | v2 MINUTES [KEY=VALUE ...] | matrix SECONDS | both MINUTES SECONDS | offload | distributed" \
            "| realsize SECONDS_PER_RUN | issue17 [SECONDS]" >&2; exit 2 ;;
esac
