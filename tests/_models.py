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


def random_mixed_linear(seed: int, N: int = 200, K: int = 300, frac: float = 0.1, bias: bool = True, group_size=128):
    """A ``MixedLinear`` (round to nearest) of a random N x K layer, a random ``frac`` of its rows 8-bit."""
    from mixllm.nn import MixedLinear

    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g))
    rows8 = torch.randperm(N, generator=g)[: int(round(frac * N))]
    return MixedLinear.from_linear(lin, rows8.numpy(), group_size=group_size)
