"""Sibling projections that read the same input, run as one layer (inference only).

A transformer block feeds one tensor to ``q_proj``, ``k_proj`` and ``v_proj``, and another to
``gate_proj`` and ``up_proj``. Quantized separately, each of them quantizes that input again and
launches its own GEMM; at decode sizes the launches and the small layers' poor use of the memory
system cost more than the weight stream itself. ``fuse_projections(model)`` concatenates each such
group of ``MixedLinear`` layers into one (``MixedLinear.concat``: the same rows, codes and scales, so
the same function) and puts a ``FusedProjection`` in each sibling's place. The first sibling called
with an input runs the fused layer once; the others, called with that same tensor, get their column
slices of its output. The model's own code (the attention and MLP forwards) is unchanged, so this
works on any architecture whose siblings are modules named as in ``DEFAULT_GROUPS`` (or ``groups``).

A sibling called with a different tensor (cross-attention, where keys and values read the encoder's
output), or after the input was modified in place, runs the fused layer again: the result is
always that of the unfused layers, at worst at the cost of the fused layer per call.

Fused models are for inference: ``mixllm.save`` refuses them (save before fusing, or
``unfuse_projections`` first). Design notes and measurements: docs/kernels.md, "Fused projections".
"""

from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import torch
from torch import nn

from .nn import MixedLinear

__all__ = [
    "DEFAULT_GROUPS",
    "DeferredRMSNorm",
    "FusedGatedMLP",
    "FusedProjection",
    "SharedInputProjections",
    "fuse_projections",
    "fused_groups",
    "unfuse_projections",
]

#: Sibling names that read one input in the usual Hugging Face decoders (Llama, Mistral, Qwen, Gemma,
#: ...): attention q/k/v, the gated MLP's gate/up, expert MLPs written as w1/w3 (w2 is their down).
DEFAULT_GROUPS: Tuple[Tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)


class SharedInputProjections(nn.Module):
    """One ``MixedLinear`` (``fused``) standing for sibling layers of output widths ``sizes``; member
    ``i`` is output columns ``offsets[i]:offsets[i + 1]``. Holds the last input and output until every
    member has taken its slice of it."""

    def __init__(self, fused: MixedLinear, names: Sequence[str], sizes: Sequence[int]):
        super().__init__()
        if sum(sizes) != fused.out_features:
            raise ValueError(f"sizes: expected widths summing to {fused.out_features}, got {list(sizes)}")
        self.fused = fused
        self.names = tuple(names)
        self.sizes = tuple(int(s) for s in sizes)
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self._pending = None  # (x, x._version, y, members served)
        self._norm = None  # (DeferredRMSNorm,) when the RMSNorm feeding the group runs in its quantizer

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The fused layer's output for x (normalized first when an RMSNorm was fused into the group)."""
        if self._norm is None:
            return self.fused(x)
        norm = self._norm[0]
        return self.fused.forward_rmsnorm(x, norm.weight, norm.variance_epsilon)

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = self._pending
        # (traced by torch.compile the same way: the identity test runs at trace time, so the
        # graph holds one call of the fused layer per input; tests/test_fuse.py counts the calls)
        version = -1 if torch.compiler.is_compiling() else x._version
        if p is not None and p[0] is x and p[1] == version and i not in p[3]:
            y, served = p[2], p[3]
            served.add(i)
            if len(served) == len(self.sizes):
                self._pending = None  # drop the references: the next input starts afresh
        else:
            y = self.run(x)
            self._pending = (x, version, y, {i})
        return y[..., self.offsets[i] : self.offsets[i + 1]]

    def extra_repr(self) -> str:
        return f"members={list(zip(self.names, self.sizes))}"


class FusedProjection(nn.Module):
    """Stands in a fused sibling's place: its slice of the group's output (``in_features`` and
    ``out_features`` as the layer it replaces). The group is registered on the parent module
    (``mixllm_fused_<names>``), not here, so that it is moved and counted once."""

    def __init__(self, group: SharedInputProjections, index: int):
        super().__init__()
        self._group = (group,)  # a tuple: not a registered submodule
        self.index = int(index)
        self.in_features = group.fused.in_features
        self.out_features = group.sizes[self.index]

    @property
    def group(self) -> SharedInputProjections:
        return self._group[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, x)

    def extra_repr(self) -> str:
        g = self.group
        return f"{g.names[self.index]} of {'+'.join(g.names)}, out_features={self.out_features}"


