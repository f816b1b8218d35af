"""Saving and loading quantized models as Hugging Face model folders.

A directory written by :func:`save` (format version 2) is a valid Hugging Face model folder:

* ``config.json`` with a ``quantization_config`` (``quant_method: "mixllm"``, see
  :class:`mixllm.hf.MixllmQuantizationConfig`) that says how to rebuild every quantized module;
* sharded safetensors (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, or
  one ``model.safetensors`` when it fits in ``max_shard_size``), exactly what ``save_pretrained``
  writes;
* ``generation_config.json``, the tokenizer files when a tokenizer is given, a model card
  ``README.md`` (method, bits, measured perplexity when known);
* ``mixllm.json``: the format version, the method's config and report, and the SHA-256 of every
  weight file (checked by :func:`load`).

It is written to a temporary directory next to the target and renamed into place, so a reader never
sees a half-written model. After ``import mixllm``, ``transformers.AutoModelForCausalLM.from_pretrained``
loads it (mixllm/hf.py); :func:`load` checks the files first and then takes that same path, so both
give the same model. Format version 1 (one ``model.safetensors``, the modules listed in
``mixllm.json``, no ``quantization_config``) is still read by :func:`load` (not by
``from_pretrained``); saving it again writes version 2.

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

__all__ = ["save", "load", "read_meta", "register_module", "FORMAT_VERSION"]

FORMAT_VERSION = 2
_READS = (1, 2)
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_META = "mixllm.json"
_CARD = "README.md"
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


def save(
    model: nn.Module,
    path: Union[str, os.PathLike],
    tokenizer=None,
    overwrite: bool = True,
    max_shard_size: Union[int, str] = "2GB",
    evaluation: Optional[Dict[str, Any]] = None,
) -> str:
    """Write ``model`` (a quantized Hugging Face model) to directory ``path`` atomically.

    ``max_shard_size``: largest weight file (bytes or ``"20MB"``-style, as ``save_pretrained``);
    ``evaluation``: measured results for the model card, e.g. ``{"perplexity": 26.0, "tokens": 16384,
    "seq_len": 512, "text": "..."}`` (default: ``model.mixllm_info["evaluation"]`` if present).
    """
    from . import hf

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise TypeError(
            "model: expected a Hugging Face model (with .config and .save_pretrained) to record its architecture"
        )
    if evaluation is not None and not isinstance(evaluation, dict):
        raise TypeError(f"evaluation: expected a dict or None, got {type(evaluation).__name__}")
    from .fuse import fused_groups

    if fused_groups(model):
        raise ValueError(
            "model: has fused projections (mixllm.fuse_projections), an inference-only form; "
            "save before fusing, or call mixllm.unfuse_projections(model) first"
        )
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True)")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    qc = hf.attach_quantization_config(model)
    info = dict(getattr(model, "mixllm_info", {}) or {})
    evaluation = evaluation if evaluation is not None else info.get("evaluation")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = sorted(f.name for f in tmp.iterdir() if f.name.endswith(".safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "method": qc.method,
            "config": info.get("config"),
            "report": info.get("report"),
            "evaluation": evaluation,
            "files": {f: _sha256(tmp / f) for f in files},
        }
        (tmp / _META).write_text(json.dumps(meta, indent=1, default=_json_default))
        (tmp / _CARD).write_text(_model_card(model, qc, meta, tmp))
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


def _model_card(model, qc, meta, folder: pathlib.Path) -> str:
    report = meta.get("report") or {}
    n_mod = len(qc.modules)
    weights = sum((folder / f).stat().st_size for f in meta["files"])
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    label = {
        "mixllm": "MixLLM (arXiv 2412.14590)",
        "slim": "SliM-LLM",
        "cmpq": "CMPQ",
        "gptq": "GPTQ",
        "rtn": "round-to-nearest",
    }.get(qc.method, str(qc.method))
    act = (
        f"int8 activations per token and group of {qc.group_size}"
        if qc.act_bits == 8
        else "weight-only (float activations)"
    )
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [mixllm, quantized, {qc.method}]",
        "---",
        "",
        f"# {pathlib.PurePath(str(name)).name} quantized with mixllm ({label})",
        "",
        f"- **Method**: {label}; {act}; group size {qc.group_size if qc.group_size else 'per layer'}.",
        f"- **Budget**: {qc.weight_bits:.3f} average weight bits over {n_mod} quantized linear layers"
        if qc.weight_bits is not None
        else f"- **Budget**: {n_mod} quantized linear layers (average bits not recorded)",
    ]
    if "frac8_weights" in report:
        lines.append(
            f"- **8-bit share**: {100 * report['frac8_weights']:.1f}% of the quantized weights "
            f"(the output features with the highest global salience)."
        )
    ev = meta.get("evaluation") or {}
    if isinstance(ev.get("perplexity"), (int, float)):
        detail = ", ".join(f"{k} {v}" for k, v in ev.items() if k != "perplexity")
        lines.append(f"- **Perplexity**: {ev['perplexity']:.3f}" + (f" ({detail})" if detail else "") + ".")
    else:
        lines.append("- **Perplexity**: not measured when this folder was saved (`mixllm eval --model DIR`).")
    lines.append(
        f"- **Weights**: {weights / 2**20:.1f} MiB in {len(meta['files'])} safetensors file(s); "
        f"format version {FORMAT_VERSION}."
    )
    lines += [
        "",
        "## Load",
        "",
        "```python",
        'import mixllm  # registers quant_method "mixllm" with transformers',
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("DIR")   # or mixllm.load("DIR")',
        "```",
        "",
        "`config.json` → `quantization_config` lists every quantized module and its part sizes; "
        "`mixllm.json` holds the method's report and the SHA-256 of each weight file.",
        "",
    ]
    return "\n".join(lines)


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
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise ValueError(f"{f} is not a mixllm metadata file (missing keys: format_version)")
    v = meta["format_version"]
    if isinstance(v, bool) or v not in _READS:
        raise ValueError(
            f"{f}: format_version {v!r} is not supported (this mixllm reads versions "
            f"{list(_READS)}; a newer mixllm wrote it?)"
        )
    need = "modules" if v == 1 else "files"
    if need not in meta:
        raise ValueError(f"{f} is not a mixllm metadata file (missing keys: {need})")
    if v == 2:
        files = meta["files"]
        if (
            not isinstance(files, dict)
            or not files
            or not all(isinstance(k, str) and isinstance(h, str) for k, h in files.items())
        ):
            raise ValueError(f"{f}: field 'files' must map each weight file to its SHA-256")
        for name in files:
            if pathlib.PurePath(name).name != name or not name.endswith(".safetensors"):
                raise ValueError(f"{f}: field 'files' names {name!r}, not a .safetensors file in the folder")
    return meta


def load(
    path: Union[str, os.PathLike],
    device: Optional[Union[str, torch.device]] = None,
    verify: bool = True,
    dtype: Optional[torch.dtype] = None,
    device_map=None,
) -> nn.Module:
    """Load a model written by :func:`save` (or ``save_pretrained`` + ``mixllm.json``).

    ``verify`` checks every weight file's SHA-256 against ``mixllm.json`` first. ``dtype`` applies
    to the layers that stay in float (embeddings, norms, output head; default: the saved dtype);
    ``device`` / ``device_map`` are passed to ``from_pretrained`` (e.g. ``"cpu"``, ``"cuda"``,
    ``"auto"``).
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if (path / _META).exists():
        meta = read_meta(path)
    elif _names_mixllm(path / "config.json"):  # written by save_pretrained alone: no checksums to verify
        meta = {"format_version": FORMAT_VERSION, "files": None}
    else:
        raise ValueError(
            f"{path} is not a mixllm model directory (no {_META}, and config.json has no "
            f"quantization_config with quant_method 'mixllm')"
        )
    if meta["format_version"] == 1:
        if dtype is not None or device_map is not None:
            raise ValueError(
                f"{path / _META}: format version 1 loads without dtype= / device_map= "
                f"(save it again with mixllm.save to get version 2)"
            )
        return _load_v1(path, meta, device, verify)
    if device is not None and device_map is not None:
        raise ValueError("device, device_map: give one of them")
    return _load_v2(
        path,
        meta,
        verify,
        dtype,
        device_map if device_map is not None else (str(device) if device is not None else None),
    )


