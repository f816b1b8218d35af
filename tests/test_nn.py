"""MixedLinear on real layers of the default model with real activations (docs/spec.md §5)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _e2e import _base, layer_inputs
from _models import random_mixed_linear

from mixllm import ops
from mixllm.nn import MixedLinear

DOWN = "model.layers.0.mlp.down_proj"  # K = 1536
QPROJ = "model.layers.3.self_attn.q_proj"  # K = 576


def _fake_quant_act(x, g):
    """Float64 reference of the int8 per-token-group activation quantizer."""
    K = x.shape[-1]
    xd = x.double()
    out = torch.empty_like(xd)
    for j in range(0, K, g):
        blk = xd[:, j : j + g]
        s = blk.abs().amax(1, keepdim=True).float().double() / 127
        s = torch.where(s == 0, torch.ones_like(s), s)
        out[:, j : j + g] = torch.round(blk / s).clamp(-127, 127) * s
    return out


@pytest.mark.parametrize("name", [DOWN, QPROJ])
@pytest.mark.parametrize("frac", [0.0, 0.1, 1.0])
def test_matches_dequantized_reference(name, frac):
    lin = _base()[0].get_submodule(name)
    x = layer_inputs(name)
    N = lin.out_features
    rows8 = np.random.default_rng(0).choice(N, int(frac * N), replace=False)
    m = MixedLinear.from_linear(lin, rows8)
    assert m.n8 == len(rows8) and m.perm[: m.n8].tolist() == sorted(rows8.tolist())
    y = m(x)
    ref = (_fake_quant_act(x, 128) @ m.dequantized_weight().double().T).float()
    # int32 accumulation is exact; only the float32 per-group scaling differs from float64
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # and it approximates the float layer, better with more 8-bit rows
    rel = ((y - lin(x)).norm() / lin(x).norm()).item()
    assert rel < {0.0: 0.2, 0.1: 0.2, 1.0: 0.02}[frac]


def test_8bit_rows_are_the_precise_ones_and_order_is_kept():
    lin = _base()[0].get_submodule(QPROJ)
    x = layer_inputs(QPROJ)
    rows8 = np.arange(0, lin.out_features, 3)
    m = MixedLinear.from_linear(lin, rows8)
    err = (m(x) - lin(x)).detach().pow(2).mean(0)
    mask = torch.zeros(lin.out_features, dtype=torch.bool)
    mask[rows8] = True
    assert err[mask].mean() < 0.05 * err[~mask].mean()


def test_uses_given_codes_and_bias():
    lin = torch.nn.Linear(576, 192, bias=True)
    src = _base()[0].get_submodule("model.layers.1.self_attn.k_proj")
    with torch.no_grad():
        lin.weight.copy_(src.weight)
        lin.bias.copy_(src.weight[:, :1].flatten() * 3)
    q4 = ops.quantize_weight(lin.weight.detach(), 4, 128)
    m = MixedLinear.from_linear(lin, [], q4=q4)
    assert torch.equal(m.scale4, q4[1]) and torch.equal(m.bias, lin.bias.detach())
    x = layer_inputs("model.layers.1.self_attn.k_proj")
    w = torch.as_tensor(ops.dequantize_weight(*q4, 128))
    ref = (_fake_quant_act(x, 128) @ w.double().T + lin.bias.double()).float()
    # (a float32 vs float64 rounding tie may flip one activation code: one step of one group)
    assert torch.allclose(m(x), ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item())


def test_state_dict_round_trip_and_config():
    lin = _base()[0].get_submodule(DOWN)
    m = MixedLinear.from_linear(lin, np.arange(0, 576, 7))
    m2 = MixedLinear.from_config(m.get_config())
    m2.load_state_dict(m.state_dict())
    x = layer_inputs(DOWN)
    assert torch.equal(m(x), m2(x))
    assert set(m.state_dict()) == {"perm", "qweight4", "scale4", "zero4", "qweight8", "scale8"}
    r = repr(m)
    assert "n8=83" in r and "in_features=1536" in r and "act_bits=8" in r
    assert m.weight_bytes() < lin.weight.numel() * 0.75  # < 6 bits per weight incl. scales


def test_to_device_dtypes_and_weight_only():
    lin = _base()[0].get_submodule(QPROJ)
    x = layer_inputs(QPROJ)
    m = MixedLinear.from_linear(lin, [1, 2, 3]).to("cpu")
    y = m(x)
    assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert torch.equal(m.to(torch.device("cpu"))(x), y)
    wo = MixedLinear.from_linear(lin, [1, 2, 3], weight_only=True)
    assert torch.allclose(wo(x), F.linear(x, wo.dequantized_weight()), rtol=1e-5, atol=1e-5)
    assert "weight_only" in repr(wo)


@pytest.mark.parametrize("weight_only", [False, True])
def test_torch_compile_copies_and_pickles(weight_only):
    """Under torch.compile(fullgraph=True) the layer is one custom op with the eager result; a
    deepcopy or pickled copy is a separate layer (own kernel caches, own key for the op)."""
    import copy
    import pickle

    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(300, 70)
    m = MixedLinear.from_linear(lin, [0, 7, 69], weight_only=weight_only)
    x = torch.randn(2, 3, 300, generator=gen)[:, ::2]  # non-contiguous
    y = m(x)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(m, backend="aot_eager", fullgraph=True)(x), y)
    with pytest.raises(Exception, match="last dimension 300"):
        torch.compile(m, backend="aot_eager", fullgraph=True)(torch.randn(2, 299))
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin._op_key != m._op_key and twin._cache == {}
        with torch.no_grad():
            twin.bias.add_(1.0)
        assert torch.allclose(twin(x), y + 1.0, atol=1e-5)
        assert torch.equal(m(x), y)
    key = m._op_key
    del m
    import gc

    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists"):
        torch.ops.mixllm.mixed_linear(x, key, 70)


def test_errors():
    lin = _base()[0].get_submodule(QPROJ)
    with pytest.raises(TypeError):
        MixedLinear.from_linear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="rows8"):
        MixedLinear.from_linear(lin, [576])
    with pytest.raises(ValueError, match="duplicate"):
        MixedLinear.from_linear(lin, [1, 1])
    with pytest.raises(ValueError, match="n8"):
        MixedLinear(576, 10, n8=11)
    with pytest.raises(ValueError, match="in_features"):
        MixedLinear(0, 10)
    m = MixedLinear.from_linear(lin, [0])
    with pytest.raises(ValueError, match="last dimension"):
        m(torch.zeros(2, 575))
    with pytest.raises(TypeError):
        m(np.zeros((2, 576), np.float32))


@pytest.mark.parametrize("frac", [0.0, 0.1, 1.0])
def test_prepared_cpu_path_is_bit_identical_to_the_functional_op(frac):
    m = random_mixed_linear(1, frac=frac, bias=frac != 1.0)  # K = 300: a tail group of 44
    w4, w8, i4, i8 = m._parts()
    g = torch.Generator().manual_seed(2)
    xs = [
        torch.randn(1, 300, generator=g),
        torch.randn(300, generator=g),
        torch.randn(2, 5, 300, generator=g),
        torch.randn(300, 7, generator=g).T,
        torch.randn(0, 300, generator=g),
        torch.randn(33, 300, generator=g),
    ]
    for x in xs:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            xd = x.to(dt)
            y = m(xd)
            ref = ops.mixed_linear(xd, w4, w8, i4, i8, m.bias)
            assert y.dtype == dt and y.shape == (*x.shape[:-1], 200) and torch.equal(y, ref), (tuple(x.shape), dt)
    assert "cpu" in m._cache  # the calls above went through the prepared layer
    with torch.no_grad():  # the bias is read where it lies, as by the functional op
        if m.bias is not None:
            m.bias.add_(1.0)
    x = xs[2]
    assert torch.equal(m(x), ops.mixed_linear(x, w4, w8, i4, i8, m.bias))


def test_prepared_cpu_path_is_rebuilt_after_load_state_dict_and_to():
    m, other = random_mixed_linear(3), random_mixed_linear(4)
    x = torch.randn(3, 300)
    y_old = m(x)
    m.load_state_dict(other.state_dict())
    assert torch.equal(m(x), other(x)) and not torch.equal(m(x), y_old)
    prepared = m._cache["cpu"]
    m.to(torch.float32)  # a (no-op) move drops it too
    assert "cpu" not in m._cache
    assert torch.equal(m(x), other(x)) and m._cache["cpu"] is not prepared
    # a bad permutation loaded into the layer is refused when the layer is prepared
    sd = other.state_dict()
    sd["perm"] = sd["perm"].clone()
    sd["perm"][0] = sd["perm"][1]
    m.load_state_dict(sd)
    with pytest.raises(ValueError, match="permutation"):
        m(x)


def test_prepared_cpu_errors():
    m = random_mixed_linear(5)
    with pytest.raises(TypeError, match="x: expected dtype"):
        m(torch.zeros(2, 300, dtype=torch.float64))
    with pytest.raises(ValueError, match="last dimension"):
        m(torch.zeros(2, 301))
    p = m._prepared_cpu()
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        p(np.zeros((2, 300), np.float32))
    with pytest.raises(ValueError, match="x: contains NaN or Inf"):
        p(torch.full((1, 300), float("nan")))
