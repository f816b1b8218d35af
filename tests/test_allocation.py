"""MixLLM's bit allocation: the per-bit (knapsack) ranking against a float64 reference, the budget
counted in bits, the per-type / per-block breakdown of where the budget went, and the salience
estimators (the per-token Fisher term against float64 references, a precomputed salience)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mixllm import ops
from mixllm.calib import Calibration, calibrate, rtn_delta, target_linears
from mixllm.methods.mixllm import MixLLMConfig, allocate
from mixllm.report import budget_breakdown

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _layers(shapes):
    # (name, in_features, out_features): an odd mix of widths, as in a transformer block
    return [(n, nn.Linear(k, o, bias=False)) for n, k, o in shapes]


SHAPES = [
    ("model.layers.0.self_attn.q_proj", 48, 40),
    ("model.layers.0.mlp.down_proj", 150, 37),
    ("model.layers.1.self_attn.q_proj", 48, 40),
    ("model.layers.1.mlp.down_proj", 150, 37),
]


def _greedy_reference(layers, sal, fraction, per_bit):
    """Rows in order of S (or S / in_features), taken while their weights fit the budget (float64)."""
    items = []
    for n, m in layers:
        for c in range(m.out_features):
            key = sal[n][c] / m.in_features if per_bit else sal[n][c]
            items.append((-float(key), n, c, m.in_features))
    items.sort(key=lambda t: t[0])  # stable: ties keep layer order, as argsort(kind="stable")
    budget = fraction * sum(m.in_features * m.out_features for _, m in layers)
    out, used = {n: [] for n, _ in layers}, 0.0
    for _, n, c, k in items:
        if used + k > budget:
            break
        used += k
        out[n].append(c)
    return {n: sorted(v) for n, v in out.items()}


@pytest.mark.parametrize("selection", ["global", "per_bit"])
@pytest.mark.parametrize("fraction", [0.03, 0.1, 0.37])
def test_ranking_matches_reference_and_budget_is_counted_in_bits(rng, selection, fraction):
    layers = _layers(SHAPES)
    sal = {n: rng.gamma(0.5, size=m.out_features) * (3 if "down" in n else 1) for n, m in layers}
    got = allocate(layers, sal, fraction, selection)
    ref = _greedy_reference(layers, sal, fraction, selection == "per_bit")
    assert {n: v.tolist() for n, v in got.items()} == ref
    total = sum(m.in_features * m.out_features for _, m in layers)
    w8 = sum(m.in_features * len(got[n]) for n, m in layers)
    assert w8 <= fraction * total < w8 + 150  # within one (widest) row of the budget
    if selection == "per_bit":  # every 8-bit row is worth at least as much per bit as every 4-bit row
        dens = {n: sal[n] / m.in_features for n, m in layers}
        lo = min(dens[n][got[n]].min() for n in got if len(got[n]))
        hi = max(np.delete(dens[n], got[n]).max() for n in got)
        assert lo >= hi or w8 + 150 > fraction * total


def test_per_bit_prefers_narrow_rows_at_equal_salience():
    layers = _layers(SHAPES)
    sal = {n: np.ones(m.out_features) for n, m in layers}
    g = allocate(layers, sal, 0.1, "per_bit")
    assert all(len(g[n]) == 0 for n in g if "down" in n)
    assert sum(len(g[n]) for n in g) == int(0.1 * 2 * (48 * 40 + 150 * 37)) // 48  # only 48-wide rows
    with pytest.raises(ValueError, match="selection"):
        MixLLMConfig(selection="per_weight")


def test_budget_breakdown_per_type_and_block():
    rep = {"layers": {n: {"in": k, "out": o, "n8": n8} for (n, k, o), n8 in zip(SHAPES, [4, 10, 0, 2])}}
    b = budget_breakdown(rep)
    w8 = 48 * 4 + 150 * 10 + 0 + 150 * 2
    assert b["type"]["down_proj"]["budget_pct"] == pytest.approx(100 * 150 * 12 / w8)
    assert b["type"]["q_proj"]["rows8_pct"] == pytest.approx(100 * 4 / 80)
    assert b["block"]["0"]["weights8"] == 48 * 4 + 150 * 10 and b["block"]["1"]["rows8"] == 2
    for axis in b.values():
        assert sum(d["budget_pct"] for d in axis.values()) == pytest.approx(100)


# ----------------------------------------------------------------------------- salience estimators
def _fisher_ref(x, g, delta):
    """float64, token by token: sum_s (g[s, c] * (x[s] . delta_c))^2 / 2."""
    x, g, delta = x.double(), g.double(), delta.double()
    out = torch.zeros(delta.shape[0], dtype=torch.float64)
    for s in range(x.shape[0]):
        out += (g[s] * (delta @ x[s])) ** 2 / 2
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_fisher_salience_matches_float64_reference(rng, device):
    S, K, N = 23, 70, 19  # odd sizes
    acc = torch.zeros(N, dtype=torch.float64, device=device)
    ref = torch.zeros(N, dtype=torch.float64)
    delta = torch.from_numpy(rng.standard_normal((K, N)).astype(np.float32)).T  # non-contiguous [N, K]
    for _ in range(3):
        x = torch.from_numpy(rng.standard_normal((S, K)).astype(np.float32))
        g = torch.from_numpy(rng.standard_normal((N, S)).astype(np.float32)).T  # non-contiguous [S, N]
        ops.salience_accumulate_io(acc, x.to(device), g.to(device), delta.to(device), kind="fisher")
        ref += _fisher_ref(x, g, delta)
    np.testing.assert_allclose(acc.cpu().numpy(), ref.numpy(), rtol=1e-4)
    # no cancellation across tokens: opposite contributions of two tokens add up instead of cancelling
    x2 = torch.ones(2, 1)
    g2 = torch.tensor([[1.0], [-1.0]])
    d2 = torch.ones(1, 1)
    assert ops.salience_accumulate_io(torch.zeros(1, dtype=torch.float64), x2, g2, d2).item() == 0.0
    assert ops.salience_accumulate_io(torch.zeros(1, dtype=torch.float64), x2, g2, d2, kind="fisher").item() == 1.0
    with pytest.raises(ValueError, match="kind"):
        ops.salience_accumulate_io(acc, x.to(device), g.to(device), delta.to(device), kind="fischer")


def _tiny_llama(seed=0):
    from _models import tiny_llama

    return tiny_llama(seed, vocab_size=61, hidden_size=48, intermediate_size=80)


def _window_inputs_and_grads(model, ids, layers):
    """One window's forward + backward: each layer's input (detached) and autograd's gradient of the
    loss with respect to its output, in the order of ``layers``."""
    seen = {}
    hs = [m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, (a[0], o))) for n, m in layers]
    try:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        grads = torch.autograd.grad(loss, [seen[n][1] for n, _ in layers])
    finally:
        for h in hs:
            h.remove()
    return {n: seen[n][0].detach() for n, _ in layers}, grads


def test_calibrate_fisher_kind_matches_autograd_reference():
    """calibrate(salience_kind="fisher") against per-token products of autograd's output gradients and
    the layers' inputs, in float64."""
    model = _tiny_llama()
    layers = [(n, m) for n, m in target_linears(model) if n.endswith(("v_proj", "down_proj"))]
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(1))
    cal = calibrate(model, ids, layers, hessian=False, salience=True, progress=False, salience_kind="fisher")
    ref = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in layers}
    for i in range(ids.shape[0]):
        inputs, grads = _window_inputs_and_grads(model, ids[i : i + 1], layers)
        for (n, m), g in zip(layers, grads):
            d = rtn_delta(m.weight, 4, 128)
            ref[n] += _fisher_ref(inputs[n][0], g[0], d)
    for n, _ in layers:
        np.testing.assert_allclose(cal.salience[n], ref[n].numpy(), rtol=1e-4, atol=1e-12)
    with pytest.raises(ValueError, match="salience_kind"):
        calibrate(model, ids, layers, hessian=False, progress=False, salience_kind="fischer")
    with pytest.raises(ValueError, match="salience_kind"):
        MixLLMConfig(salience_kind="fischer")


