"""The base of every method's config, and the registry the dispatcher (:func:`mixllm.quantize`) and the
CLI read.

A method is a ``@dataclass`` config class deriving from :class:`QuantConfig` and registered with
:func:`register`::

    @register("rtn", calibration=False)
    @dataclass
    class RTNConfig(WeightOnlyConfig):
        bits: int = 4
        ...

Registration sets the class's ``name`` (the CLI's ``--method`` and the checkpoint's ``method``) and
whether it needs calibration data; weight-only methods derive from :class:`WeightOnlyConfig` and only
provide ``quantize_linear``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

__all__ = ["QuantConfig", "WeightOnlyConfig", "register", "REGISTRY"]

REGISTRY: Dict[str, type] = {}


def register(name: str, *, calibration: bool = True) -> Callable[[type], type]:
    """Class decorator: register a :class:`QuantConfig` subclass as method ``name``."""

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, QuantConfig)):
            raise TypeError(f"register({name!r}): expected a QuantConfig subclass, got {cls!r}")
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {REGISTRY[name].__name__}")
        cls.name = name
        cls.calibration = calibration
        REGISTRY[name] = cls
        return cls

    return deco


class QuantConfig:
    """A quantization method's configuration (its fields are the method's knobs).

    ``apply(model, calib)`` quantizes ``model`` in place and returns a JSON-serialisable report (at least
    ``avg_bits``); ``calib`` is what :func:`mixllm.methods.prepare_calib` gives (token ids, a
    :class:`mixllm.calib.Calibration`, or ``None`` when :meth:`needs_calibration` is False).
    """

    name: ClassVar[str] = ""
    calibration: ClassVar[bool] = True

    def needs_calibration(self) -> bool:
        return type(self).calibration

    def apply(self, model, calib=None) -> Dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.apply")


class WeightOnlyConfig(QuantConfig):
    """A weight-only method: each selected ``nn.Linear`` becomes a
    :class:`mixllm.nn_weight_only.WeightOnlyLinear` made by ``quantize_linear(linear, stats)`` from the
    layer's calibration statistics (``None`` for methods without calibration)."""

    def quantize_linear(self, linear, stats=None):
        raise NotImplementedError(f"{type(self).__name__}.quantize_linear")

    def apply(self, model, calib=None, filter_fn: Optional[Callable] = None, verbose: bool = False) -> Dict[str, Any]:
        from .baselines import default_filter, quantize_weight_only  # the loop of every weight-only method

        return quantize_weight_only(model, self, calib, filter_fn or default_filter, verbose)
