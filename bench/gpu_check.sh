#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run its tests (and compute-sanitizer
# on a small subset), run the benchmark, leave logs and JSON under $OUT, print a short table last.
#   bench/gpu_check.sh            everything
#   bench/gpu_check.sh --quick    tests + a two-shape benchmark
#   bench/gpu_check.sh --tests    build and tests only
#   bench/gpu_check.sh --tune     tests, every tile configuration on the 70B shapes, full benchmark
#   bench/gpu_check.sh --profile  the same, after an ncu profile of one W4.4A8 call per M
#   bench/gpu_check.sh --all-in-one  one short device call: the kernel tests, sanitizer, on Hopper the
#                                 wgmma probe, the layer table, the synthetic Llama-3-8B end to end,
#                                 the decode sweep;
#                                 each step bounded by what is left of BUDGET_S seconds (default 420)
# MIXLLM_PREBUILT=DIR: reuse the CUDA objects that bench/gpu_prebuild.sh compiled into DIR beforehand
# (carry DIR; an in-place build through bench/gpu_fast_build.py, about 20 s instead of 50 on the H200)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mixllm_gpu_out}
mkdir -p "$OUT"
MODE=${1:-all}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log() { echo "== $*" | tee -a "$OUT/check.log"; }

log "$(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader)"
log "build"
t0=$(date +%s)
# only the running GPU's architecture (sm_90a on Hopper) to save build time here
cc=$($PY -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')
arch="-gencode=arch=compute_${cc},code=sm_${cc}"
[ "$cc" = "90" ] && arch="-gencode=arch=compute_90a,code=sm_90a"
if [ -n "${MIXLLM_PREBUILT:-}" ]; then
    MIXLLM_CUDA=1 MIXLLM_CUDA_ARCH="$arch" $PY bench/gpu_fast_build.py "$MIXLLM_PREBUILT" >"$OUT/build.log" 2>&1 ||
        { tail -30 "$OUT/build.log"; exit 1; }
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    MIXLLM_CUDA=1 MIXLLM_CUDA_ARCH="$arch" $PY -m pip install --no-build-isolation --no-deps -e . -q \
        >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
fi
log "built in $(( $(date +%s) - t0 )) s ($arch)"

if [ "$MODE" = "--all-in-one" ]; then
    deadline=$(( t0 + ${BUDGET_S:-420} ))
    # step NAME CAP_S CMD...: run CMD under min(CAP_S, time left), log its status
    step() {
        local name=$1 cap=$2; shift 2
        local left=$(( deadline - $(date +%s) ))
        [ $left -lt $cap ] && cap=$left
        if [ $cap -le 5 ]; then log "$name: skipped (no time left)"; return 1; fi
        log "$name (<= ${cap}s)"
        timeout $cap "$@"
        local rc=$?
        log "$name rc=$rc"
        return $rc
    }
    step "decode-kernel tests" 60 $PY -m pytest tests/test_cuda_kernels.py -q -p no:cacheprovider \
        >"$OUT/tests_kernels.log" 2>&1; tail -5 "$OUT/tests_kernels.log"
    step "CUDA tests" 80 $PY -m pytest tests/test_cuda.py -q -x -p no:cacheprovider >"$OUT/tests.log" 2>&1
    tail -5 "$OUT/tests.log"
    if command -v compute-sanitizer >/dev/null; then
        step "compute-sanitizer memcheck" 50 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
            $PY -m pytest tests/test_cuda_kernels.py tests/test_cuda.py -q -x -p no:cacheprovider \
            -k "test_decode_poisoned or test_decode_every_warp_count or test_decode_mixed_matches_reference and (1-16-128 or 3-37-300) or test_poisoned_outputs_fully_written or test_sm90_single_part" \
            >"$OUT/sanitizer.log" 2>&1
        tail -3 "$OUT/sanitizer.log"
    fi
    if [ "$cc" = "90" ]; then # int8 wgmma throughput by N, A operand, warpgroups and rescale (a few seconds)
        step "wgmma probe" 40 bash -c "nvcc -O3 -std=c++17 $arch bench/gpu_wgmma_probe.cu -o /tmp/mixllm_wgmma_probe &&
            /tmp/mixllm_wgmma_probe" >"$OUT/wgmma_probe.log" 2>&1
        cat "$OUT/wgmma_probe.log"
    fi
    step "layer table" 110 $PY bench/gpu_linear.py --out "$OUT" >"$OUT/bench.log" 2>&1; tail -60 "$OUT/bench.log"
    step "end to end, synthetic Llama-3-8B" 120 $PY bench/gpu_e2e.py --synthetic --new-tokens 48 --reps 2 \
        --out "$OUT/gpu_e2e_synthetic.md" >"$OUT/e2e.log" 2>&1; tail -12 "$OUT/e2e.log"
    step "decode sweep" 90 $PY bench/gpu_linear.py --decode --out "$OUT" >"$OUT/decode_sweep.log" 2>&1
    tail -40 "$OUT/decode_sweep.log"
    exit 0
fi

log "tests"
$PY -m pytest tests/test_cuda.py tests/test_cuda_kernels.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
test_rc=${PIPESTATUS[0]}
log "tests rc=$test_rc"

if command -v compute-sanitizer >/dev/null; then
    log "compute-sanitizer (memcheck) on the small tests"
    compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
        $PY -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
        -k "test_poisoned_outputs_fully_written or test_act_quant_padded or (test_linear_matches_reference and 1-16-128) or test_mixed_matches_cpu or test_deterministic_with_and_without_pdl or test_back_to_back or test_mixed_linear_module" \
        >"$OUT/sanitizer.log" 2>&1
    san_rc=$?
    tail -4 "$OUT/sanitizer.log"
    log "sanitizer rc=$san_rc"
fi
[ "$MODE" = "--tests" ] && exit $test_rc

log "benchmark"
if [ "$MODE" = "--tune" ] || [ "$MODE" = "--profile" ]; then
    if [ "$MODE" = "--profile" ] && command -v ncu >/dev/null; then
        ncu --clock-control none --profile-from-start off -k regex:qgemm \
            --section SpeedOfLight --section WarpStateStats --section Occupancy --section ComputeWorkloadAnalysis \
            $PY bench/gpu_linear.py --profile >"$OUT/ncu.log" 2>&1
        grep -E "qgemm|Duration|Throughput|Warp Cycles Per Issued|Stall|Achieved Occupancy|Registers|Issue Slots|Executed Ipc" \
            "$OUT/ncu.log" | head -60
    fi
    $PY bench/gpu_linear.py --tune 2>&1 | tee "$OUT/tune.log"
    $PY bench/gpu_linear.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -48
elif [ "$MODE" = "--quick" ]; then
    $PY bench/gpu_linear.py --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40
else
    $PY bench/gpu_linear.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -48
fi
exit $test_rc