def test_calibrate_restore_kind_at_the_quantized_point_matches_autograd_reference():
    """calibrate(salience_kind="restore"): the pass runs the given layers at W + delta (RTN 4-bit),
    and each row scores sum over windows of t - t^2/2, t = sum_tokens g . (x @ delta_c); reference: a
    copy of the model whose weights *are* W + delta, autograd's output gradients, float64 products.
    The float model's weights are left as they were."""
    model = _tiny_llama(3)
    layers = [(n, m) for n, m in target_linears(model) if n.endswith(("q_proj", "v_proj", "down_proj"))]
    before = {n: m.weight.detach().clone() for n, m in layers}
    ids = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(2))
    cal = calibrate(model, ids, layers, hessian=False, salience=True, progress=False, salience_kind="restore")
    for n, m in layers:
        assert torch.equal(m.weight, before[n])
    qmodel = copy.deepcopy(model)
    qlayers = [(n, qmodel.get_submodule(n)) for n, _ in layers]
    deltas = {}
    with torch.no_grad():
        for n, m in qlayers:
            deltas[n] = rtn_delta(m.weight, 4, 128)
            m.weight += deltas[n]
    ref = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in layers}
    for i in range(ids.shape[0]):
        inputs, grads = _window_inputs_and_grads(qmodel, ids[i : i + 1], qlayers)
        for (n, _), g in zip(layers, grads):
            t = (g[0].double() * (inputs[n][0].double() @ deltas[n].double().T)).sum(0)
            ref[n] += t - t * t / 2
    for n, _ in layers:
        scale = ref[n].abs().max().item()
        assert scale > 0
        np.testing.assert_allclose(cal.salience[n], ref[n].numpy(), rtol=1e-3, atol=1e-4 * scale)
    with pytest.raises(ValueError, match="Hessians"):
        calibrate(model, ids, layers, hessian=True, salience=True, progress=False, salience_kind="restore")
    # u = x @ delta^T given (as the quantized-point pass keeps it from the forward) instead of delta
    x, g, d = torch.randn(7, 5), torch.randn(7, 3), torch.randn(3, 5)
    for kind in ops.SALIENCE_KINDS:
        a = ops.salience_accumulate_io(torch.zeros(3, dtype=torch.float64), x, g, d, kind=kind)
        b = ops.salience_accumulate_io(torch.zeros(3, dtype=torch.float64), x, g, None, kind=kind, u=x @ d.T)
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="u"):
        ops.salience_accumulate_io(torch.zeros(3, dtype=torch.float64), x, g, None, u=torch.zeros(7, 4))
    with pytest.raises(TypeError, match="delta"):
        ops.salience_accumulate_io(torch.zeros(3, dtype=torch.float64), x, g, None)
    # signed: a row whose restoration raises the loss scores below zero
    acc = ops.salience_accumulate_io(
        torch.zeros(1, dtype=torch.float64), torch.ones(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), kind="restore"
    )
    assert acc.item() == -1.5


