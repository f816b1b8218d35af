"""Swapping submodules of a model in place: the one helper every method uses to put its quantized
layers where the ``nn.Linear`` layers were."""

from __future__ import annotations

from typing import Mapping

from torch import nn

__all__ = ["set_module", "replace_modules"]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted, as in ``model.named_modules()``) by ``new``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def replace_modules(model: nn.Module, new: Mapping[str, nn.Module]) -> None:
    """:func:`set_module` for every ``name -> module`` of ``new``."""
    for name, module in new.items():
        set_module(model, name, module)
