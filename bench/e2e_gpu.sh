#!/usr/bin/env bash
# bench/e2e.py on a GPU machine (the H200 of the device tool), once bench/device_assets.sh has staged
# the models and texts (chunk calls) and its `env` has been sourced:
#   bash bench/e2e_gpu.sh build          the C extension (MIXLLM_CUDA=0: the accuracy rows need no
#                                        CUDA kernels; MixedLinear runs its torch emulation there)
#   bash bench/e2e_gpu.sh MODEL...       every row of bench/e2e.py per model -> $OUT/e2e_gpu_MODEL.json
#                                        and .log (copy them to bench/results/ afterwards)
# Sizes (env): MIXLLM_E2E_CALIB (windows, default 128), MIXLLM_E2E_SEQ (tokens per window, 2048),
# MIXLLM_E2E_TOKENS (evaluation tokens per text, 16384), MIXLLM_E2E_MAX_S (start no row after this
# many seconds per model, default 0 = no limit), MIXLLM_E2E_ROWS (comma-separated row keys, default:
# all), MIXLLM_E2E_SEED (--calib-seed, default 0; the output is then e2e_gpu_MODEL_seedS.json),
# MIXLLM_E2E_RESUME (a JSON of an earlier run of the same sizes and seed, e.g. one in bench/results/:
# copied to the output first and run with --resume, so only its missing rows are computed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mixllm_e2e_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "${1:-}" = build ]; then
    t0=$(date +%s)
    MIXLLM_CUDA=0 python3 -m pip install --no-build-isolation --no-deps -e . -q > "$OUT/build.log" 2>&1 \
        || { tail -40 "$OUT/build.log"; exit 1; }
    python3 -c "import mixllm, torch; print('mixllm', mixllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
    echo "built in $(( $(date +%s) - t0 )) s"
    exit 0
fi
texts=()
[ -n "${MIXLLM_TEXTS_JSON:-}" ] && texts=(--texts-json "$MIXLLM_TEXTS_JSON")
# the float model must match the one converted here (bench/results/e2e_fp32_reference.json): on
# 2026-12-01 Gemma-3 converted on the device gave perplexity 32735 instead of 27
[ -f bench/results/e2e_fp32_reference.json ] && texts+=(--fp32-ref bench/results/e2e_fp32_reference.json)
[ -n "${MIXLLM_E2E_ROWS:-}" ] && texts+=(--rows "$MIXLLM_E2E_ROWS")
seed=${MIXLLM_E2E_SEED:-0}
tag=""
[ "$seed" = 0 ] || tag="_seed$seed"
rc=0
for m in "$@"; do
    out="$OUT/e2e_gpu_$m$tag.json"
    resume=()
    if [ -n "${MIXLLM_E2E_RESUME:-}" ]; then
        cp "$MIXLLM_E2E_RESUME" "$out" && chmod u+w "$out" && resume=(--resume)
    fi
    python3 bench/e2e.py --model "$m" --device cuda "${texts[@]}" "${resume[@]}" --n-calib "${MIXLLM_E2E_CALIB:-128}" \
        --seq-len "${MIXLLM_E2E_SEQ:-2048}" --eval-tokens "${MIXLLM_E2E_TOKENS:-16384}" --calib-seed "$seed" \
        --max-seconds "${MIXLLM_E2E_MAX_S:-0}" --out "$out" 2>&1 \
        | grep --line-buffered -v "^Loading weights" | tee "$OUT/e2e_gpu_$m$tag.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done
exit $rc