def test_restore_salience_one_pass_keeps_float_hessians():
    """MixLLMConfig(salience_kind="restore") in the one-pass pipeline: the salience pass runs the layers
    at W + delta, so it must be a pass of its own; the GPTQ Hessians stay the float model's (the model
    comes out the same as with the Taylor salience whenever the same rows are 8-bit)."""
    from mixllm.nn import MixedLinear

    model = _tiny_llama(4)
    ids = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(5))
    m_restore, m_all4 = copy.deepcopy(model), copy.deepcopy(model)
    cfg = dict(sequential=False, progress=False, n_calib=4, seq_len=16)
    rep = MixLLMConfig(bits=4.4, salience_kind="restore", **cfg).apply(m_restore, ids)
    assert 4.0 < rep["avg_bits"] <= 4.45
    MixLLMConfig(bits=4, **cfg).apply(m_all4, ids)
    n8_total = 0
    for n, q in m_restore.named_modules():
        if not isinstance(q, MixedLinear):
            continue
        r = m_all4.get_submodule(n)
        n8 = q.qweight8.shape[0]
        n8_total += n8
        # GPTQ quantizes rows independently given the Hessian: the 4-bit rows of the mixed layer are
        # the all-4-bit layer's rows only if both used the float model's Hessian
        assert torch.equal(q.qweight4, r.qweight4[q.perm[n8:]])
    assert n8_total > 0


def _dequant64(codes, scale, zero, K, g):
    c = codes.double()
    s = scale.double().repeat_interleave(g, 1)[:, :K]
    z = zero.double().repeat_interleave(g, 1)[:, :K]
    return (c - z) * s


