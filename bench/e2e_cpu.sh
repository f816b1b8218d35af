#!/usr/bin/env bash
# The comparison table of bench/results/e2e_cpu.md: every row is one `mixllm` command on the default
# model (SmolLM2-135M-Instruct) and text (gensim's Wikipedia sample: evaluation articles, first 16384
# tokens, disjoint windows of 512). Calibration: 32 windows of 512 tokens of the calibration articles,
# seed 0. The first MixLLM run fills ~/.cache/mixllm/calib (salience + GPTQ results of both
# bit-widths for all rows), so the later rows with the same calibration only pick rows and evaluate.
# Logs: bench/results/e2e_logs/. About 45 min on a lightly loaded 2-core CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}   # shared CPUs: do not spin in OpenMP barriers
LOG=bench/results/e2e_logs
OUT=${MIXLLM_E2E_OUT:-${TMPDIR:-/tmp}/mixllm_e2e}
mkdir -p "$LOG"
MIX="python3 -m mixllm.cli"   # = the `mixllm` entry point
run() { local name=$1; shift; echo "== $name: mixllm $*"; $MIX "$@" --quiet > "$LOG/$name.log" 2>&1; grep perplexity "$LOG/$name.log" | tail -1; }
run fp32                eval
run w8a8_rtn            quantize --bits 8 --no-gptq --no-clip --eval
run w4a8_rtn            quantize --bits 4 --no-gptq --no-clip --eval
run mixllm_w4.4a8       quantize --bits 4.4 --eval --out "$OUT/mixllm_w4.4a8"
run w4a8_gptq_clip      quantize --bits 4 --eval
run mixllm_w4.2a8       quantize --bits 4.2 --eval
run mixllm_w4.8a8       quantize --bits 4.8 --eval
run perlayer_w4.4a8     quantize --bits 4.4 --selection per_layer --eval
run random_w4.4a8       quantize --bits 4.4 --selection random --eval
# components: clipping alone, and MixLLM's allocation with round-to-nearest parts
run w4a8_rtn_clip       quantize --bits 4 --no-gptq --eval
run mixllm_w4.4a8_rtn   quantize --bits 4.4 --no-gptq --no-clip --eval
