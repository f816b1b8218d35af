"""MixLLM on the default real model: salience and Hessians against autograd, global allocation, the
budget, reuse of a Calibration, and quality ordering on real text."""

import numpy as np
import pytest
import torch
from _e2e import calib_ids, eval_ids, model_and_tokenizer

import mixllm
from mixllm import calib as C
from mixllm.eval import perplexity
from mixllm.methods import METHODS, get_method
from mixllm.methods.mixllm import MixLLMConfig, allocate, plot_fractions


def test_config_budget_and_validation():
    assert MixLLMConfig(bits=4.4).fraction_8bit() == pytest.approx(0.1)
    assert MixLLMConfig(bits={8: 10, 4: 90}).fraction_8bit() == pytest.approx(0.1)
    assert MixLLMConfig(bits=4.4, fraction=0.25).fraction_8bit() == 0.25
    assert MixLLMConfig(bits=8).fraction_8bit() == 1 and MixLLMConfig(bits=4).fraction_8bit() == 0
    assert not MixLLMConfig(bits=4, gptq=False).needs_calibration()
    for bad in (3.9, 8.5, "4.4", {8: 10, 4: 80}, {2: 10, 4: 90}, True):
        with pytest.raises(ValueError, match="bits"):
            MixLLMConfig(bits=bad)
    for kw, msg in (
        (dict(selection="best"), "selection"),
        (dict(act_bits=4), "act_bits"),
        (dict(group_size=0), "group_size"),
        (dict(fraction=1.5), "fraction"),
        (dict(n_calib=0), "n_calib"),
        (dict(damp=-1.0), "damp"),
    ):
        with pytest.raises(ValueError, match=msg):
            MixLLMConfig(**kw)
    assert get_method("mixllm") is MixLLMConfig and METHODS["mixllm"] is MixLLMConfig
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")
    with pytest.raises(TypeError):
        mixllm.quantize(torch.nn.Linear(2, 2), "mixllm")


@pytest.fixture(scope="module")
def two_blocks():
    """Calibration statistics of blocks 0 and 1 of the real model on 2 real windows of 64 tokens."""
    model, tok = model_and_tokenizer()
    layers = [(n, m) for n, m in C.target_linears(model) if ".layers.0." in n or ".layers.1." in n]
    cal = C.calibrate(model, calib_ids(2, 64), layers, progress=False)
    return model, layers, cal


def test_salience_matches_autograd(two_blocks):
    """S_c = sum_d |g_d.delta_c + (g_d.delta_c)^2/2| with per-sequence weight gradients from autograd."""
    model, layers, cal = two_blocks
    ids = calib_ids(2, 64)
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    ref = {n: torch.zeros(model.get_submodule(n).out_features, dtype=torch.float64) for n in names}
    for i in range(ids.shape[0]):
        model.zero_grad()
        model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.backward()
        for n in names:
            m = model.get_submodule(n)
            t = (m.weight.grad.double() * C.rtn_delta(m.weight).double()).sum(1)
            ref[n] += (t + t * t / 2).abs()
    model.zero_grad()
    for n in names:
        np.testing.assert_allclose(cal.salience[n], ref[n].numpy(), rtol=2e-3, atol=1e-12)
        assert np.all(cal.salience[n] > 0)


def test_hessians_and_sharing(two_blocks):
    model, layers, cal = two_blocks
    ids = calib_ids(2, 64)
    xs = []
    h = model.get_submodule("model.layers.1.mlp.down_proj").register_forward_hook(
        lambda m, i, o: xs.append(i[0].detach().reshape(-1, i[0].shape[-1])) and None
    )
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(input_ids=ids[i : i + 1])
    h.remove()
    X = torch.cat(xs).double()
    H = cal.hessians["model.layers.1.mlp.down_proj"]
    assert torch.allclose(H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6 * H.abs().max().item())
    hs = cal.hessians
    assert hs["model.layers.0.self_attn.q_proj"] is hs["model.layers.0.self_attn.v_proj"]
    assert hs["model.layers.0.mlp.gate_proj"] is hs["model.layers.0.mlp.up_proj"]
    assert hs["model.layers.0.self_attn.o_proj"] is not hs["model.layers.0.self_attn.q_proj"]
    assert len(cal.groups()) == 8 and cal.n_tokens == 128


