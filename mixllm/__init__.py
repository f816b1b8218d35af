"""mixllm: salience-driven mixed-precision quantization of LLMs (MixLLM, SliM-LLM, CMPQ).

User surface (torchao style)::

    import mixllm
    report = mixllm.quantize(model, mixllm.MixLLMConfig(bits=4.4), calib)   # in place
    mixllm.save(model, "out/", tokenizer=tok)
    model = mixllm.load("out/")     # or transformers.AutoModelForCausalLM.from_pretrained("out/")

The torch-facing names are imported lazily, so ``mixllm.ops`` works with NumPy alone; where torch and
transformers are installed, ``import mixllm`` also registers the ``mixllm`` quantization method with
transformers (mixllm/hf.py), which imports both.
"""

from . import ops  # noqa: F401

__version__ = "0.1.0"

_LAZY = {
    "quantize": ("mixllm.methods", "quantize"),
    "METHODS": ("mixllm.methods", "METHODS"),
    "MixLLMConfig": ("mixllm.methods", "MixLLMConfig"),
    "SliMConfig": ("mixllm.methods", "SliMConfig"),
    "CMPQConfig": ("mixllm.methods", "CMPQConfig"),
    "GPTQConfig": ("mixllm.methods", "GPTQConfig"),
    "RTNConfig": ("mixllm.methods", "RTNConfig"),
    "QuantConfig": ("mixllm.methods", "QuantConfig"),
    "MixedLinear": ("mixllm.nn", "MixedLinear"),
    "fuse_projections": ("mixllm.fuse", "fuse_projections"),
    "unfuse_projections": ("mixllm.fuse", "unfuse_projections"),
    "save": ("mixllm.io", "save"),
    "load": ("mixllm.io", "load"),
    "perplexity": ("mixllm.eval", "perplexity"),
}
__all__ = ["ops", *_LAZY]


def _register_with_transformers():
    """Make ``transformers.AutoModelForCausalLM.from_pretrained`` load mixllm checkpoints
    (``quant_method: "mixllm"``, mixllm/hf.py); skipped where transformers is not installed."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        return
    from . import hf  # noqa: F401  (registers on import)


_register_with_transformers()


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'mixllm' has no attribute {name!r}")
