#!/usr/bin/env bash
# Device runs of issue 10 (one H200): build, GPU tests, benchmarks; logs and JSON under $OUT.
#   part1: stage1 of the default model + build + GPU tests of the pipeline + the full Llama-3-8B-shaped run
#   part2: stage2 + the default real model (GPU vs CPU pipeline, offloaded peak memory) + 70B-shaped blocks
#          (T70B=0 skips the 70B blocks)
#   split: (kind nvidia-h200-x2) stage1 + build + GPU tests of the pipeline + the salience pass of the whole
#          Llama-3-70B-shaped model split over the two GPUs; part2 follows within 30 s
set -uo pipefail
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "${1:-}" in
  part1)
    bash bench/device_assets.sh stage1 > "$OUT/stage.log" 2>&1 || tail -5 "$OUT/stage.log"
    t0=$(date +%s)
    MIXLLM_CUDA=0 python3 -m pip install --no-build-isolation --no-deps -e . -q > "$OUT/build.log" 2>&1 || tail -40 "$OUT/build.log"
    echo "build $(( $(date +%s) - t0 )) s"
    timeout 120 python3 -m pytest tests/test_pipeline.py -q -s -p no:cacheprovider -k "not offloaded" -x 2>&1 | tail -15
    timeout ${T8B:-400} python3 bench/quantize_scale.py --model 8b --out "$OUT/quantize_scale_8b.json" 2> "$OUT/8b.err" | tail -40
    tail -c 1500 "$OUT/8b.err" ;;
  part2)
    bash bench/device_assets.sh stage2 > "$OUT/stage.log" 2>&1 || tail -5 "$OUT/stage.log"
    source <(bash bench/device_assets.sh env)
    timeout 300 python3 bench/quantize_scale.py --model default --n-calib 32 --seq-len 512 --out "$OUT/quantize_scale_default.json" 2>&1 | tail -30
    timeout 60 python3 -m pytest tests/test_pipeline.py -q -s -p no:cacheprovider -k "offloaded" 2>&1 | tail -6
    [ "${T70B:-200}" = 0 ] || timeout ${T70B:-200} python3 bench/quantize_scale.py --model 70b --layers ${L70B:-2} --out "$OUT/quantize_scale_70b.json" 2> "$OUT/70b.err" | tail -40
    tail -c 800 "$OUT/70b.err" ;;
  split)
    bash bench/device_assets.sh stage1 > "$OUT/stage.log" 2>&1 || tail -5 "$OUT/stage.log"
    MIXLLM_CUDA=0 python3 -m pip install --no-build-isolation --no-deps -e . -q > "$OUT/build.log" 2>&1 || tail -40 "$OUT/build.log"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    timeout 150 python3 -m pytest tests/test_pipeline.py -q -s -p no:cacheprovider -k "not offloaded" 2>&1 | tail -8
    timeout ${TSPLIT:-300} python3 bench/quantize_scale.py --model 70b --split-gpus 2 --n-calib ${NSPLIT:-8} \
        --out "$OUT/quantize_scale_70b_split2.json" 2> "$OUT/split.err" | tail -45
    tail -c 1500 "$OUT/split.err" ;;
esac
