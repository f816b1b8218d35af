"""Llama-3 8B / 70B shapes, typed in from their published config.json files (meta-llama/Meta-Llama-3-8B
and -70B). The benchmarks build models from these with random weights: time and memory do not depend on
the values (accuracy is measured on real models only)."""

_COMMON = dict(
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_act="silu",
    num_key_value_heads=8,
)
LLAMA3 = {
    "8b": dict(_COMMON, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32),
    "70b": dict(_COMMON, hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_hidden_layers=80),
}