def _group_attr(names: Sequence[str]) -> str:
    return "mixllm_fused_" + "_".join(names)


#: Gated-MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (Hugging Face's
#: Llama, Mistral, Qwen2/3): ``fuse_projections`` replaces them by ``FusedGatedMLP`` when ``act_fn`` is SiLU.
GATED_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class FusedGatedMLP(nn.Module):
    """A gated MLP (``down_proj(silu(gate_proj(x)) * up_proj(x))``) whose gate and up projections are one
    fused layer: ``down_proj.forward_silu_mul`` reads that layer's output directly, so on a GPU the
    product is quantized as it is formed, never stored (one kernel instead of SiLU, the product and the
    activation quantizer). Bit-identical to the module it replaces. Its children are that module's (the
    same names, so the state dict's keys are unchanged); the module itself is kept for
    ``unfuse_projections``."""

    def __init__(self, mlp: nn.Module, group: "SharedInputProjections"):
        super().__init__()
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self._orig = (mlp,)  # a tuple: not a registered submodule
        self._group_name = next(n for n, c in mlp.named_children() if c is group)

    @property
    def original(self) -> nn.Module:
        return self._orig[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = getattr(self, self._group_name).run(x)  # [..., 2K]: gate columns, then up columns
        return self.down_proj.forward_silu_mul(gu)


def _is_silu(act) -> bool:
    """torch's SiLU module, or transformers' (its forward is F.silu)."""
    t = type(act)
    return isinstance(act, nn.SiLU) or (t.__name__ == "SiLUActivation" and t.__module__.startswith("transformers."))


def _gated_mlp(mlp: nn.Module, gated_mlp) -> "SharedInputProjections | None":
    """The fused gate/up group of ``mlp`` when it can run as a FusedGatedMLP (else None)."""
    if gated_mlp is False or (gated_mlp is None and type(mlp).__name__ not in GATED_MLP_CLASSES):
        return None
    group = getattr(mlp, _group_attr(("gate_proj", "up_proj")), None)
    down = getattr(mlp, "down_proj", None)
    if not isinstance(group, SharedInputProjections) or type(down) is not MixedLinear:
        return None
    if not _is_silu(getattr(mlp, "act_fn", None)):
        return None
    K = down.in_features
    if group.names != ("gate_proj", "up_proj") or group.sizes != (K, K):
        return None
    return group


#: Decoder layers whose ``input_layernorm`` feeds only ``self_attn``'s q/k/v projections and whose
#: ``post_attention_layernorm`` only ``mlp``'s gate/up projections (Hugging Face's Llama, Mistral, Qwen2/3):
#: ``fuse_projections`` moves those RMSNorms into the fused groups' activation quantizer.
RMSNORM_LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
#: RMSNorm classes computed as ``mixllm.nn.rmsnorm_reference`` (weight ``weight``, ``variance_epsilon``).
RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
#: (norm, the module it feeds, the fused group there that reads it)
_NORM_FEEDS = (
    ("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
    ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj")),
)


class DeferredRMSNorm(nn.Module):
    """Stands in the place of an RMSNorm whose only readers are one fused group's projections: returns
    its input unchanged, and the group (``SharedInputProjections.run``) normalizes it in its activation
    quantizer (``MixedLinear.forward_rmsnorm``: on a GPU one kernel instead of the norm and the
    quantizer, the normalized tensor never stored). Holds the norm's ``weight`` (the same parameter, so
    the state dict's keys are unchanged) and ``variance_epsilon``; the norm itself is kept for
    ``unfuse_projections``."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = float(norm.variance_epsilon)
        self._orig = (norm,)  # a tuple: not a registered submodule

    @property
    def original(self) -> nn.Module:
        return self._orig[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon} (runs in the projections' quantizer)"


def _fuse_norms(model: nn.Module, rmsnorm) -> None:
    """Replace each RMSNorm of the layers in ``RMSNORM_LAYER_CLASSES`` (any layer with that structure for
    ``rmsnorm=True``) whose reader's fused group is in place by a ``DeferredRMSNorm``."""
    if rmsnorm is False:
        return
    for layer in list(model.modules()):
        if rmsnorm is None and type(layer).__name__ not in RMSNORM_LAYER_CLASSES:
            continue
        for norm_name, reader_name, names in _NORM_FEEDS:
            norm = getattr(layer, norm_name, None)
            group = getattr(getattr(layer, reader_name, None), _group_attr(names), None)
            if not isinstance(group, SharedInputProjections) or group.names != names or group._norm is not None:
                continue
            if rmsnorm is None and type(norm).__name__ not in RMSNORM_CLASSES:
                continue
            weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
            if not isinstance(weight, torch.Tensor) or weight.shape != (group.fused.in_features,):
                continue
            if not isinstance(eps, (int, float)) or not 0 <= eps <= 1:
                continue
            deferred = DeferredRMSNorm(norm)
            group._norm = (deferred,)
            setattr(layer, norm_name, deferred)


def fuse_projections(
    model: nn.Module, groups: Iterable[Sequence[str]] = DEFAULT_GROUPS, gated_mlp=None, rmsnorm=None
) -> int:
    """Fuse, in place, every set of sibling ``MixedLinear`` layers named as one of ``groups`` (children of
    one module, same input width, group size and mode). Returns the number of groups fused. Layers of a
    group that differ in those respects, or are not all ``MixedLinear``, are left as they are.

    ``gated_mlp``: replace gated MLPs whose gate/up got fused and whose ``act_fn`` is SiLU by
    ``FusedGatedMLP`` (the down projection reads the fused output): None (default) for the classes in
    ``GATED_MLP_CLASSES``, True for any module with that structure (its forward must be
    ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``), False for none.

    ``rmsnorm``: move the RMSNorm that feeds a fused q/k/v or gate/up group into that group's activation
    quantizer (``DeferredRMSNorm``): None (default) for the layers in ``RMSNORM_LAYER_CLASSES`` with a norm
    in ``RMSNORM_CLASSES``, True for any module with that structure (its norm must compute
    ``mixllm.nn.rmsnorm_reference`` and feed nothing but the group), False for none. On a GPU the sum of
    squares then runs in another order than torch's, so an element's rounding can differ in rare cases;
    elsewhere the result is bit-identical."""
    if gated_mlp not in (None, True, False):
        raise TypeError(f"gated_mlp: expected None, True or False, got {gated_mlp!r}")
    if rmsnorm not in (None, True, False):
        raise TypeError(f"rmsnorm: expected None, True or False, got {rmsnorm!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    groups = [tuple(g) for g in groups]
    for g in groups:
        if len(g) < 2 or not all(isinstance(n, str) and n for n in g) or len(set(g)) != len(g):
            raise ValueError(f"groups: expected tuples of two or more distinct child names, got {g!r}")
    fused = 0
    for parent in list(model.modules()):
        for names in groups:
            layers = [getattr(parent, n, None) for n in names]
            if not all(type(m) is MixedLinear for m in layers):
                continue
            if hasattr(parent, _group_attr(names)):
                continue
            try:
                one = MixedLinear.concat(layers)
            except ValueError:
                continue  # siblings that cannot share a layer stay separate
            group = SharedInputProjections(one, names, [m.out_features for m in layers])
            parent.add_module(_group_attr(names), group)
            for i, n in enumerate(names):
                setattr(parent, n, FusedProjection(group, i))
            fused += 1
    for parent in list(model.modules()):
        for name, mlp in list(parent.named_children()):
            group = None if isinstance(mlp, FusedGatedMLP) else _gated_mlp(mlp, gated_mlp)
            if group is not None:
                setattr(parent, name, FusedGatedMLP(mlp, group))
    _fuse_norms(model, rmsnorm)
    return fused


def unfuse_projections(model: nn.Module) -> int:
    """Undo ``fuse_projections`` in place (each sibling gets its own ``MixedLinear`` back, the same
    buffers as before fusing). Returns the number of groups split."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (FusedGatedMLP, DeferredRMSNorm)):
                setattr(parent, name, child.original)
    split = 0
    for parent in list(model.modules()):
        for attr, group in list(parent.named_children()):
            if not isinstance(group, SharedInputProjections):
                continue
            for i, n in enumerate(group.names):
                setattr(parent, n, group.fused.output_slice(group.offsets[i], group.offsets[i + 1]))
            delattr(parent, attr)
            split += 1
    return split


def fused_groups(model: nn.Module) -> List[SharedInputProjections]:
    """The fused groups in ``model`` (empty for an unfused model)."""
    return [m for m in model.modules() if isinstance(m, SharedInputProjections)]
