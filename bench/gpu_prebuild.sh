#!/usr/bin/env bash
# Compile cuda/*.cu for sm_90a here, in parallel, into DIR (default .device_carry/cuobj, git-ignored),
# with the nvcc version beside them, for bench/gpu_fast_build.py on the GPU machine (same flags as setup.py).
#   bench/gpu_prebuild.sh [DIR]      then carry DIR and run: python3 bench/gpu_fast_build.py DIR
# MIXC_NVCC_FLAGS adds nvcc flags, e.g. an experimental variant for an A/B against the default objects:
#   MIXC_NVCC_FLAGS=-DMY_VARIANT bench/gpu_prebuild.sh .device_carry/cuobj_variant
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.device_carry/cuobj}
mkdir -p "$DIR"
rm -f "$DIR"/*.o
PYI=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
pids=()
GENCODE="-gencode=arch=compute_90a,code=sm_90a"
for f in cuda/*.cu; do
    nvcc -c "$f" -o "$DIR/$(basename "$f").o" -O3 -std=c++17 -Xcompiler -fPIC --expt-relaxed-constexpr -Icsrc \
        -I"$PYI" $GENCODE ${MIXC_NVCC_FLAGS:-} &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
nvcc --version > "$DIR/nvcc_version.txt"
echo "$GENCODE" > "$DIR/gencode.txt"
echo "${MIXC_NVCC_FLAGS:-}" > "$DIR/extra_flags.txt"
python3 bench/gpu_fast_build.py --digest > "$DIR/sources.sha256"
ls -la "$DIR"
