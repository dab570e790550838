#!/usr/bin/env bash
# The whole GPU speed matrix, inside 10 minutes on one H100 (bf16, random weights: no download).
#
#   bash benchmarks/gpu_matrix.sh            # from the repository root, with the project's venv active
#
# Architectures from their published configs, timed at the transformer level (one forward over the
# CFG batch per denoising step; text encoders and VAE are the same for every method and left out):
#   sd3-medium  512² target with a 512² reference; 1024² with a 512² and with a 1024² reference
#   sd35-large  1024² target with a 512² reference
# 2 warm-up + 5 timed steps per method, interleaved; seconds per image = 28 x the median step
# (extrapolated, and said so in the output). (d) is one LoRA training step on the same architecture.
# Writes docs/speed-gpu.json and the "gpu" block of docs/speed.md (card named in the table header).
# An optional torch.compile run of the headline configuration follows if time is left.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-docs}
TMP=$(mktemp -d)
START=$(date +%s)
BUDGET=${BUDGET_S:-570}   # leave margin below 600 s
COMMON=(--dtype bf16 --warmup 2 --runs 5 --steps 28 --threads 8)

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

run() {  # run NAME SECONDS ARGS...: one python process with its own hard limit
    local name=$1 limit=$2; shift 2
    local remaining; remaining=$(left)
    (( limit > remaining )) && limit=$remaining
    if (( limit < 30 )); then echo "skip $name: ${remaining}s left" >&2; return 1; fi
    echo "== $name (limit ${limit}s, $(left)s left)" >&2
    timeout --signal=TERM --kill-after=10 "$limit" python benchmarks/speed.py "$@" --out "$TMP/$name.json" \
        > "$TMP/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$TMP/$name.log" >&2
    echo "== $name: rc=$rc after $(( $(date +%s) - START ))s" >&2
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
if ! python -c "import torch, diffusers, peft, customshift; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "needs python with a CUDA build of torch, diffusers, peft and this package importable" >&2
    exit 2
fi

run sd3-medium 240 --size sd3-medium --pairs 512:512,1024:512,1024:1024 "${COMMON[@]}"
run sd35-large 200 --size sd35-large --pairs 1024:512 "${COMMON[@]}"
run sd3-medium-compiled 150 --size sd3-medium --pairs 1024:512 --compile --no-finetune "${COMMON[@]}"

parts=()
for name in sd3-medium sd35-large sd3-medium-compiled; do
    [[ -s "$TMP/$name.json" ]] && parts+=("$TMP/$name.json")
done
if (( ${#parts[@]} == 0 )); then
    echo "no configuration finished; logs in $TMP" >&2
    exit 1
fi
python benchmarks/speed.py --merge "${parts[@]}" --out "$OUT/speed-gpu.json" \
    --markdown "$OUT/speed.md" --section gpu
mkdir -p "$OUT/speed-gpu-logs" && cp "$TMP"/*.log "$OUT/speed-gpu-logs/" 2>/dev/null
echo "done in $(( $(date +%s) - START ))s: $OUT/speed-gpu.json, $OUT/speed.md (gpu block)" >&2