def _names_mixllm(cfile: pathlib.Path) -> bool:
    try:
        q = json.loads(cfile.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == "mixllm"


def _load_v2(path: pathlib.Path, meta: Dict[str, Any], verify: bool, dtype, device_map) -> nn.Module:
    from . import hf

    hf.require_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    cfile = path / "config.json"
    try:
        raw = json.loads(cfile.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfile} is corrupted (not valid JSON: {e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfile}: expected a JSON object")
    qraw = raw.get("quantization_config")
    if not isinstance(qraw, dict) or qraw.get("quant_method") != hf.QUANT_METHOD:
        raise ValueError(
            f"{cfile}: field quantization_config.quant_method must be {hf.QUANT_METHOD!r} "
            f"(got {qraw.get('quant_method') if isinstance(qraw, dict) else qraw!r})"
        )
    if qraw.get("format_version") != meta["format_version"]:
        raise ValueError(
            f"{cfile}: quantization_config.format_version {qraw.get('format_version')!r} "
            f"disagrees with {_META}'s {meta['format_version']!r}"
        )
    files = meta["files"]  # None: a folder save_pretrained wrote (no mixllm.json)
    index = path / _INDEX
    if index.exists():
        try:
            listed = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is corrupted (expected a JSON object with 'weight_map': {e!r})") from None
        if files is not None and listed != sorted(files):
            raise ValueError(f"{index}: weight_map names files {listed}, {_META} 'files' lists {sorted(files)}")
        if not all(isinstance(n, str) and pathlib.PurePath(n).name == n for n in listed):
            raise ValueError(f"{index}: weight_map must name files inside the folder, got {listed}"[:300])
    else:
        listed = [_WEIGHTS]
        if files is not None and sorted(files) != listed:
            raise ValueError(f"{path} has no {_INDEX} but {_META} 'files' lists {sorted(files)}")
    for name in listed:
        f = path / name
        if not f.is_file():
            raise ValueError(f"{f} is missing (a weight file listed in {_INDEX if index.exists() else _META})")
        if verify and files is not None and _sha256(f) != files[name]:
            raise ValueError(f"{f} is corrupted: its SHA-256 does not match the one in {_META} 'files'")
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises several types on a bad config.json
        raise ValueError(f"{cfile} could not be read: {e}"[:600]) from None
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_layers = getattr(text_cfg, "num_hidden_layers", 0)
    if not isinstance(n_layers, int) or not 0 <= n_layers <= 4096:  # before building that many layers
        raise ValueError(f"{cfile}: num_hidden_layers={n_layers!r} is out of range")
    kw = {"device_map": device_map} if device_map is not None else {}
    if dtype is not None:
        kw["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=cfg, **kw)
    except (ValueError, TypeError, ImportError):
        raise
    except Exception as e:  # OSError, RuntimeError, KeyError from transformers / safetensors
        raise ValueError(f"{path} could not be loaded: {type(e).__name__}: {e}"[:600]) from None
    model.mixllm_info = {k: meta.get(k) for k in ("method", "config", "report", "evaluation")}
    return model.eval()


# ---------------------------------------------------------------------------- format version 1
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
                raise ValueError(
                    f"{_META}: module {name!r} has unknown class "
                    f"{spec.get('class') if isinstance(spec, dict) else spec!r} "
                    f"(registered: {sorted(MODULES)}); import the method that defines it"
                )
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
            raise ValueError(
                f"{wfile}: tensor {k!r} has shape {tuple(v.shape)} {v.dtype}, expected {tuple(e.shape)} {e.dtype}"
            )
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    have = os.path.getsize(wfile)
    if total > 2 * have + (64 << 20):
        raise ValueError(
            f"config.json / {_META} describe {total / 2**30:.2f} GiB of tensors but {wfile} "
            f"holds {have / 2**30:.2f} GiB"
        )


def _load_v1(path: pathlib.Path, meta: Dict[str, Any], device, verify: bool) -> nn.Module:
    """Format version 1 (one ``model.safetensors``, the modules in ``mixllm.json``), still read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

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
        raise ValueError(
            f"{wfile} does not match {_META}/config.json: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in expected.items():
        if tuple(v.shape) != tuple(state[k].shape) or v.dtype != state[k].dtype:
            raise ValueError(
                f"{wfile}: tensor {k!r} has shape {tuple(state[k].shape)} {state[k].dtype}, "
                f"expected {tuple(v.shape)} {v.dtype}"
            )
    model.load_state_dict(state, strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    model.mixllm_info = {k: meta.get(k) for k in ("method", "config", "report")}
    model.eval()
    return model.to(device) if device is not None else model
