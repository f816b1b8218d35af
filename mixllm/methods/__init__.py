"""Quantization methods: the registry of config classes and the one dispatcher, :func:`quantize`.

Plug-in contract (what a method provides, e.g. ``SliMConfig`` in ``methods/slim.py``):

* a ``@dataclass`` config class deriving from :class:`QuantConfig` (weight-only methods: from
  :class:`WeightOnlyConfig`, which supplies ``apply``), registered with ``@register("name")``
  (``calibration=False`` when it needs no calibration data), whose fields are the method's knobs, each
  documented, with defaults, checked in ``__post_init__`` with :mod:`mixllm.methods.validate`; the CLI
  turns every field into a ``--flag`` (``bool`` fields into ``--flag/--no-flag``), so keep field types
  simple (``int``, ``float``, ``str``, ``bool``, ``Optional`` of these);
* ``config.apply(model, calib) -> dict``: quantizes ``model`` *in place* (swapping ``nn.Linear``
  modules for quantized modules with :func:`mixllm.modules.set_module`) and returns a JSON-serialisable
  report (at least ``avg_bits``); ``calib`` is whatever :func:`prepare_calib` returns (token ids
  [n, seq_len], or a :class:`mixllm.calib.Calibration` to reuse statistics), or ``None`` when the method
  needs none;
* the quantized module classes must be registered with :func:`mixllm.io.register_module` (they
  implement ``get_config() -> dict`` and ``classmethod from_config(dict)``) so ``mixllm.load`` can
  rebuild them;
* an import of its module below (the decorator registers it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

from .base import REGISTRY, QuantConfig, WeightOnlyConfig, register
from .baselines import GPTQConfig, RTNConfig
from .cmpq import CMPQConfig
from .mixllm import MixLLMConfig
from .slim import SliMConfig

__all__ = [
    "METHODS",
    "quantize",
    "get_method",
    "method_name",
    "QuantConfig",
    "WeightOnlyConfig",
    "register",
    "MixLLMConfig",
    "RTNConfig",
    "GPTQConfig",
    "SliMConfig",
    "CMPQConfig",
]

METHODS: Dict[str, type] = REGISTRY  # name -> config class, filled by @register


def get_method(name: str) -> type:
    """The config class registered as ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"method: expected a string, got {type(name).__name__}")
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}") from None


def method_name(config) -> str:
    return getattr(type(config), "name", "") or type(config).__name__


def quantize(model, config, calib: Any = None, tokenizer=None) -> Dict[str, Any]:
    """Quantize ``model`` in place with ``config`` (any registered method's config object).

    ``calib``: token ids (LongTensor [n, seq_len]), text (``str`` or list of ``str``, tokenized with
    ``tokenizer``), a :class:`mixllm.calib.Calibration` from an earlier pass, or ``None`` (the default
    calibration text, when the method needs calibration). Returns the method's report, which is also
    kept on ``model.mixllm_info`` for :func:`mixllm.save`.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not dataclasses.is_dataclass(config) or not isinstance(config, QuantConfig):
        raise TypeError(f"config: expected a method config (one of {sorted(METHODS)}), got {type(config).__name__}")
    calib = prepare_calib(model, config, calib, tokenizer)
    report = config.apply(model, calib)
    model.mixllm_info = {"method": method_name(config), "config": config_dict(config), "report": report}
    if hasattr(getattr(model, "config", None), "to_json_file"):  # so model.save_pretrained writes a loadable folder
        from ..hf import attach_quantization_config

        attach_quantization_config(model)
    return report


def config_dict(config) -> Dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def prepare_calib(model, config, calib, tokenizer=None):
    """Turn ``calib`` into token ids [n, seq_len] (or pass a Calibration / ids through)."""
    import torch

    from .. import data
    from ..calib import Calibration

    if isinstance(calib, Calibration):
        return calib
    needs = getattr(config, "needs_calibration", lambda: True)()
    if calib is None and not needs:
        return None
    n = getattr(config, "n_calib", 32)
    seq_len = getattr(config, "seq_len", 512)
    seed = getattr(config, "seed", 0)
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 1:
            calib = calib[None]
        if calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
            raise ValueError("calib: expected integer token ids of shape [n, seq_len]")
        return calib.long()
    if calib is None or isinstance(calib, (str, list, tuple)):
        if tokenizer is None:
            tokenizer = _tokenizer_for(model)
        return data.calibration_samples(tokenizer, n, seq_len, seed, text=calib)
    raise TypeError(f"calib: expected token ids, text, a Calibration or None, got {type(calib).__name__}")


def _tokenizer_for(model):
    from transformers import AutoTokenizer

    path = getattr(getattr(model, "config", None), "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(
            "calib: pass token ids, or a tokenizer= to tokenize the calibration text "
            f"(could not load a tokenizer from {path!r}: {e})"
        ) from None
