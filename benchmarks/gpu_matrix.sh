#!/usr/bin/env bash
# The whole GPU speed matrix, inside 10 minutes on one H100 (bf16, random weights: no download).
#
#   bash benchmarks/gpu_matrix.sh            # from the repository root, with the project's venv active
#   BUDGET_S=300 OUT_DIR=/tmp/out bash benchmarks/gpu_matrix.sh   # a shorter lease; results elsewhere
#
# Architectures from their published configs, timed at the transformer level (one forward over the
# CFG batch per denoising step; text encoders and VAE are the same for every method and left out).
# One configuration per process, the issue's headline ones first, each with its own time limit:
#   sd3-medium  1024² target with a 512² reference (overhead target), with a 1024² reference (concat
#               target), 512² with a 512² reference; sd35-large 1024² with a 512² reference;
#               then sd3-medium 1024²/512² under torch.compile if time is left.
# 2 warm-up + 5 timed steps per method, interleaved; seconds per image = 28 x the median step
# (extrapolated, and said so in the output). (d) is one LoRA training step on the same architecture.
# After every finished configuration the results so far are merged into $OUT_DIR/speed-gpu.json and
# the "gpu" block of $OUT_DIR/speed.md (card named in the table header), so a lease that ends early
# still leaves what was measured. Progress goes to stderr as it happens.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-docs}
TMP=$(mktemp -d)
START=$(date +%s)
BUDGET=${BUDGET_S:-570}   # leave margin below 600 s
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONUNBUFFERED=1
COMMON=(--dtype bf16 --warmup 2 --runs 5 --steps 28 --threads 8)
parts=()

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

merge() {  # the results so far, into the committed JSON and markdown
    (( ${#parts[@]} )) || return 0
    [[ -f "$OUT/speed.md" ]] || cp docs/speed.md "$OUT/speed.md" 2>/dev/null
    "$PY" benchmarks/speed.py --merge "${parts[@]}" --out "$OUT/speed-gpu.json" --markdown "$OUT/speed.md" \
        --section gpu >&2
}

run() {  # run NAME SECONDS ARGS...: one python process with its own hard limit
    local name=$1 limit=$2; shift 2
    local remaining; remaining=$(left)
    (( limit > remaining )) && limit=$remaining
    if (( limit < 30 )); then echo "skip $name: ${remaining}s left" >&2; return 1; fi
    echo "== $name (limit ${limit}s, $(left)s left)" >&2
    timeout --signal=TERM --kill-after=10 "$limit" "$PY" benchmarks/speed.py "$@" --out "$TMP/$name.json" \
        2>&1 | tee "$TMP/$name.log" | grep --line-buffered -v "it/s\]" >&2
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc after $(( $(date +%s) - START ))s" >&2
    if [[ $rc == 0 && -s "$TMP/$name.json" ]]; then parts+=("$TMP/$name.json"); merge; fi
    mkdir -p "$OUT/speed-gpu-logs" && cp "$TMP/$name.log" "$OUT/speed-gpu-logs/" 2>/dev/null
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
if ! "$PY" -c "import torch, diffusers, peft, customshift; assert torch.cuda.is_available(), 'no CUDA device'"; then
    echo "$PY needs a CUDA build of torch, diffusers, peft and this package importable (the error is above)" >&2
    exit 2
fi

if [[ ${MATRIX:-full} == issue17 ]]; then  # issue 17 item 5: its three configurations only (scripts/device_session.sh)
    run sd3-medium-1024-512 110 --size sd3-medium --pairs 1024:512 --no-finetune "${COMMON[@]}"
    run sd3-medium-1024-1024 90 --size sd3-medium --pairs 1024:1024 --no-finetune "${COMMON[@]}"
    run sd35-large-1024-512 120 --size sd35-large --pairs 1024:512 --no-finetune "${COMMON[@]}"
else
    run sd3-medium-1024-512 150 --size sd3-medium --pairs 1024:512 "${COMMON[@]}"
    run sd3-medium-1024-1024 120 --size sd3-medium --pairs 1024:1024 --no-finetune "${COMMON[@]}"
    run sd3-medium-512-512 90 --size sd3-medium --pairs 512:512 "${COMMON[@]}"
    run sd35-large-1024-512 180 --size sd35-large --pairs 1024:512 "${COMMON[@]}"
    run sd3-medium-compiled 150 --size sd3-medium --pairs 1024:512 --compile --no-finetune "${COMMON[@]}"
fi

if (( ${#parts[@]} == 0 )); then
    echo "no configuration finished; logs in $OUT/speed-gpu-logs" >&2
    exit 1
fi
echo "done in $(( $(date +%s) - START ))s: ${#parts[@]} configurations in $OUT/speed-gpu.json, $OUT/speed.md (gpu block)" >&2
