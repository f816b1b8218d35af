"""Saving and loading quantized models: ``model.safetensors`` + ``mixllm.json`` (+ the HF config and
tokenizer), written to a temporary directory next to the target and renamed into place, so a reader
never sees a half-written model.

``mixllm.json`` holds the format version, the method and its config, the report, one entry per
quantized module (its class and constructor arguments) and the SHA-256 of ``model.safetensors``.
:func:`load` rebuilds the architecture from ``config.json``, swaps in the quantized modules, loads the
tensors strictly and so gives bit-identical outputs. A corrupted or mismatched file raises
``ValueError`` naming the problem.

Module classes other methods add are registered with :func:`register_module`; they provide
``get_config() -> dict`` and ``classmethod from_config(dict)``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .nn import MixedLinear

__all__ = ["save", "load", "register_module", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_WEIGHTS = "model.safetensors"
_META = "mixllm.json"
MODULES: Dict[str, type] = {}


def register_module(cls: type) -> type:
    """Make a quantized module class loadable (usable as a decorator)."""
    if not (hasattr(cls, "get_config") and hasattr(cls, "from_config")):
        raise TypeError(f"{cls.__name__} needs get_config() and classmethod from_config(dict)")
    MODULES[cls.__name__] = cls
    return cls


register_module(MixedLinear)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _quantized_modules(model: nn.Module):
    classes = tuple(MODULES.values())
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]


def save(model: nn.Module, path: Union[str, os.PathLike], tokenizer=None, overwrite: bool = True) -> str:
    """Write ``model`` (a quantized Hugging Face model) to directory ``path`` atomically."""
    from safetensors.torch import save_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(model, "config") or not hasattr(model.config, "to_json_file"):
        raise TypeError("model: expected a Hugging Face model (with .config) to record its architecture")
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True)")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.config.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / _WEIGHTS))  # de-duplicates tied tensors
        info = dict(getattr(model, "mixllm_info", {}) or {})
        meta = {
            "format_version": FORMAT_VERSION,
            "method": info.get("method"),
            "config": info.get("config"),
            "report": info.get("report"),
            "modules": {n: {"class": type(m).__name__, "args": m.get_config()}
                        for n, m in _quantized_modules(model)},
            "sha256": _sha256(tmp / _WEIGHTS),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        }
        (tmp / _META).write_text(json.dumps(meta, indent=1, default=_json_default))
        old = None
        if path.exists():  # swap: move the old one aside, rename the new one in, then delete
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / "d")
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(path)


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_meta(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The parsed ``mixllm.json`` of a saved model (validated)."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    f = path / _META
    if not f.exists():
        raise ValueError(f"{path} is not a mixllm model directory (no {_META})")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is corrupted (not valid JSON: {e})") from None
    if not isinstance(meta, dict) or "modules" not in meta or "format_version" not in meta:
        raise ValueError(f"{f} is not a mixllm metadata file (missing keys)")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{f}: format version {meta['format_version']} is not supported "
                         f"(this mixllm reads version {FORMAT_VERSION})")
    return meta


def _build(auto_cls, cfg, dtype, meta: Dict[str, Any], on_meta: bool = False) -> nn.Module:
    """The architecture of config.json with the quantized modules of mixllm.json swapped in."""
    n_layers = getattr(cfg, "num_hidden_layers", 0)
    if not isinstance(n_layers, int) or not 0 <= n_layers <= 4096:  # before building that many layers
        raise ValueError(f"config.json: num_hidden_layers={n_layers!r} is out of range")
    ctx = torch.device("meta") if on_meta else contextlib.nullcontext()
    with ctx:
        try:
            model = auto_cls.from_config(cfg, dtype=dtype)
        except Exception as e:
            raise ValueError(f"config.json describes a model that cannot be built: {e}") from None
        if not isinstance(meta["modules"], dict):
            raise ValueError(f"{_META}: 'modules' must be an object")
        for name, spec in meta["modules"].items():
            cls = MODULES.get(spec.get("class")) if isinstance(spec, dict) else None
            if cls is None:
                raise ValueError(f"{_META}: module {name!r} has unknown class "
                                 f"{spec.get('class') if isinstance(spec, dict) else spec!r} "
                                 f"(registered: {sorted(MODULES)}); import the method that defines it")
            try:
                if not name:
                    raise AttributeError
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{_META}: module {name!r} does not exist in this architecture") from None
            try:
                module = cls.from_config(spec.get("args"))
            except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                raise ValueError(f"{_META}: module {name!r}: bad arguments {spec.get('args')!r}: {e}") from None
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, module)
    return model


def _check_sizes(model: nn.Module, state: Dict[str, torch.Tensor], wfile: pathlib.Path) -> None:
    """`model` (on the meta device) against the tensors read from `wfile`: same names, shapes and
    dtypes, and no more memory than the file holds (tied tensors are stored once)."""
    expected = model.state_dict()
    for k, v in state.items():
        if k not in expected:
            raise ValueError(f"{wfile} does not match {_META}/config.json: unexpected tensor {k!r}")
        e = expected[k]
        if tuple(v.shape) != tuple(e.shape) or v.dtype != e.dtype:
            raise ValueError(f"{wfile}: tensor {k!r} has shape {tuple(v.shape)} {v.dtype}, "
                             f"expected {tuple(e.shape)} {e.dtype}")
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    have = os.path.getsize(wfile)
    if total > 2 * have + (64 << 20):
        raise ValueError(f"config.json / {_META} describe {total / 2**30:.2f} GiB of tensors but {wfile} "
                         f"holds {have / 2**30:.2f} GiB")


def load(path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
         verify: bool = True) -> nn.Module:
    """Rebuild a model written by :func:`save`; ``verify`` checks the weights' SHA-256 first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = pathlib.Path(path)
    meta = read_meta(path)
    wfile = path / _WEIGHTS
    if not wfile.exists():
        raise ValueError(f"{path} has no {_WEIGHTS}")
    if verify and meta.get("sha256") and _sha256(wfile) != meta["sha256"]:
        raise ValueError(f"{wfile} is corrupted: its SHA-256 does not match the one in {_META}")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, Exception) as e:  # safetensors raises several types
        raise ValueError(f"{wfile} could not be read as safetensors: {e}") from None
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises several types on a bad config.json
        raise ValueError(f"{path / 'config.json'} could not be read: {e}") from None
    if meta.get("dtype", "float32") not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"{_META}: dtype must be float32, float16 or bfloat16, got {meta.get('dtype')!r}")
    dtype = getattr(torch, meta.get("dtype", "float32"))
    # Hostile or mismatched files (issue 6): first build the architecture on the meta device (no
    # memory) and check it against the tensors the file really holds, so that absurd sizes in
    # config.json / mixllm.json raise before anything is allocated.
    _check_sizes(_build(AutoModelForCausalLM, cfg, dtype, meta, on_meta=True), state, wfile)
    model = _build(AutoModelForCausalLM, cfg, dtype, meta)
    # Tied tensors were saved once (safetensors' save_model keeps one name); fill their aliases.
    expected = model.state_dict()
    by_ptr: Dict[int, list] = {}
    for k, v in expected.items():
        if v.numel():
            by_ptr.setdefault(v.data_ptr(), []).append(k)
    for keys in by_ptr.values():
        have = [k for k in keys if k in state]
        for k in keys:
            if k not in state and have:
                state[k] = state[have[0]]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{wfile} does not match {_META}/config.json: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(state[k].shape) or v.dtype != state[k].dtype:
            raise ValueError(f"{wfile}: tensor {k!r} has shape {tuple(state[k].shape)} {state[k].dtype}, "
                             f"expected {tuple(v.shape)} {v.dtype}")
    model.load_state_dict(state, strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    model.mixllm_info = {k: meta.get(k) for k in ("method", "config", "report")}
    model.eval()
    return model.to(device) if device is not None else model
