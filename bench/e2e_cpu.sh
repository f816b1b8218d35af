#!/usr/bin/env bash
# MixLLM end to end on the CPU, on both bundled models (SmolLM2-135M, the default; Gemma-3-270M) and
# both bundled texts (gensim's Wikipedia sample: evaluation articles; gensim's Lee news corpus).
# The same rows on a GPU at the full sizes: bench/e2e_gpu.sh (bench/results/e2e_models_2026-12-01.md).
#
# 1. bench/e2e.py per model: fp32, W8A8 (RTN), the one-pass rows (W4A8 GPTQ + clip, MixLLM W4.4A8 /
#    W4.8A8, per-layer and random 10%, and the allocation ablations: salience estimators, per-bit
#    ranking, GPTQ+clip delta, fewer windows) and the default pipeline's rows. One calibration set per
#    model serves every row; per-window NLLs are kept, so bench/e2e.py --table gives paired noise
#    estimates. JSON: bench/results/e2e_cpu_<model>.json (rows already there are kept: the run can be
#    resumed); tables: bench/results/e2e_cpu_models.md.
# 2. with MIXLLM_E2E_CLI=1 also the single-model table of bench/results/e2e_cpu.md, one `mixllm`
#    command per row (logs in bench/results/e2e_logs/); the GPTQ rows use the one-pass calibration
#    (--no-sequential) as that table was measured, not the block-by-block default.
#
# Sizes (env): MIXLLM_E2E_CALIB (calibration windows, default 32), MIXLLM_E2E_SEQ (tokens per window,
# default 512), MIXLLM_E2E_TOKENS (evaluation tokens per text, default 16384), MIXLLM_E2E_MODELS
# (default "smollm2-135m gemma3-270m"). Cost on an idle 2-core CPU, per model: a calibration pass
# (forward + backward per window), GPTQ of every layer at 4 and 8 bits, then ~1-3 min per row and
# text at 16384 tokens (Gemma's 262k-token output head doubles the evaluation cost), plus a block-by-
# block pass per default-pipeline row. Run it under `nice` on shared machines.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}   # shared CPUs: do not spin in OpenMP barriers
CALIB=${MIXLLM_E2E_CALIB:-32}
SEQ=${MIXLLM_E2E_SEQ:-512}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
TOKENS=${MIXLLM_E2E_TOKENS:-16384}
MODELS=${MIXLLM_E2E_MODELS:-"smollm2-135m gemma3-270m"}
jsons=()
for m in $MODELS; do
    out=bench/results/e2e_cpu_$m.json
    echo "== $m -> $out"
    python3 bench/e2e.py --model "$m" --n-calib "$CALIB" --seq-len "$SEQ" --eval-tokens "$TOKENS" --out "$out" --resume
    jsons+=("$out")
done
python3 bench/e2e.py --table "${jsons[@]}" > bench/results/e2e_cpu_models.md
echo "tables: bench/results/e2e_cpu_models.md"

[ "${MIXLLM_E2E_CLI:-0}" = 1 ] || exit 0
LOG=bench/results/e2e_logs
OUT=${MIXLLM_E2E_OUT:-${TMPDIR:-/tmp}/mixllm_e2e}
mkdir -p "$LOG"
MIX="python3 -m mixllm.cli"   # = the `mixllm` entry point
run() { local name=$1; shift; echo "== $name: mixllm $*"; $MIX "$@" --quiet > "$LOG/$name.log" 2>&1; grep perplexity "$LOG/$name.log" | tail -1; }
run fp32                eval
run w8a8_rtn            quantize --bits 8 --no-gptq --no-clip --eval
run w4a8_rtn            quantize --bits 4 --no-gptq --no-clip --eval
run mixllm_w4.4a8       quantize --bits 4.4 --no-sequential --eval --out "$OUT/mixllm_w4.4a8"
run w4a8_gptq_clip      quantize --bits 4 --no-sequential --eval
run mixllm_w4.2a8       quantize --bits 4.2 --no-sequential --eval
run mixllm_w4.8a8       quantize --bits 4.8 --no-sequential --eval
run perlayer_w4.4a8     quantize --bits 4.4 --selection per_layer --no-sequential --eval
run random_w4.4a8       quantize --bits 4.4 --selection random --no-sequential --eval
# components: clipping alone, and MixLLM's allocation with round-to-nearest parts
run w4a8_rtn_clip       quantize --bits 4 --no-gptq --eval
run mixllm_w4.4a8_rtn   quantize --bits 4.4 --no-gptq --no-clip --eval
