#!/usr/bin/env bash
# The CUDA side's reliability run, in one call on a GPU machine (issue 14): build mixllm._cuda (the
# running GPU's architecture only; sm_90a on Hopper), run tests/test_cuda.py, sweep every entry
# point of mixllm._cuda (fuzz/cuda_targets.py) under compute-sanitizer memcheck, and racecheck the
# small kernel tests. Logs and gpu_fuzz_summary.json (the counts the README quotes) go to $OUT.
#   OUT=/tmp/x bash scripts/gpu_fuzz.sh           N=300 random inputs per target (+ seeds)
#   MIXLLM_CUDA_FUZZ_N=2000 MIXLLM_CUDA_FUZZ_SECONDS=120 bash scripts/gpu_fuzz.sh    longer
#   MIXLLM_SKIP_BUILD=1 ...                         reuse the extension already built here
# Reproduce one saved input: python fuzz/cuda_targets.py replay TARGET $OUT/findings/cuda_TARGET_I
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mixllm_gpu_fuzz}
mkdir -p "$OUT"
N=${MIXLLM_CUDA_FUZZ_N:-300}
SECS=${MIXLLM_CUDA_FUZZ_SECONDS:-20}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "== $*" | tee -a "$OUT/gpu_fuzz.log"; }
count() { grep -o "$1" "$2" 2>/dev/null | head -1 | grep -o '[0-9]*' | head -1; }

log "$(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
t0=$(date +%s)
if [ "${MIXLLM_SKIP_BUILD:-0}" != 1 ]; then
    cc=$($PY -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')
    arch="-gencode=arch=compute_${cc},code=sm_${cc}"
    [ "$cc" = "90" ] && arch="-gencode=arch=compute_90a,code=sm_90a"
    # -j 2: mixllm._C and mixllm._cuda side by side
    MIXLLM_CUDA=1 MIXLLM_CUDA_ARCH="$arch" $PY setup.py -q build_ext --inplace -j 2 >"$OUT/build.log" 2>&1 \
        || { tail -30 "$OUT/build.log"; log "build failed"; exit 1; }
    log "built in $(( $(date +%s) - t0 )) s ($arch)"
fi

t1=$(date +%s)
timeout "${MIXLLM_TEST_TIMEOUT:-240}" $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -rf \
    >"$OUT/tests.log" 2>&1
test_rc=$?
tail -3 "$OUT/tests.log"
log "tests/test_cuda.py rc=$test_rc in $(( $(date +%s) - t1 )) s: $(tail -1 "$OUT/tests.log")"

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
t2=$(date +%s)
"$SAN" --tool memcheck --print-limit 50 --error-exitcode 9 \
    $PY fuzz/cuda_targets.py sweep "$N" --seconds "$SECS" --save "$OUT/findings" >"$OUT/fuzz_memcheck.log" 2>&1
fuzz_rc=$?
grep -E "^sweep|^FINDING|ERROR SUMMARY" "$OUT/fuzz_memcheck.log" | tail -20
log "fuzz under memcheck rc=$fuzz_rc in $(( $(date +%s) - t2 )) s"

t3=$(date +%s)
# test_poisoned_outputs_fully_written: every tile configuration (ids [splits-cfg]: 12 configs x splits 1, 4)
SMALL="test_act_quant_padded_layout or test_mixed_matches_cpu_op or test_poisoned_outputs_fully_written or (test_sm90_single_part and 4) or test_back_to_back"
timeout "${MIXLLM_RACE_TIMEOUT:-180}" "$SAN" --tool racecheck --racecheck-report hazard --print-limit 50 \
    --error-exitcode 9 $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -k "$SMALL" \
    >"$OUT/racecheck.log" 2>&1
race_rc=$?
grep -E "passed|failed|RACECHECK SUMMARY|ERROR SUMMARY" "$OUT/racecheck.log" | tail -4
log "racecheck rc=$race_rc in $(( $(date +%s) - t3 )) s"

$PY - "$OUT" "$test_rc" "$fuzz_rc" "$race_rc" <<'PYEOF'
import json, re, sys
out, test_rc, fuzz_rc, race_rc = sys.argv[1], *map(int, sys.argv[2:])
def read(name):
    try:
        return open(f"{out}/{name}", errors="replace").read()
    except OSError:
        return ""
fuzz, race, tests = read("fuzz_memcheck.log"), read("racecheck.log"), read("tests.log")
sweep = next((json.loads(l) for l in reversed(fuzz.splitlines()) if l.startswith('{"targets"')), None)
def summary(text, tool):
    m = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: (\d+) (?:errors|hazards? displayed)", text)
    return sum(map(int, m)) if m else None
res = {
    "tests": {"rc": test_rc, "summary": (tests.strip().splitlines() or [""])[-1]},
    "fuzz": sweep, "fuzz_rc": fuzz_rc,
    "memcheck_errors": summary(fuzz, "memcheck"),
    "racecheck": {"rc": race_rc, "hazards": summary(race, "racecheck"),
                  "summary": [l for l in race.splitlines() if "SUMMARY" in l or " passed" in l][-3:]},
}
json.dump(res, open(f"{out}/gpu_fuzz_summary.json", "w"), indent=1)
print(json.dumps({k: (v if k != "fuzz" else (v or {}).get("total")) for k, v in res.items()}))
PYEOF
log "total $(( $(date +%s) - t0 )) s"
[ $test_rc = 0 ] && [ $fuzz_rc = 0 ] && [ $race_rc = 0 ]
