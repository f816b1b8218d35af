"""mixllm: salience-driven mixed-precision quantization of LLMs (MixLLM, SliM-LLM, CMPQ)."""
from . import ops  # noqa: F401

__version__ = "0.1.0"
