"""Weight-only ops (csrc/woq.c), WeightOnlyLinear, and the RTN / GPTQ baseline configs."""

import numpy as np
import pytest
import reference as ref
import torch

from mixllm import ops
from mixllm.methods.baselines import GPTQConfig, LayerStats, RTNConfig, collect_stats
from mixllm.nn_weight_only import WeightOnlyLinear


def group_ref(codes, scale, offset, g):
    K = codes.shape[1]
    idx = np.arange(K) // g
    return codes.astype(np.float64) * scale[:, idx] + offset[:, idx]


def csr(rng, N, K, nnz):
    flat = rng.choice(N * K, nnz, replace=False)
    r, c = np.divmod(np.sort(flat), K)
    rowptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=N))]).astype(np.int64)
    return rowptr, c.astype(np.int64), rng.standard_normal(nnz).astype(np.float32), r


@pytest.mark.parametrize("N,K,g,nnz", [(7, 50, 16, 0), (16, 128, 128, 9), (3, 300, 64, 20)])
def test_woq_group_dequantize_and_linear(rng, N, K, g, nnz):
    G = (K + g - 1) // g
    codes = rng.integers(0, 8, (N, K)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, (N, G)).astype(np.float32)
    offset = rng.uniform(-0.3, 0, (N, G)).astype(np.float32)
    sp = {}
    W = group_ref(codes, scale, offset, g)
    if nnz:
        rowptr, cols, vals, rows = csr(rng, N, K, nnz)
        sp = dict(rowptr=rowptr, cols=cols, vals=vals)
        W[rows, cols] = vals
    out = ops.woq_dequantize("group", codes, g, scale, offset, **sp)
    np.testing.assert_allclose(out, W, rtol=1e-6, atol=1e-7)
    x = rng.standard_normal((5, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    y = ops.woq_linear(x, "group", codes, g, scale, offset, bias=bias, **sp)
    np.testing.assert_allclose(y, x.astype(np.float64) @ W.T + bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_woq_codebook_linear_dtypes(rng, dtype):
    N, K, L = 12, 40, 8
    codes = rng.integers(0, L, (N, K)).astype(np.uint8)
    cb = np.sort(rng.standard_normal((K, L)), 1).astype(np.float32)
    rowptr, cols, vals, rows = csr(rng, N, K, 6)
    W = cb[np.arange(K)[None, :], codes].astype(np.float64)
    W[rows, cols] = vals
    x = torch.from_numpy(rng.standard_normal((2, 3, K)).astype(np.float32)).to(dtype)
    y = ops.woq_linear(
        x,
        "codebook",
        torch.from_numpy(codes),
        codebook=torch.from_numpy(cb),
        rowptr=torch.from_numpy(rowptr),
        cols=torch.from_numpy(cols),
        vals=torch.from_numpy(vals),
    )
    assert y.dtype == dtype and y.shape == (2, 3, N)
    want = x.double().numpy() @ W.T
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    np.testing.assert_allclose(y.double().numpy(), want, rtol=tol, atol=tol * 4)


def test_woq_errors(rng):
    codes = np.zeros((4, 8), np.uint8)
    s, o = np.ones((4, 1), np.float32), np.zeros((4, 1), np.float32)
    with pytest.raises(ValueError, match="kind"):
        ops.woq_dequantize("lut", codes, 8, s, o)
    with pytest.raises(ValueError, match="scale"):
        ops.woq_dequantize("group", codes, 4, s, o)  # needs [4, 2]
    with pytest.raises(ValueError, match="codes"):
        ops.woq_dequantize("codebook", np.full((4, 8), 4, np.uint8), codebook=np.zeros((8, 4), np.float32))
    with pytest.raises(ValueError, match="rowptr"):
        ops.woq_dequantize(
            "group", codes, 8, s, o, rowptr=np.array([0, 1, 0, 1, 1]), cols=np.array([0]), vals=np.ones(1)
        )
    with pytest.raises(ValueError, match="cols"):
        ops.woq_dequantize(
            "group", codes, 8, s, o, rowptr=np.array([0, 1, 1, 1, 1]), cols=np.array([8]), vals=np.ones(1)
        )
    with pytest.raises(ValueError, match="all three"):
        ops.woq_dequantize("group", codes, 8, s, o, rowptr=np.array([0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="x"):
        ops.woq_linear(np.ones((2, 7), np.float32), "group", codes, 8, s, o)
    with pytest.raises(TypeError, match="x"):
        ops.woq_linear(np.ones((2, 8), np.int32), "group", codes, 8, s, o)
    with pytest.raises(ValueError, match="NaN"):
        ops.woq_linear(np.full((1, 8), np.nan, np.float32), "group", codes, 8, s, o)
    with pytest.raises(TypeError, match="codes"):
        ops.woq_dequantize("group", [[1]], 8, s, o)


def test_weight_only_linear_drop_in_and_state_dict(rng):
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 24)
    m = WeightOnlyLinear.from_linear(lin, bits=4, group_size=32)
    x = torch.randn(3, 5, 100)
    W = m.dequantize()
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, W, lin.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x[0, :2]), torch.nn.functional.linear(x[0, :2], W, lin.bias), rtol=1e-5, atol=1e-5)
    assert (W - lin.weight).abs().max() < 0.6 * (lin.weight.abs().max() / 15 + 1e-3) * 2
    assert "avg_bits=4.000" in repr(m) and "group_size=32" in repr(m)
    # codebook layer with outliers: a fresh module built from get_config loads the state strictly
    cb = np.sort(rng.standard_normal((100, 4)), 1).astype(np.float32)
    codes = rng.integers(0, 4, (24, 100))
    out = (np.array([0, 5, 23]), np.array([3, 99, 0]), np.array([1.5, -2.0, 0.25], np.float32))
    m2 = WeightOnlyLinear.from_codebook(lin, codes, cb, np.full(100, 2), outliers=out)
    m3 = WeightOnlyLinear.from_config(m2.get_config())
    m3.load_state_dict(m2.state_dict(), strict=True)
    torch.testing.assert_close(m3(x), m2(x), rtol=0, atol=0)
    W2 = m2.dequantize()
    assert W2[5, 99] == -2.0 and W2[0, 3] == 1.5 and m2.cols.numel() == 3
    assert m2.average_bits() == 2.0
    # a module of another shape loads by resizing its variable-size buffers (plain torch path)
    m4 = WeightOnlyLinear(100, 24, kind="codebook", levels=16, nnz=0)
    m4.load_state_dict(m2.state_dict())
    torch.testing.assert_close(m4(x), m2(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 99))
    with pytest.raises(TypeError, match="nn.Linear"):
        WeightOnlyLinear.from_linear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="kind"):
        WeightOnlyLinear(4, 4, kind="x")


def test_weight_only_linear_torch_dequant_matches_c(rng):
    """The CUDA path's torch dequantization, run on CPU tensors, equals the C op."""
    lin = torch.nn.Linear(70, 9)
    m = WeightOnlyLinear.from_linear(lin, bits=3, group_size=32)
    torch.testing.assert_close(m._dequantize_torch(), m.dequantize(), rtol=0, atol=0)
    cb = np.sort(rng.standard_normal((70, 8)), 1).astype(np.float32)
    m2 = WeightOnlyLinear.from_codebook(
        lin,
        rng.integers(0, 8, (9, 70)),
        cb,
        np.full(70, 3),
        outliers=(np.array([1, 8]), np.array([0, 69]), np.array([3.0, 4.0])),
    )
    torch.testing.assert_close(m2._dequantize_torch(), m2.dequantize(), rtol=0, atol=0)


def test_nbytes_accounting():
    lin = torch.nn.Linear(256, 64, bias=False)
    m = WeightOnlyLinear.from_linear(lin, bits=2, group_size=128)
    # codes 2 bits + fp16 scale and offset per group + 1 byte of width per column group
    assert m.nbytes() == 64 * 256 * 2 // 8 + 64 * 2 * 4 + 2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_config_matches_quantize_weight(rng, bits):
    lin = torch.nn.Linear(96, 20)
    m = RTNConfig(bits=bits, group_size=32).quantize_linear(lin)
    q, s, z = ops.quantize_weight(lin.weight.detach().numpy(), bits, 32)
    want = ref.dequant(q, s, z, 32)
    # scale and offset (-zero * scale) are stored in fp16: each level moves by < 1% of a step
    np.testing.assert_allclose(m.dequantize().numpy(), want, atol=float(s.max()) * 1e-2)
    assert (m.codes.numpy() == q).all()


def test_gptq_config_beats_rtn_on_output_error(rng):
    torch.manual_seed(1)
    K, N = 128, 32
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32)))
    X = rng.standard_normal((512, K)) @ (np.eye(K) + 0.3 * rng.standard_normal((K, K)) / np.sqrt(K))
    X = X.astype(np.float32)
    st = LayerStats(H=2 * X.astype(np.float64).T @ X / len(X), X=None, n=len(X))
    with torch.no_grad():
        ref_y = lin(torch.from_numpy(X))
        err = lambda m: float(((m(torch.from_numpy(X)) - ref_y) ** 2).mean())
        assert err(GPTQConfig(bits=3, group_size=32).quantize_linear(lin, st)) < 0.9 * err(
            RTNConfig(bits=3, group_size=32).quantize_linear(lin)
        )
    with pytest.raises(ValueError, match="bits"):
        GPTQConfig(bits=1)
    with pytest.raises(ValueError, match="group_size"):
        RTNConfig(bits=4, group_size=0)
    with pytest.raises(TypeError, match="stats"):
        GPTQConfig(bits=4).quantize_linear(lin, None)