def test_salience_delta_gptq_matches_float64_reference():
    """MixLLMConfig(salience_delta="gptq"): MixLLM's salience |t + t^2/2| per window with the delta of
    4-bit GPTQ + clip on the float model's Hessians, against float64 Hessians from hooks, the float64
    PyTorch GPTQ and autograd's output gradients; the block-by-block pipeline allocates from it."""
    from mixllm.gptq import gptq_torch
    from mixllm.pipeline import PhaseTimer

    model = _tiny_llama()
    layers = target_linears(model)
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(1))
    # float64 Hessians 2 X^T X / n over every token of every window
    xs = {n: [] for n, _ in layers}
    hs = [m.register_forward_hook(lambda mod, a, o, n=n: xs[n].append(a[0].detach()[0].double())) for n, m in layers]
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(input_ids=ids[i : i + 1], use_cache=False)
    for h in hs:
        h.remove()
    delta = {}
    for n, m in layers:
        X = torch.cat(xs[n])
        H = 2 * X.T @ X / X.shape[0]
        c, sc, z = gptq_torch(m.weight.detach(), H, 4, 128, None, 0.01, True, 20, torch.float64)
        delta[n] = _dequant64(c, sc, z, m.in_features, 128) - m.weight.detach().double()
    ref = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in layers}
    for i in range(ids.shape[0]):
        inputs, grads = _window_inputs_and_grads(model, ids[i : i + 1], layers)
        for (n, _m), g in zip(layers, grads):
            t = (g[0].double() * (inputs[n][0].double() @ delta[n].T)).sum(0)
            ref[n] += (t + t * t / 2).abs()
    cfg = MixLLMConfig(salience_delta="gptq", progress=False)
    sal = cfg._salience(model, layers, ids, "", PhaseTimer())
    rtn = calibrate(model, ids, layers, hessian=False, salience=True, progress=False).salience
    for n, _ in layers:
        np.testing.assert_allclose(sal[n], ref[n].numpy(), rtol=1e-4, atol=1e-12)
        assert not np.allclose(sal[n], rtn[n], rtol=1e-2)  # not the round-to-nearest salience
    # the default pipeline allocates from it: the same model as with that salience passed in
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    MixLLMConfig(bits=4.4, salience_delta="gptq", progress=False).apply(a, ids)
    MixLLMConfig(bits=4.4, progress=False).apply(b, ids, salience={n: ref[n].numpy() for n, _ in layers})
    with torch.no_grad():
        assert torch.equal(a(ids[:1]).logits, b(ids[:1]).logits)
    with pytest.raises(ValueError, match="salience_delta"):
        MixLLMConfig(salience_delta="gpt")
    cal = calibrate(model, ids, layers, progress=False)
    with pytest.raises(ValueError, match="salience_delta"):
        MixLLMConfig(bits=4.4, salience_delta="gptq", progress=False).apply(copy.deepcopy(model), cal)


def test_apply_with_given_salience_equals_calibration_salience(rng):
    """apply(salience=...) allocates from the given values, as a Calibration holding them does."""
    model = _tiny_llama()
    layers = target_linears(model)
    sal = {n: rng.gamma(0.5, size=m.out_features) for n, m in layers}
    cfg = MixLLMConfig(bits=4.8, gptq=False, clip=False, progress=False)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    rep_a = cfg.apply(a, None, salience=sal)
    rep_b = cfg.apply(b, Calibration(names=[n for n, _ in layers], salience=sal))
    rows = allocate(layers, sal, 0.2)
    assert sum(len(r) for r in rows.values()) > 0
    for n, _ in layers:
        qa = a.get_submodule(n)
        assert torch.equal(qa.perm, b.get_submodule(n).perm)
        n8 = qa.qweight8.shape[0]
        assert n8 == len(rows[n]) and sorted(qa.perm[:n8].tolist()) == rows[n].tolist()
    assert rep_a["avg_bits"] == rep_b["avg_bits"]
    bad = dict(sal)
    bad[layers[0][0]] = np.full(layers[0][1].out_features, np.nan)
    with pytest.raises(ValueError, match="salience"):
        cfg.apply(copy.deepcopy(model), None, salience=bad)
    with pytest.raises(ValueError, match="no entry"):
        cfg.apply(copy.deepcopy(model), None, salience={layers[0][0]: sal[layers[0][0]]})


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_global_floor_matches_reference(rng, fraction):
    """Every layer's fraction / 2 most salient rows, then the global greedy ranking of the other rows
    for the rest of the budget (float64 reference)."""
    layers = _layers(SHAPES)
    sal = {n: rng.gamma(0.5, size=m.out_features) * (30 if "layers.0." in n else 1) for n, m in layers}
    got = allocate(layers, sal, fraction, "global_floor")
    floor = {n: set(np.argsort(-sal[n], kind="stable")[: int(fraction / 2 * m.out_features)]) for n, m in layers}
    budget = fraction * sum(m.in_features * m.out_features for _, m in layers)
    used = sum(len(floor[n]) * m.in_features for n, m in layers)
    items = sorted(
        (-float(sal[n][c]), n, c, m.in_features) for n, m in layers for c in range(m.out_features) if c not in floor[n]
    )
    ref = {n: set(floor[n]) for n, _ in layers}
    for _, n, c, k in items:
        if used + k > budget:
            break
        used += k
        ref[n].add(c)
    assert {n: v.tolist() for n, v in got.items()} == {n: sorted(v) for n, v in ref.items()}
    # the floor holds where the global ranking alone leaves a layer without 8-bit rows
    glob = allocate(layers, sal, fraction, "global")
    for n, m in layers:
        assert len(got[n]) >= int(fraction / 2 * m.out_features)
    assert any(len(glob[n]) < int(fraction / 2 * m.out_features) for n, m in layers)


