"""Small random Hugging Face Llama models, for tests that need the real architecture (hooks, blocks,
saving) but not real weights."""

import torch


def tiny_llama(seed: int = 0, **config):
    """A random ``LlamaForCausalLM`` in eval mode, seeded: 2 blocks of width 64 (4 heads, 2 KV heads, MLP
    96), vocabulary 64, context 64, unless ``config`` overrides them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    kw.update(config)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()
