#!/usr/bin/env bash
# SASS of our CUDA kernels without a GPU: compile one cuda/*.cu file for sm_90a (setup.py's flags) and
# disassemble it with cuobjdump, taken with nvdisasm from NVIDIA's PyPI wheels (nvidia-cuda-cuobjdump,
# nvidia-cuda-nvdisasm; cached under ~/.cache/mixllm/cutools) where the local toolkit has none. Prints the SASS of the kernels whose
# mangled name matches PATTERN (all kernels by default), and for each the number of instructions.
#   bench/sass.sh cuda/act_quant.cu [PATTERN] > kernel.sass
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?usage: $0 cuda/FILE.cu [PATTERN]}
PATTERN=${2:-.}
if ! command -v cuobjdump >/dev/null; then
    TOOLS=${MIXLLM_CUTOOLS:-$HOME/.cache/mixllm/cutools}
    if [ ! -x "$TOOLS/nvidia/cu13/bin/cuobjdump" ]; then
        mkdir -p "$TOOLS"
        python3 -m pip download -q --no-deps -d "$TOOLS" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm 2>/dev/null
        for w in "$TOOLS"/nvidia_cuda_cuobjdump-*.whl "$TOOLS"/nvidia_cuda_nvdisasm-*.whl; do
            python3 -m zipfile -e "$w" "$TOOLS"
        done
        chmod +x "$TOOLS"/nvidia/cu13/bin/*
    fi
    PATH="$TOOLS/nvidia/cu13/bin:$PATH"
fi
OBJ=$(mktemp --suffix=.o)
trap 'rm -f "$OBJ"' EXIT
PYI=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
nvcc -c "$SRC" -o "$OBJ" -O3 -std=c++17 -Xcompiler -fPIC --expt-relaxed-constexpr -Icsrc -Icuda -I"$PYI" \
    -gencode=arch=compute_90a,code=sm_90a
cuobjdump -sass "$OBJ" | awk -v pat="$PATTERN" '
    /Function : / { if (name != "" && keep) printf("# %s: %d instructions\n\n", name, n) > "/dev/stderr";
                    name = $3; keep = (name ~ pat); n = 0 }
    keep { print; if ($0 ~ /^[ \t]+\/\*[0-9a-f]+\*\/[ \t]/) n++ }
    END { if (name != "" && keep) printf("# %s: %d instructions\n", name, n) > "/dev/stderr" }'