class Tiny(torch.nn.Module):
    """A stand-in decoder: embeddings, two 'layers' of linears, a head (not quantized)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 32)
        self.layers = torch.nn.ModuleList(
            [torch.nn.ModuleDict({"up": torch.nn.Linear(32, 64), "down": torch.nn.Linear(64, 32)}) for _ in range(2)]
        )
        self.lm_head = torch.nn.Linear(32, 50)

    def forward(self, ids):
        h = self.emb(ids)
        for l in self.layers:
            h = h + l["down"](torch.relu(l["up"](h)))
        return self.lm_head(h)


@pytest.mark.parametrize("method", ["rtn", "gptq", "slim", "cmpq"])
def test_model_level_apply(method):
    from mixllm.methods.cmpq import CMPQConfig
    from mixllm.methods.slim import SliMConfig

    torch.manual_seed(0)
    model = Tiny()
    calib = torch.randint(0, 50, (4, 16))
    ids = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        ref_out = model(ids)
    cfg = {
        "rtn": RTNConfig(4, 32),
        "gptq": GPTQConfig(4, 32),
        "slim": SliMConfig(3, group_size=16),
        "cmpq": CMPQConfig(3.5),
    }[method]
    report = cfg.apply(model, calib)
    qs = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(qs) == 4 and isinstance(model.lm_head, torch.nn.Linear)
    assert abs(report["avg_bits"] - float(cfg.bits)) < 1e-9 and report["n_layers"] == 4
    with torch.no_grad():
        out = model(ids)
    assert ((out - ref_out) ** 2).mean() < 0.05 * (ref_out**2).mean()
    stats = collect_stats(Tiny(), calib, keep_tokens=8)
    assert set(stats) == {f"layers.{i}.{n}" for i in range(2) for n in ("up", "down")}
    st = stats["layers.0.up"]
    assert st.H.shape == (32, 32) and st.n == 64 and st.X.shape[1] == 32
    with pytest.raises(ValueError, match="calib"):
        GPTQConfig(4).apply(Tiny(), None)


@pytest.mark.parametrize("method", ["rtn", "slim", "cmpq"])
def test_quantize_save_load_roundtrip_tiny_llama(tmp_path, method):
    """One API for every method: mixllm.quantize, then mixllm.save / mixllm.load give identical logits."""
    io = pytest.importorskip("mixllm.io")
    pytest.importorskip("transformers")
    from mixllm.methods import METHODS, quantize

    model = _tiny_llama(layers=2)
    calib = torch.randint(0, 64, (4, 16))
    conf = {
        "rtn": METHODS["rtn"](bits=3, group_size=32),
        "slim": METHODS["slim"](bits=3, group_size=16),
        "cmpq": METHODS["cmpq"](bits=2.5),
    }[method]
    report = quantize(model, conf, calib)
    assert abs(report["avg_bits"] - float(conf.bits)) < 1e-9
    assert sum(isinstance(m, WeightOnlyLinear) for m in model.modules()) == 14  # 7 linears x 2 layers
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    io.save(model, tmp_path / "q")
    loaded = io.load(tmp_path / "q")
    with torch.no_grad():
        after = loaded(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def _tiny_llama(layers=3):
    pytest.importorskip("transformers")
    from _models import tiny_llama

    return tiny_llama(intermediate_size=128, num_hidden_layers=layers)


@pytest.mark.parametrize("method", ["gptq", "slim"])
def test_sequential_calibration_sees_the_quantized_prefix(method):
    """Regression (issue 5): GPTQ / SliM-LLM were calibrated in one pass on the full-precision model's
    inputs, so every layer after the first was fitted to inputs it never sees once the layers before it
    are quantized (3-bit GPTQ ppl 306 vs RTN 117 on the default model). Sequential calibration must give
    each layer exactly the inputs it has in the final quantized model: re-quantizing the original layer
    from the quantized model's own inputs reproduces its codes, and the one-pass codes differ."""
    import copy

    from mixllm.methods.slim import SliMConfig

    model = _tiny_llama()
    orig = copy.deepcopy(model)
    calib = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(1))
    mk = {
        "gptq": lambda **kw: GPTQConfig(bits=3, group_size=32, **kw),
        "slim": lambda **kw: SliMConfig(bits=3, group_size=16, tau_n=5, keep_tokens=64, **kw),
    }[method]
    rep = mk().apply(model, calib)
    assert rep["calibration"] == "sequential" and rep["n_layers"] == 21
    onepass = copy.deepcopy(orig)
    assert mk(sequential=False).apply(onepass, calib)["calibration"] == "one-pass"
    qs = {n: m for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}
    st = collect_stats(model, calib, filter_fn=lambda n, m: n in qs, keep_tokens=0)
    differs = 0
    for n, q in qs.items():
        again = mk(keep_tokens=0).quantize_linear(orig.get_submodule(n), st[n]) if method == "gptq" else None
        if again is not None:
            assert (again.codes != q.codes).float().mean() < 1e-3, n
        differs += bool((onepass.get_submodule(n).codes != q.codes).any())
    # the first group (block 0 q/k/v) sees the same inputs either way; later ones must not
    assert all(
        not (onepass.get_submodule(n).codes != qs[n].codes).any()
        for n in qs
        if n.startswith("model.layers.0.self_attn.") and n[-6:] in ("q_proj", "k_proj", "v_proj")
    )
    assert differs >= 15