def test_rescale_to_gains_keeps_the_order_inside_a_layer(rng):
    """Each layer sums to its gain (zero where the gain is not positive); the ranking inside stays."""
    from mixllm.methods.mixllm import rescale_to_gains

    layers = _layers(SHAPES)
    sal = {n: rng.gamma(0.5, size=m.out_features) for n, m in layers}
    sal[layers[3][0]] = np.zeros(layers[3][1].out_features)  # a layer of zero salience: spread evenly
    gains = {layers[0][0]: 0.3, layers[1][0]: -0.1, layers[2][0]: 0.0, layers[3][0]: 0.2}
    out = rescale_to_gains(layers, sal, gains)
    for n, _ in layers:
        assert out[n].sum() == pytest.approx(max(gains[n], 0.0), rel=1e-12, abs=1e-15)
    assert np.array_equal(np.argsort(-out[layers[0][0]], kind="stable"), np.argsort(-sal[layers[0][0]], kind="stable"))
    assert np.all(out[layers[1][0]] == 0) and np.all(out[layers[2][0]] == 0)
    assert np.allclose(out[layers[3][0]], 0.2 / layers[3][1].out_features)


def _nll(model, ids):
    # float64 reference of the mean next-token NLL over windows
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    return float(-torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).mean())


def test_measured_selection_matches_an_independent_measurement():
    """selection="measured": the reported gain of a layer is NLL(all 4-bit) - NLL(that layer 8-bit) on
    the last gain_windows windows, built independently; the rows are the per-bit knapsack of the
    salience (of the other windows) rescaled to those gains."""
    from mixllm.methods.mixllm import rescale_to_gains
    from mixllm.modules import set_module
    from mixllm.nn import MixedLinear

    model = _tiny_llama(seed=3)
    ids = torch.randint(0, 61, (6, 24), generator=torch.Generator().manual_seed(5))
    cfg = MixLLMConfig(bits=4.4, selection="measured", gain_windows=2, gptq=False, clip=False, progress=False)
    q = copy.deepcopy(model)
    rep = cfg.apply(q, ids)
    layers = target_linears(model)
    four = copy.deepcopy(model)
    MixLLMConfig(bits=4, gptq=False, clip=False, progress=False).apply(four, None)
    nll4 = _nll(four, ids[-2:])
    gains = {}
    for name, m in layers:
        one = copy.deepcopy(four)
        set_module(one, name, MixedLinear.from_linear(m, np.arange(m.out_features), 128))
        gains[name] = nll4 - _nll(one, ids[-2:])
        assert rep["layers"][name]["gain"] == pytest.approx(gains[name], rel=1e-4, abs=1e-7)
    assert any(g > 0 for g in gains.values())
    sal = calibrate(model, ids[:-2], layers, hessian=False, salience=True, progress=False).salience
    rows = allocate(layers, rescale_to_gains(layers, sal, gains), 0.1, "per_bit")
    for name, _ in layers:
        assert rep["layers"][name]["n8"] == len(rows[name])
        n8 = len(rows[name])
        assert sorted(q.get_submodule(name).perm[:n8].tolist()) == rows[name].tolist()
    assert 4.0 < rep["avg_bits"] <= 4.4 + 1e-9
    # conditional gains: with one layer already 8-bit (skipped), every other layer's gain is measured
    # against that state, as a direct NLL difference
    from mixllm.methods.mixllm import measure_layer_gains

    first = layers[0][0]
    state = {first: np.arange(layers[0][1].out_features)}
    mods = dict(layers)
    cond = measure_layer_gains(
        copy.deepcopy(four),
        layers,
        lambda n, r: MixedLinear.from_linear(mods[n], r, 128),
        ids[-2:],
        rows8=state,
        skip={first},
    )
    assert first not in cond and len(cond) == len(layers) - 1
    base = copy.deepcopy(four)
    set_module(base, first, MixedLinear.from_linear(mods[first], state[first], 128))
    nll_state = _nll(base, ids[-2:])
    for name, m in layers[1:4]:
        one = copy.deepcopy(base)
        set_module(one, name, MixedLinear.from_linear(m, np.arange(m.out_features), 128))
        assert cond[name] == pytest.approx(nll_state - _nll(one, ids[-2:]), rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="gain_windows"):
        cfg.apply(copy.deepcopy(model), ids[:2])
    with pytest.raises(ValueError, match="gain_windows"):
        cfg.apply(copy.deepcopy(model), None)


