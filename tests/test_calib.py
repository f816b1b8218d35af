"""The one calibration pass (mixllm.calib.collect) behind calibrate() and collect_stats(), on a small
random Llama: Hessians against a float64 reference, both entry points agreeing, kept rows, window
handling, and the model left as it was."""

import numpy as np
import pytest
import torch

from mixllm import calib as C
from mixllm.methods.baselines import collect_stats

pytest.importorskip("transformers")
from _models import tiny_llama  # noqa: E402  (needs transformers)


def layer_inputs(model, windows, names):
    """Every input row of the named layers over the windows (float64), from plain hooks."""
    rows = {n: [] for n in names}
    hs = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: rows[n].append(i[0].detach().reshape(-1, i[0].shape[-1]).double())
        )
        for n in names
    ]
    with torch.no_grad():
        for w in windows:
            model(w)
    for h in hs:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def test_hessians_rows_and_both_entry_points():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 64, (1, L), generator=gen) for L in (5, 17, 11)]  # lengths differ
    layers = C.target_linears(model)
    names = [n for n, _ in layers]
    X = layer_inputs(model, windows, names)
    acc, n_tokens = C.collect(model, windows, layers, keep_p=1.0)
    assert n_tokens == 33 and set(acc) == set(names)
    for n in names:
        ref = 2 * X[n].T @ X[n] / X[n].shape[0]
        H = acc[n].hessian("cpu")
        assert H.dtype == torch.float64 and acc[n].n == 33
        torch.testing.assert_close(H, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
        torch.testing.assert_close(acc[n].sample_rows().double(), X[n], rtol=0, atol=0)  # every row, in order

    # collect_stats (no sharing, own rows) and calibrate (shared Hessians) read the same pass
    stats = collect_stats(model, windows, filter_fn=lambda n, m: n in names, keep_tokens=10**6)
    ids = torch.cat([w[:, :5] for w in windows])  # calibrate takes [n, seq_len]
    cal = C.calibrate(model, ids, layers, salience=False, progress=False)
    again = C.collect(model, C.calibration_windows(ids), layers, share_inputs=True)[0]
    assert cal.n_tokens == 15 and cal.n_samples == 3
    for n in names:
        np.testing.assert_array_equal(stats[n].H, acc[n].hessian("cpu").numpy())
        np.testing.assert_array_equal(stats[n].X, X[n].float().numpy())
        assert torch.equal(cal.hessians[n], again[n].hessian("cpu"))
    q, k, v = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert cal.hessians[q] is cal.hessians[k] is cal.hessians[v]
    assert again[q] is again[v] and acc[q] is not acc[v]  # shared only when asked


def test_int32_ids_and_model_state_restored():
    """int32 token ids give the same Calibration as int64 (the loss needs int64 labels: they crashed
    with salience on); the model's mode and requires_grad flags are put back."""
    model = tiny_llama().train()
    model.lm_head.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    layers = C.target_linears(model)[:4]
    a = C.calibrate(model, ids, layers, progress=False)
    b = C.calibrate(model, ids.int(), layers, progress=False)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for n, _ in layers:
        assert torch.equal(a.hessians[n], b.hessians[n])
        np.testing.assert_array_equal(a.salience[n], b.salience[n])
        assert np.all(a.salience[n] > 0)


def test_unreached_layer_and_bad_windows():
    model = tiny_llama()
    stray = torch.nn.Linear(8, 3)  # not part of the forward pass
    layers = C.target_linears(model)[:2] + [("stray", stray)]
    acc, _ = C.collect(model, [torch.randint(0, 64, (1, 6))], layers)
    assert acc["stray"].n == 0 and torch.equal(acc["stray"].hessian("cpu"), torch.zeros(8, 8, dtype=torch.float64))
    assert C.collect(model, [torch.randint(0, 64, (1, 6))], layers, hessian=False) == ({}, 6)
    with pytest.raises(ValueError, match="calib"):
        C.calibration_windows(None)
    with pytest.raises(ValueError, match="calib"):
        C.calibration_windows([])
    with pytest.raises(TypeError, match="samples"):
        C.calibrate(model, [[1, 2, 3]])
    assert [w.tolist() for w in C.calibration_windows(torch.tensor([[1, 2], [3, 4]], dtype=torch.int32))] == [
        [[1, 2]],
        [[3, 4]],
    ]