def test_allocation(two_blocks):
    _, layers, cal = two_blocks
    N = {n: m.out_features for n, m in layers}
    K = {n: m.in_features for n, m in layers}
    total = sum(N[n] * K[n] for n in N)
    g = allocate(layers, cal.salience, 0.1, "global")
    used = sum(len(g[n]) * K[n] for n in N)
    assert 0.1 * total - max(K.values()) < used <= 0.1 * total
    # global: every chosen feature is at least as salient as every feature left out
    chosen = np.concatenate([cal.salience[n][g[n]] for n in N])
    left = np.concatenate([np.delete(cal.salience[n], g[n]) for n in N])
    assert chosen.min() >= left.max()
    p = allocate(layers, cal.salience, 0.1, "per_layer")
    for n in N:
        assert len(p[n]) == round(0.1 * N[n])
        assert cal.salience[n][p[n]].min() >= np.delete(cal.salience[n], p[n]).max()
    r1, r2 = (
        allocate(layers, cal.salience, 0.1, "random", seed=3),
        allocate(layers, cal.salience, 0.1, "random", seed=3),
    )
    assert all(np.array_equal(r1[n], r2[n]) for n in N)
    m8 = allocate(layers, cal.salience, 0.1, "global", row_multiple=8)
    assert all(len(m8[n]) % 8 == 0 for n in N)
    assert all(len(v) == N[n] for n, v in allocate(layers, cal.salience, 1.0).items())


def test_quantize_reuses_calibration_and_orders_quality(tmp_path):
    """On blocks 0-5 of the real model (round-to-nearest, to stay fast): ppl(W8) ~ ppl(fp32) and
    < ppl(W4.4 global) < ppl(W4); the W4.4 model's 4-bit rows are the W4 model's (one quantizer pass,
    kept in the Calibration, serves every budget)."""
    base, _ = model_and_tokenizer()
    only = r"layers\.[0-5]\."
    ids = eval_ids(1024)
    ppl = {"fp32": perplexity(base, ids, 512, progress=False)}
    cal = None
    models = {}
    for bits in (8, 4.4, 4):
        model, _ = model_and_tokenizer()
        cfg = MixLLMConfig(bits=bits, only=only, gptq=False, clip=False, progress=False)
        if cal is None:  # first run: calibrate on ids, keep the statistics for the others
            cal = C.calibrate(
                model,
                calib_ids(4, 64),
                [(n, m) for n, m in C.target_linears(model) if int(n.split(".")[2]) < 6],
                hessian=False,
                progress=False,
            )
        rep = mixllm.quantize(model, cfg, cal)
        assert abs(rep["avg_bits"] - bits) < 0.02
        ppl[bits] = perplexity(model, ids, 512, progress=False)
        models[bits] = model
    assert abs(ppl[8] - ppl["fp32"]) < 0.005 * ppl["fp32"]  # W8A8 is within noise of fp32
    assert ppl[8] < ppl[4.4] < ppl[4]
    a = models[4.4].model.layers[2].self_attn.o_proj
    b = models[4].model.layers[2].self_attn.o_proj
    rows4 = a.perm[a.n8 :]
    assert torch.equal(a.dequantized_weight()[rows4], b.dequantized_weight()[rows4])
    rep = models[4.4].mixllm_info["report"]
    png = plot_fractions(rep, tmp_path / "f.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert rep["quantized_linear_bytes"] < rep["fp16_linear_bytes"] / 3


def test_disk_cache_and_errors(tmp_path):
    model, _ = model_and_tokenizer()
    cfg = MixLLMConfig(bits=4.4, only=r"layers\.5\.self_attn\.[qk]", cache_dir=str(tmp_path), progress=False)
    mixllm.quantize(model, cfg, calib_ids())
    files = sorted(p.name for d in tmp_path.iterdir() for p in d.iterdir())
    assert files == ["block_00005.safetensors", "salience.safetensors"]  # block-by-block: finished blocks
    # the salience does not depend on the quantizer: an RTN run reuses it (no new calibration)
    import mixllm.methods.mixllm as M

    calls = []
    orig = M.calibrate
    M.calibrate = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        rtn, _ = model_and_tokenizer()
        mixllm.quantize(
            rtn, MixLLMConfig(bits=4.4, gptq=False, only=cfg.only, cache_dir=str(tmp_path), progress=False), calib_ids()
        )
    finally:
        M.calibrate = orig
    assert calls == [] and len(list(tmp_path.iterdir())) == 3  # + the one-pass RTN results
    again, _ = model_and_tokenizer()  # restored from the cache: the same model
    mixllm.quantize(again, cfg, calib_ids())
    x = eval_ids()[None, :64]
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    fresh, _ = model_and_tokenizer()
    with pytest.raises(ValueError, match="only"):
        mixllm.quantize(fresh, MixLLMConfig(only="nothing-matches"), calib_ids())
    with pytest.raises(TypeError, match="calib"):
        mixllm.quantize(fresh, MixLLMConfig(bits=4.4, only=r"layers\.5\."), 3.5)
