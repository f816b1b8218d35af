"""Hugging Face integration: ``AutoModelForCausalLM.from_pretrained(dir)`` loads mixllm checkpoints.

``import mixllm`` registers, through transformers' public extension points for quantization methods
(``register_quantization_config`` / ``register_quantizer``), the ``quant_method: "mixllm"`` entry of
``config.json``:

* :class:`MixllmQuantizationConfig` is that entry: the format version, the method, its group size,
  activation bits and average weight bits, and one record per quantized module (its class and
  constructor arguments, e.g. ``n8`` = the 8-bit rows of a ``MixedLinear``): everything needed to
  rebuild the layers before a single tensor is read.
* :class:`MixllmHfQuantizer` swaps those modules into the model transformers builds on the meta
  device, checks every checkpoint tensor's name, shape and dtype against them (reading the
  safetensors headers only), and lets transformers stream the shards in; a mismatch raises
  ``ValueError`` naming the file and the field, so no half-built model is returned.

Supported transformers: >= 5.17 (tested: 5.17.0 and 5.24.0); older versions load weights through
other hooks, and ``import mixllm`` then does not register the method (:func:`mixllm.load` says why).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

__all__ = [
    "MixllmQuantizationConfig",
    "MixllmHfQuantizer",
    "MIN_TRANSFORMERS",
    "FORMAT_VERSION",
    "quantization_config_for",
    "attach_quantization_config",
    "check_checkpoint_tensors",
    "registered",
    "quantized_modules",
]

QUANT_METHOD = "mixllm"
FORMAT_VERSION = 2  # sharded safetensors + quantization_config in config.json (version 1: one file, mixllm.json)
MIN_TRANSFORMERS = (5, 17)
_WHERE = "config.json: quantization_config"


def _version_tuple(v: str):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def _module_classes() -> Dict[str, type]:
    from . import nn_weight_only  # noqa: F401  (registers WeightOnlyLinear)
    from .io import MODULES

    return MODULES


def quantized_modules(model: nn.Module):
    """``[(name, module)]`` of the registered quantized module classes inside ``model``."""
    classes = tuple(_module_classes().values())
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]


@contextlib.contextmanager
def _default_dtype(dtype):
    # transformers builds the model under the requested default dtype; the quantized modules' own
    # tensors (scales, bias) have fixed dtypes in the format, so they are created under float32.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


try:
    import transformers as _tf
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    _TF_VERSION = _tf.__version__
    _TF_OK = _version_tuple(_TF_VERSION) >= MIN_TRANSFORMERS
except ImportError:  # transformers missing or too old to have the extension points
    _TF_VERSION, _TF_OK = None, False
    HfQuantizer = QuantizationConfigMixin = object


def registered() -> bool:
    """Whether ``from_pretrained`` knows ``quant_method: "mixllm"`` (transformers >= 5.17 installed)."""
    return _TF_OK and _REGISTERED


def require_transformers() -> None:
    if not _TF_OK:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        have = _TF_VERSION or "not installed"
        raise ImportError(
            f"mixllm checkpoints load through transformers >= {need} (installed: {have}); "
            f"pip install 'transformers>={need}'"
        )


class MixllmQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a mixllm checkpoint (``quant_method: "mixllm"``).

    Fields (all written to ``config.json``):
        format_version: 2 (sharded safetensors; readers refuse versions they do not know).
        method: the quantization method (``mixllm``, ``slim``, ``cmpq``, ``gptq``, ``rtn``).
        group_size: the method's weight group size along the input dimension (``None`` when the
            layers differ; every module record carries its own).
        act_bits: 8 when the layers quantize activations (MixLLM W*A8), ``None`` for weight-only.
        weight_bits: achieved average weight bits over the quantized layers (the budget), or ``None``.
        modules: ``{module name: {"class": class name, "args": constructor arguments}}``; for
            ``MixedLinear`` the args give the part sizes (``n8`` rows in 8-bit, the other
            ``out_features - n8`` in 4-bit), for ``WeightOnlyLinear`` its kind, group size, codebook
            width (``levels``) and outlier count (``nnz``).
        method_config: the method's configuration (provenance; not needed to load).
    """

    _FIELDS = (
        "quant_method",
        "format_version",
        "method",
        "group_size",
        "act_bits",
        "weight_bits",
        "modules",
        "method_config",
    )

    def __init__(
        self,
        modules: Optional[Dict[str, Any]] = None,
        format_version: int = FORMAT_VERSION,
        method: Optional[str] = None,
        group_size: Optional[int] = None,
        act_bits: Optional[int] = None,
        weight_bits: Optional[float] = None,
        method_config: Optional[Dict[str, Any]] = None,
        quant_method: str = QUANT_METHOD,
        **unknown,
    ):
        if unknown:
            raise ValueError(
                f"{_WHERE}: unknown field(s) {sorted(unknown)} (this mixllm reads format "
                f"version {FORMAT_VERSION}: fields {list(self._FIELDS)})"
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"{_WHERE}.quant_method: expected {QUANT_METHOD!r}, got {quant_method!r}")
        if isinstance(format_version, bool) or format_version != FORMAT_VERSION:
            raise ValueError(
                f"{_WHERE}.format_version: {format_version!r} is not supported "
                f"(this mixllm reads version {FORMAT_VERSION})"
            )
        if not isinstance(modules, dict) or not modules:
            raise ValueError(
                f"{_WHERE}.modules: expected a non-empty object "
                f"{{module name: {{'class', 'args'}}}}, got {type(modules).__name__}"
            )
        classes = _module_classes()
        for name, spec in modules.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"{_WHERE}.modules: module names must be non-empty strings, got {name!r}")
            if not isinstance(spec, dict) or not isinstance(spec.get("args"), dict):
                raise ValueError(
                    f"{_WHERE}.modules[{name!r}]: expected {{'class': ..., 'args': {{...}}}}, got {spec!r}"[:300]
                )
            if spec.get("class") not in classes:
                raise ValueError(
                    f"{_WHERE}.modules[{name!r}].class: unknown class {spec.get('class')!r} (known: {sorted(classes)})"
                )
        for field, v in (("group_size", group_size), ("act_bits", act_bits)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{_WHERE}.{field}: expected a positive integer or null, got {v!r}")
        if weight_bits is not None and (isinstance(weight_bits, bool) or not isinstance(weight_bits, (int, float))):
            raise ValueError(f"{_WHERE}.weight_bits: expected a number or null, got {weight_bits!r}")
        if method is not None and not isinstance(method, str):
            raise ValueError(f"{_WHERE}.method: expected a string, got {method!r}")
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        self.method, self.group_size, self.act_bits = method, group_size, act_bits
        self.weight_bits = None if weight_bits is None else float(weight_bits)
        self.modules = modules
        self.method_config = method_config

    def to_dict(self) -> Dict[str, Any]:
        import copy

        return {k: copy.deepcopy(getattr(self, k)) for k in self._FIELDS}


def quantization_config_for(model: nn.Module) -> "MixllmQuantizationConfig":
    """The :class:`MixllmQuantizationConfig` describing ``model``'s quantized modules as they are now."""
    mods = quantized_modules(model)
    if not mods:
        raise ValueError(
            "model: no quantized modules (MixedLinear / WeightOnlyLinear) found; quantize it with mixllm.quantize first"
        )
    from .nn import MixedLinear

    info = dict(getattr(model, "mixllm_info", None) or {})
    report = info.get("report") or {}
    groups = {m.group_size for _, m in mods if m.group_size}  # codebook layers have no group (0)
    act = {8 if isinstance(m, MixedLinear) and not m.weight_only else None for _, m in mods}
    kinds = {"mixllm" if isinstance(m, MixedLinear) else (getattr(m, "method", "") or "weight-only") for _, m in mods}
    method = info.get("method") or (kinds.pop() if len(kinds) == 1 else "mixed")
    return MixllmQuantizationConfig(
        modules={n: {"class": type(m).__name__, "args": m.get_config()} for n, m in mods},
        method=method,
        group_size=groups.pop() if len(groups) == 1 and len(mods) == sum(bool(m.group_size) for _, m in mods) else None,
        act_bits=act.pop() if len(act) == 1 else None,
        weight_bits=report.get("avg_bits"),
        method_config=_jsonable(info.get("config")),
    )


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if hasattr(o, "item") and not isinstance(o, (str, bytes)):
        return o.item()
    return o


def attach_quantization_config(model: nn.Module) -> "MixllmQuantizationConfig":
    """Set ``model.config.quantization_config`` from the model's quantized modules, so that
    ``model.save_pretrained`` writes a checkpoint ``from_pretrained`` can load. A quantized output
    head is no longer tied to the input embeddings: ``tie_word_embeddings`` is cleared then."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_json_file"):
        raise TypeError("model: expected a Hugging Face model (with .config)")
    qc = quantization_config_for(model)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and isinstance(out, tuple(_module_classes().values())):
        for c in {id(cfg): cfg, id(cfg.get_text_config()): cfg.get_text_config()}.values():
            if getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
    cfg.quantization_config = qc
    return qc


def _build_modules(model: nn.Module, qc: "MixllmQuantizationConfig") -> None:
    """Swap the modules ``qc`` describes into ``model`` (built on the meta device by transformers)."""
    classes = _module_classes()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, spec in qc.modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{_WHERE}.modules: module {name!r} does not exist in this architecture ({type(model).__name__})"
            ) from None
        if head is not None and old is head and getattr(model.config.get_text_config(), "tie_word_embeddings", False):
            raise ValueError(
                f"{_WHERE}.modules: {name!r} (the output head) is quantized, but config.json "
                f"ties it to the input embeddings (tie_word_embeddings: true)"
            )
        try:
            with _default_dtype(torch.float32):
                module = classes[spec["class"]].from_config(dict(spec["args"]))
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ValueError(f"{_WHERE}.modules[{name!r}].args: bad arguments {spec['args']!r}: {e}"[:500]) from None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_DTYPE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


def check_checkpoint_tensors(model: nn.Module, files: Iterable[str], qc: "MixllmQuantizationConfig") -> None:
    """Every tensor the safetensors ``files`` hold against ``model`` (quantized modules swapped in,
    on the meta device): known names, one file each, the expected shapes, the format's dtypes inside
    quantized modules (float tensors elsewhere may be cast to the requested dtype), and none missing
    except tied aliases. Reads the headers only."""
    from safetensors import safe_open

    expected = model.state_dict()
    owner = {}  # tensor name -> quantized module name
    for name in qc.modules:
        for k in expected:
            if k.startswith(name + "."):
                owner[k] = name
    where: Dict[str, str] = {}
    for f in files:
        fname = str(f).rsplit("/", 1)[-1]
        try:
            with safe_open(str(f), framework="pt") as h:
                header = {k: (tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype()) for k in h.keys()}
        except Exception as e:  # safetensors raises its own error types, OSError and others
            raise ValueError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})"[:400]) from None
        for k, (shape, dt) in header.items():
            if k in where:
                raise ValueError(f"{f}: tensor {k!r} is also stored in {where[k]}")
            where[k] = fname
            e = expected.get(k)
            if e is None:
                mod = next((n for n in qc.modules if k.startswith(n + ".")), None)
                what = (
                    f"not a tensor of {qc.modules[mod]['class']} {mod!r} as {_WHERE} describes it"
                    if mod
                    else "not a tensor of this architecture"
                )
                raise ValueError(
                    f"{f}: unexpected tensor {k!r} ({what}; a checkpoint of another method or architecture?)"
                )
            want_dt = _DTYPE_NAMES.get(e.dtype, str(e.dtype))
            dtype_ok = dt == want_dt if (k in owner or want_dt not in _FLOAT_DTYPES) else dt in _FLOAT_DTYPES
            if shape != tuple(e.shape) or not dtype_ok:
                src = f"{qc.modules[owner[k]]['class']} {owner[k]!r} of {_WHERE}" if k in owner else "config.json"
                raise ValueError(
                    f"{f}: tensor {k!r} has shape {list(shape)} dtype {dt}, but {src} "
                    f"expects shape {list(e.shape)} dtype {want_dt}"
                )
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(k for k in expected if k not in where and k not in tied)
    if missing:
        first = missing[0]
        src = f"{qc.modules[owner[first]]['class']} {owner[first]!r} of {_WHERE}" if first in owner else "config.json"
        raise ValueError(
            f"checkpoint files {sorted(set(where.values())) or list(files)}: {len(missing)} "
            f"tensor(s) missing that {src} needs, e.g. {first!r} (a missing shard, or a "
            f"checkpoint of another method?)"
        )


class MixllmHfQuantizer(HfQuantizer):
    """Loads pre-quantized mixllm checkpoints in ``from_pretrained`` (it does not quantize on the fly:
    use :func:`mixllm.quantize`, then ``save_pretrained``)."""

    requires_calibration = True  # refuses quantization_config=... on a float checkpoint

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "device_map: disk offload is not supported for mixllm checkpoints "
                "(the quantized modules keep their tensors as buffers)"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        _build_modules(model, self.quantization_config)
        if checkpoint_files:
            check_checkpoint_tensors(model, checkpoint_files, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if on_meta:  # a half-built model is never returned
            raise ValueError(f"loading left {len(on_meta)} tensor(s) unloaded, e.g. {on_meta[0]!r}")
        for _, m in quantized_modules(model):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        qc = self.quantization_config
        model.mixllm_info = {
            "method": qc.method,
            "config": qc.method_config,
            "report": {"avg_bits": qc.weight_bits} if qc.weight_bits is not None else None,
        }
        return model

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self):
        return False


_REGISTERED = False
if _TF_OK:
    try:
        register_quantization_config(QUANT_METHOD)(MixllmQuantizationConfig)
        register_quantizer(QUANT_METHOD)(MixllmHfQuantizer)
        _REGISTERED = True
    except ValueError:  # already registered (e.g. this module was reloaded): keep the first registration
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

        _REGISTERED = AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD, type).__name__ == "MixllmHfQuantizer"