def _kl64(ref_logits, model, ids):
    # float64 reference: mean over positions of KL(softmax(ref) || model), summed over the vocabulary
    with torch.no_grad():
        logq = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
    logp = torch.log_softmax(ref_logits[:, :-1].double(), -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def test_kl_gains_match_an_independent_float64_measurement():
    """gain_metric="kl": a layer's gain is KL(float || all 4-bit) - KL(float || that layer 8-bit) on the
    held-out windows, computed here in float64 from the float model's logits (the library keeps the
    float log-probabilities in bfloat16: 1% tolerance)."""
    from mixllm.methods.mixllm import measure_layer_gains
    from mixllm.modules import set_module
    from mixllm.nn import MixedLinear

    model = _tiny_llama(seed=11)
    with torch.no_grad():  # a peaked next-token distribution (the random model's is nearly uniform), so
        model.lm_head.weight.mul_(30)  # that the gains stand well above float32 rounding
    ids = torch.randint(0, 61, (7, 300), generator=torch.Generator().manual_seed(12))  # 299 positions: 256 + a tail
    layers = target_linears(model)
    mods = dict(layers)
    with torch.no_grad():
        ref = model(input_ids=ids[-3:]).logits
    four = copy.deepcopy(model)
    MixLLMConfig(bits=4, gptq=False, clip=False, progress=False).apply(four, None)
    kl4 = _kl64(ref, four, ids[-3:])
    assert kl4 > 0
    got = measure_layer_gains(
        copy.deepcopy(model), layers, lambda n, r: MixedLinear.from_linear(mods[n], r, 128), ids[-3:], metric="kl"
    )
    assert set(got) == {n for n, _ in layers}
    for name, m in layers:
        one = copy.deepcopy(four)
        set_module(one, name, MixedLinear.from_linear(m, np.arange(m.out_features), 128))
        want = kl4 - _kl64(ref, one, ids[-3:])
        assert got[name] == pytest.approx(want, rel=1e-2, abs=1e-3 * kl4)
    # through the config: the report's gains are the same measurement on the last gain_windows windows
    cfg = MixLLMConfig(bits=4.4, selection="measured", gain_metric="kl", gain_windows=3, gptq=False, clip=False)
    cfg.progress = False
    q = copy.deepcopy(model)
    rep = cfg.apply(q, ids)
    for name, _ in layers:
        assert rep["layers"][name]["gain"] == pytest.approx(got[name], rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="gain_metric"):
        MixLLMConfig(selection="measured", gain_metric="ppl")
    with pytest.raises(ValueError, match="metric"):
        measure_layer_gains(copy.deepcopy(model), layers, None, ids, metric="loss")
    for bad in ([ref[0]], [r[:-2] for r in ref]):  # too few windows; windows of the wrong length
        with pytest.raises(ValueError, match="reference: expected 3 windows"):
            measure_layer_gains(
                copy.deepcopy(model),
                layers,
                lambda n, r: MixedLinear.from_linear(mods[n], r, 128),
                ids[-3:],
                metric="kl",
                reference=bad,
            )