def test_sequential_falls_back_without_a_block_list():
    """Models whose linears are not inside one list of callable blocks get the one-pass statistics."""
    torch.manual_seed(0)
    model = Tiny()
    rep = GPTQConfig(4, 32).apply(model, torch.randint(0, 50, (4, 16)))
    assert rep["calibration"] == "one-pass" and rep["n_layers"] == 4


def test_real_model_gptq_beats_rtn_on_held_out_text():
    """On the default real model (its first two blocks, 3-bit, g128), sequential GPTQ calibrated on
    16 x 256 calibration tokens gives a smaller error of the block outputs on held-out evaluation text
    than RTN (the one-pass setup of issue 5 made the full model worse than RTN)."""
    from _e2e import calib_ids, eval_ids, model_and_tokenizer

    nb = 2
    ev = eval_ids(1024).reshape(4, 256)
    cal = calib_ids(16, 256)

    def truncated():  # the first nb blocks only: the same layers and inputs, a fraction of the cost
        m, _ = model_and_tokenizer()
        m.model.layers = m.model.layers[:nb]
        return m

    with torch.no_grad():
        ref_h = truncated()(ev, output_hidden_states=True).hidden_states[nb]
    errs = {}
    for name, cfg in (("rtn", RTNConfig(3)), ("gptq", GPTQConfig(3))):
        m = truncated()
        rep = cfg.apply(m, cal)
        assert rep["n_layers"] == 7 * nb and rep["calibration"] == ("sequential" if name == "gptq" else "none")
        with torch.no_grad():
            h = m(ev, output_hidden_states=True).hidden_states[nb]
        errs[name] = float((h - ref_h).norm() / ref_h.norm())
    assert errs["gptq"] < 0.85 * errs["rtn"], errs
