"""Issue 15 diagnostic: how much of W4A8's loss can 8-bit weights buy back, layer by layer, and does
MixLLM's salience put the budget where the measured gains are?

One-pass GPTQ + clip parts (Hessians from the float model, every layer quantized at 4 and at 8 bits
once, as ``bench/e2e.py``'s ``op_*`` rows), so only the 8-bit choice differs between rows:

  1. per layer L, the *measured gain* of L in 8-bit with every other layer in 4-bit: the drop of the
     mean token NLL on held-out calibration windows (``--n-holdout`` windows of the calibration
     articles drawn with another seed; the evaluation texts are never used to choose anything);
  2. against it, the salience's prediction: the sum of L's row saliences (MixLLM's ``|t + t^2/2|``);
  3. allocations at 10% and 20% of the weights, evaluated on both texts (per-window NLLs kept):
     MixLLM global (the default), per-bit, per layer, the *layer oracle* (whole layers, greedy by
     measured gain per weight: a choice a row-level salience could at best refine), and *calibrated
     global* (``MixLLMConfig(selection="measured")``'s allocation: rows ranked by salience within a
     layer, each layer's salience rescaled so that its sum equals the layer's measured gain
     (``rescale_to_gains``), then a greedy knapsack per weight);
  4. the salience taken at the quantized point (``salience_kind="restore"``: the pass runs every layer
     at ``W + delta`` and scores the predicted loss drop of restoring each row, signed), with the RTN
     delta (what the default pipeline can afford at any size) and with the one-pass GPTQ + clip parts'
     own delta: its rank correlation with the measured gains, and its allocations (global, per-bit),
     in one pass and, with ``--seq``, in the default block-by-block pipeline.

  python3 bench/layer_oracle.py --model gemma3-270m --device cuda --out layer_oracle_gemma3-270m.json

``--oracle-eval`` adds a ceiling that is not a method (it looks at the evaluation texts): the calibrated
allocation with each layer's gain measured on one evaluation text's own windows, evaluated on that text
(in sample) and on the other; if even it misses a goal, no choice of 8-bit rows from these gains meets it.

``--kl-gains`` also measures every layer's gain as the drop of the mean KL divergence from the float
model's next-token distributions on the same held-out windows (``gain_metric="kl"``: the whole
vocabulary at every position instead of the one token that came next) and adds its calibrated
allocation, ``calibrated_kl``.

``--refreshes R`` adds a whole-layer greedy that re-measures the gains of the layers not yet taken R - 1
times per budget (a forward pass of the held-out windows per remaining layer each time), and the same
for the calibrated allocation (``calibrated_remeasured``: each layer's remaining gain measured again
given the rows taken so far, its remaining rows rescaled to it).

The JSON is rewritten after every step; ``--resume`` keeps the steps already in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import e2e  # noqa: E402  (window_nll, texts, fp32 reference check, atomic JSON)

from mixllm import data, ops  # noqa: E402
from mixllm.calib import calibrate, target_linears  # noqa: E402
from mixllm.methods.mixllm import (  # noqa: E402
    MixLLMConfig,
    _mean_token_nll,
    allocate,
    float_log_probs,
    measure_layer_gains,
    rescale_to_gains,
)
from mixllm.modules import set_module  # noqa: E402
from mixllm.nn import MixedLinear  # noqa: E402

QKEY = (128, True, True, 0.01)  # MixLLMConfig's one-pass memo key (group, gptq, clip, damp): the defaults


def _module(layer, name, rows8, cal):
    q4 = cal.quant_cache[("q", 4, name) + QKEY]
    q8 = cal.quant_cache[("q", 8, name) + QKEY]
    return MixedLinear.from_linear(layer, np.asarray(rows8, np.int64), 128, q4=q4, q8=q8)


def _build(base, layers, cal, rows8):
    model = copy.deepcopy(base)
    for name, m in layers:
        set_module(model, name, _module(m, name, rows8[name], cal))
    return model


def _avg_bits(layers, rows8):
    """Weight bits per weight of an allocation (8-bit rows ``rows8``, the rest 4-bit; scales not counted)."""
    w8 = sum(len(rows8[n]) * m.in_features for n, m in layers)
    return 4 + 4 * w8 / sum(m.out_features * m.in_features for _, m in layers)


def layer_oracle_rows(layers, gains, fraction):
    """Whole layers, greedy by measured gain per weight, while they fit ``fraction`` of all weights."""
    return remeasured_layer_rows(None, layers, None, None, gains, fraction, refreshes=1)[0]


def remeasured_layer_rows(model, layers, part, ids, gains, fraction, refreshes, progress=False):
    """Whole layers, greedy by gain per weight as :func:`layer_oracle_rows`, but the gains of the layers
    not yet taken are measured again (given the layers taken so far in 8-bit) each time another
    ``1 / refreshes`` of the budget is spent: the interactions the single-layer gains miss. ``model``
    holds the parts (``part(name, rows)``); returns the rows and the gains of each refresh."""
    cost = {n: m.in_features * m.out_features for n, m in layers}
    width = {n: m.out_features for n, m in layers}
    budget = fraction * sum(cost.values())
    rows8 = {n: np.zeros(0, np.int64) for n, _ in layers}
    taken, used, history = set(), 0, [dict(gains)]
    for r in range(refreshes):
        if r:
            gains = measure_layer_gains(model, layers, part, ids, progress, rows8=rows8, skip=taken)
            history.append(gains)
        share = budget * (r + 1) / refreshes
        for n in sorted(gains, key=lambda n: -gains[n] / cost[n]):
            if gains[n] <= 0:
                break
            if used + cost[n] <= share:
                rows8[n] = np.arange(width[n], dtype=np.int64)
                taken.add(n)
                used += cost[n]
    return rows8, history


def remeasured_calibrated_rows(model, layers, part, ids, salience, gains, fraction, refreshes, progress=False):
    """The calibrated allocation (rows ranked by salience inside a layer, each layer's remaining rows
    rescaled to its measured remaining gain, a greedy knapsack per weight) spent ``1 / refreshes`` of the
    budget at a time; before each further share every layer not yet wholly 8-bit is measured again: the
    drop of the held-out NLL from the current allocation to that layer wholly in 8-bit. Returns the rows
    and the gains of each refresh."""
    cost = {n: m.in_features for n, m in layers}
    total = sum(m.in_features * m.out_features for _, m in layers)
    budget = fraction * total
    taken = {n: np.zeros(m.out_features, bool) for n, m in layers}
    used, history = 0, [dict(gains)]
    for r in range(refreshes):
        if r:
            full = {n for n, t in taken.items() if t.all()}
            rows8 = {n: np.flatnonzero(t) for n, t in taken.items()}
            gains = measure_layer_gains(model, layers, part, ids, progress, rows8=rows8, skip=full)
            history.append(gains)
        rest = {n: np.where(taken[n], 0.0, np.asarray(salience[n], np.float64)) for n in gains}
        scaled = rescale_to_gains([(n, m) for n, m in layers if n in gains], rest, gains)
        # as allocate(..., "per_bit"): a stable order by value per weight, taken while it fits
        cand = [(n, i, v / cost[n]) for n, a in scaled.items() for i, v in enumerate(a) if not taken[n][i]]
        share = budget * (r + 1) / refreshes
        for n, i, _ in sorted(cand, key=lambda c: -c[2]):
            if used + cost[n] > share:
                break
            taken[n][i] = True
            used += cost[n]
    return {n: np.flatnonzero(t).astype(np.int64) for n, t in taken.items()}, history


COMPARE = [  # (challenger, baseline): per-window NLL of the challenger minus the baseline's
    ("restore_rtn_global_w4.4a8", "global_w4.4a8"),
    ("restore_rtn_per_bit_w4.4a8", "global_w4.4a8"),
    ("restore_gptq_global_w4.4a8", "global_w4.4a8"),
    ("restore_gptq_per_bit_w4.4a8", "global_w4.4a8"),
    ("restore_rtn_per_bit_w4.4a8", "calibrated_w4.4a8"),
    ("restore_gptq_per_bit_w4.4a8", "calibrated_w4.4a8"),
    ("restore_rtn_per_bit_w4.8a8", "global_w4.8a8"),
    ("restore_gptq_per_bit_w4.8a8", "global_w4.8a8"),
    ("seq_restore_global_w4.4a8", "seq_global_w4.4a8"),
    ("seq_restore_per_bit_w4.4a8", "seq_global_w4.4a8"),
    ("seq_restore_global_w4.8a8", "seq_global_w4.8a8"),
    ("seq_restore_per_bit_w4.8a8", "seq_global_w4.8a8"),
    ("calibrated_w4.4a8", "global_w4.4a8"),
    ("calibrated_w4.4a8", "per_layer_w4.4a8"),
    ("calibrated_w4.4a8", "layer_oracle_w4.4a8"),
    ("calibrated_kl_w4.4a8", "calibrated_w4.4a8"),
    ("calibrated_kl_w4.8a8", "calibrated_w4.8a8"),
    ("calibrated_kl_w4.4a8", "global_w4.4a8"),
    ("calibrated_kl_w4.4a8", "per_layer_w4.4a8"),
    ("layer_remeasured_w4.4a8", "layer_oracle_w4.4a8"),
    ("layer_remeasured_w4.8a8", "layer_oracle_w4.8a8"),
    ("layer_remeasured_w4.4a8", "calibrated_w4.4a8"),
    ("calibrated_remeasured_w4.4a8", "calibrated_w4.4a8"),
    ("calibrated_remeasured_w4.8a8", "calibrated_w4.8a8"),
    ("global_w4.4a8", "per_layer_w4.4a8"),
    ("per_bit_w4.4a8", "global_w4.4a8"),
    ("calibrated_w4.8a8", "global_w4.8a8"),
    ("seq_calibrated_w4.4a8", "seq_global_w4.4a8"),
    ("seq_calibrated_w4.8a8", "seq_global_w4.8a8"),
]


def _spearman(a, b):
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def run(args):
    t_start = time.time()
    device = torch.device(args.device)
    base, tok = data.load_model(args.model)
    base.to(device)
    calib_text, eval_texts = e2e._texts(args)
    eval_ids = {t: tok(s, return_tensors="pt").input_ids[0][: args.eval_tokens] for t, s in eval_texts.items()}
    calib_ids = data.calibration_samples(tok, args.n_calib, args.seq_len, seed=args.calib_seed, text=calib_text)
    hold_ids = data.calibration_samples(tok, args.n_holdout, args.seq_len, seed=1000 + args.calib_seed, text=calib_text)
    n_cal_tok = tok(calib_text, return_tensors="pt").input_ids.numel()
    out = pathlib.Path(args.out)
    res = json.loads(out.read_text()) if args.resume and out.exists() else {}
    res.update(
        model=args.model,
        n_calib=args.n_calib,
        seq_len=args.seq_len,
        n_holdout=args.n_holdout,
        calib_seed=args.calib_seed,
        calibration_text_tokens=n_cal_tok,
        eval_tokens={t: int(v.numel()) for t, v in eval_ids.items()},
        eval_seq_len=args.eval_seq_len,
        machine=e2e._machine(device),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    res.setdefault("rows", {})
    if args.fp32_ref:
        e2e._fp32_reference(base, eval_ids, args, device)

    def save():
        e2e._write_json(args.out, res)

    def evaluate(model, key, extra):
        if key in res["rows"]:
            return
        t0 = time.time()
        row = {**extra, "windows": {}, "ppl": {}}
        for t, ids in eval_ids.items():
            w = e2e.window_nll(model, ids, args.eval_seq_len, device)
            row["windows"][t] = w
            row["ppl"][t] = math.exp(sum(a for a, _ in w) / sum(b for _, b in w))
        row["holdout_nll"] = _mean_token_nll(model, hold_ids)
        res["rows"][key] = row
        save()
        print(
            f"{key}: {json.dumps({t: round(p, 3) for t, p in row['ppl'].items()})} holdout NLL "
            f"{row['holdout_nll']:.4f} ({time.time() - t0:.1f} s, {time.time() - t_start:.0f} s so far)",
            flush=True,
        )

    layers = target_linears(base)
    names = [n for n, _ in layers]
    ts = time.time()
    cal = calibrate(base, calib_ids, layers, hessian=True, salience=True, progress=False)
    for b in (4, 8):
        MixLLMConfig(bits=b, progress=False).apply(copy.deepcopy(base), cal)
    res["calibrate_and_gptq_seconds"] = round(time.time() - ts, 1)
    part = lambda n, r: _module(dict(layers)[n], n, r, cal)  # noqa: E731  (a layer at rows r in 8-bit)
    print(f"calibration + GPTQ at 4 and 8 bits: {res['calibrate_and_gptq_seconds']} s", flush=True)
    salience = {n: np.asarray(cal.salience[n], np.float64) for n in names}
    res["salience_sum"] = {n: float(salience[n].sum()) for n in names}
    res["shape"] = {n: [m.out_features, m.in_features] for n, m in layers}

    evaluate(base, "fp32", {"avg_bits": 32})
    none = {n: np.zeros(0, np.int64) for n in names}
    every = {n: np.arange(m.out_features, dtype=np.int64) for n, m in layers}
    m4 = _build(base, layers, cal, none)
    evaluate(m4, "w4a8", {"avg_bits": 4})
    m8 = _build(base, layers, cal, every)
    evaluate(m8, "w8a8_gptq", {"avg_bits": 8})
    del m8

    # 1. measured gain of each layer in 8-bit, the rest in 4-bit (same held-out windows: paired)
    nll4 = res["rows"]["w4a8"]["holdout_nll"]
    if args.gains_from:  # the gains of earlier runs (same model and parts), averaged per held-out window
        runs = [json.loads(pathlib.Path(f).read_text()) for f in args.gains_from]
        n = sum(r["n_holdout"] for r in runs)
        res["gain"] = {k: sum(r["gain"][k] * r["n_holdout"] for r in runs) / n for k in names}
        res["gains_from"] = {f: r["n_holdout"] for f, r in zip(args.gains_from, runs)}
    if "gain" not in res:  # the library's measurement (selection="measured"), on the held-out windows
        ts = time.time()
        res["gain"] = measure_layer_gains(m4, layers, part, hold_ids)
        res["gain_seconds"] = round(time.time() - ts, 1)
        save()
        print(f"  gains: {len(layers)} layers ({res['gain_seconds']} s)", flush=True)
    if args.kl_gains and "gain_kl" not in res:  # the same windows, KL from the float model (gain_metric="kl")
        ts = time.time()
        reference = float_log_probs(base, hold_ids)
        res["gain_kl"] = measure_layer_gains(m4, layers, part, hold_ids, metric="kl", reference=reference)
        del reference
        res["gain_kl_seconds"] = round(time.time() - ts, 1)
        save()
        print(f"  KL gains: {len(layers)} layers ({res['gain_kl_seconds']} s)", flush=True)
    gains = res["gain"]
    if not (args.refreshes or args.oracle_eval):
        del m4
    g = np.array([gains[n] for n in names])
    s = np.array([res["salience_sum"][n] for n in names])
    res["gain_summary"] = {
        "sum_of_gains": float(g.sum()),
        "w4_minus_w8_holdout": nll4 - res["rows"]["w8a8_gptq"]["holdout_nll"],
        "spearman_gain_vs_salience_sum": _spearman(g, s),
        "spearman_gain_per_weight_vs_salience_per_weight": _spearman(
            g / np.array([np.prod(res["shape"][n]) for n in names]),
            s / np.array([np.prod(res["shape"][n]) for n in names]),
        ),
    }
    if "gain_kl" in res:
        gk = np.array([res["gain_kl"][n] for n in names])
        res["gain_summary"]["sum_of_kl_gains"] = float(gk.sum())
        res["gain_summary"]["spearman_kl_gain_vs_gain"] = _spearman(gk, g)
        res["gain_summary"]["negative_gains"] = int((g < 0).sum())
        res["gain_summary"]["negative_kl_gains"] = int((gk < 0).sum())
    save()
    print("gain summary:", json.dumps(res["gain_summary"]), flush=True)

    # 2b. the salience at the quantized point, with the RTN delta and with the one-pass parts' delta
    def gptq_delta(name, mod):
        q, sc, z = cal.quant_cache[("q", 4, name) + QKEY]
        w = mod.weight.detach().float()
        return ops.dequantize_weight(q, sc, z, 128).to(w.device) - w

    restore = {}
    for tag, fn in () if args.no_restore else (("rtn", None), ("gptq", gptq_delta)):
        key = f"restore_{tag}_salience_sum"
        ts = time.time()
        rc = calibrate(
            base, calib_ids, layers, hessian=False, salience=True, progress=False, salience_kind="restore", delta_fn=fn
        )
        restore[tag] = {n: np.asarray(rc.salience[n], np.float64) for n in names}
        res[key] = {n: float(restore[tag][n].sum()) for n in names}
        r = np.array([res[key][n] for n in names])
        res["gain_summary"][f"spearman_gain_vs_restore_{tag}_sum"] = _spearman(g, r)
        res["gain_summary"][f"pearson_gain_vs_restore_{tag}_sum"] = float(np.corrcoef(g, r)[0, 1])
        res[f"restore_{tag}_seconds"] = round(time.time() - ts, 1)
        save()
        print(
            f"restore salience ({tag} delta, {res[f'restore_{tag}_seconds']} s): Spearman with the gains "
            f"{res['gain_summary'][f'spearman_gain_vs_restore_{tag}_sum']:.3f}, Pearson "
            f"{res['gain_summary'][f'pearson_gain_vs_restore_{tag}_sum']:.3f}",
            flush=True,
        )

    # 3. allocations
    for bits in (4.4, 4.8):
        frac = (bits - 4) / 4
        choices = {
            "global": allocate(layers, salience, frac, "global"),
            "per_bit": allocate(layers, salience, frac, "per_bit"),
            "per_layer": allocate(layers, salience, frac, "per_layer"),
            "layer_oracle": layer_oracle_rows(layers, gains, frac),
            "calibrated": allocate(layers, rescale_to_gains(layers, salience, gains), frac, "per_bit"),
        }
        if "gain_kl" in res:
            kl_sal = rescale_to_gains(layers, salience, res["gain_kl"])
            choices["calibrated_kl"] = allocate(layers, kl_sal, frac, "per_bit")
        for tag in restore:
            for sel in ("global", "per_bit"):
                choices[f"restore_{tag}_{sel}"] = allocate(layers, restore[tag], frac, sel)
        key = f"layer_remeasured_w{bits}a8"
        if args.refreshes and key not in res["rows"] and (not args.selections or "layer_remeasured" in args.selections):
            ts = time.time()
            choices["layer_remeasured"], hist = remeasured_layer_rows(
                m4, layers, part, hold_ids, gains, frac, args.refreshes
            )
            took = round(time.time() - ts, 1)
            res.setdefault("remeasured_gains", {})[str(bits)] = hist[1:]
            res.setdefault("remeasured_seconds", {})[str(bits)] = took
            print(f"  layer_remeasured at {bits} bits: {args.refreshes} refreshes ({took} s)", flush=True)
        key = f"calibrated_remeasured_w{bits}a8"
        if (
            args.refreshes
            and key not in res["rows"]
            and (not args.selections or "calibrated_remeasured" in args.selections)
        ):
            ts = time.time()
            choices["calibrated_remeasured"], hist = remeasured_calibrated_rows(
                m4,
                layers,
                part,
                hold_ids,
                salience,
                gains,
                frac,
                args.refreshes,
            )
            took = round(time.time() - ts, 1)
            res.setdefault("calibrated_remeasured_gains", {})[str(bits)] = hist[1:]
            res.setdefault("calibrated_remeasured_seconds", {})[str(bits)] = took
            print(f"  calibrated_remeasured at {bits} bits: {args.refreshes} refreshes ({took} s)", flush=True)
        for sel, rows8 in choices.items():
            if args.selections and sel not in args.selections.split(","):
                continue
            key = f"{sel}_w{bits}a8"
            if key in res["rows"]:
                continue
            model = _build(base, layers, cal, rows8)
            predicted = float(
                sum(gains[n] * len(rows8[n]) / m.out_features for n, m in layers)
            )  # additive, rows pro rata
            evaluate(
                model,
                key,
                {
                    "avg_bits": _avg_bits(layers, rows8),
                    "selection": sel,
                    "predicted_holdout_gain_pro_rata": predicted,
                    "rows8": {n: int(len(rows8[n])) for n in names},
                },
            )
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # 5. a ceiling, not a method: the calibrated allocation with gains measured on an evaluation text
    #    itself (its own windows), evaluated on it (in sample) and on the other text
    if args.oracle_eval:
        for t, ids in eval_ids.items():
            n_win = (ids.numel() // args.eval_seq_len) * args.eval_seq_len
            key = f"eval_gain_{t}"
            if key not in res:
                ts = time.time()
                res[key] = measure_layer_gains(m4, layers, part, ids[:n_win].view(-1, args.eval_seq_len))
                res[key + "_seconds"] = round(time.time() - ts, 1)
                save()
                print(f"  gains on the {t} text: {res[key + '_seconds']} s", flush=True)
            for bits in (4.4, 4.8):
                rows8 = allocate(layers, rescale_to_gains(layers, salience, res[key]), (bits - 4) / 4, "per_bit")
                model = _build(base, layers, cal, rows8)
                evaluate(model, f"eval_oracle_{t}_w{bits}a8", {"avg_bits": _avg_bits(layers, rows8), "selection": key})
                del model
    # 4. the default pipeline (block by block on the quantized prefix, as `mixllm quantize`), given
    #    the salience of step 1 (the default's own pass computes the same numbers) or its calibration
    if args.seq:
        cal_sal = rescale_to_gains(layers, salience, gains)
        seq_rows = [
            ("seq_w4a8", 4, "global", None),
            ("seq_global_w4.4a8", 4.4, "global", salience),
            ("seq_calibrated_w4.4a8", 4.4, "per_bit", cal_sal),
            ("seq_global_w4.8a8", 4.8, "global", salience),
            ("seq_calibrated_w4.8a8", 4.8, "per_bit", cal_sal),
            # the library computes this one itself: salience_kind="restore" with the RTN delta
            ("seq_restore_global_w4.4a8", 4.4, "global", "restore"),
            ("seq_restore_per_bit_w4.4a8", 4.4, "per_bit", "restore"),
            ("seq_restore_global_w4.8a8", 4.8, "global", "restore"),
            ("seq_restore_per_bit_w4.8a8", 4.8, "per_bit", "restore"),
        ]
        for key, bits, sel, given in seq_rows:
            if args.no_restore and given == "restore":
                continue
            if key in res["rows"]:
                continue
            kind = "restore" if given == "restore" else "taylor"
            given = None if given == "restore" else given
            cfg = MixLLMConfig(
                bits=bits,
                selection=sel,
                salience_kind=kind,
                n_calib=args.n_calib,
                seq_len=args.seq_len,
                device=str(device),
                progress=False,
            )
            model = copy.deepcopy(base)
            t0 = time.time()
            rep = cfg.apply(model, calib_ids, salience=given)
            model.to(device)
            evaluate(model, key, {"avg_bits": rep["avg_bits"], "quantize_seconds": round(time.time() - t0, 1)})
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    res["total_seconds"] = round(time.time() - t_start, 1)
    save()


def summary(paths):
    """Markdown: each row's perplexity increase over fp32 and its ratio to W4A8's (of the same pipeline),
    per text; the paired comparisons; where the measured gains and the salience lie per layer type."""
    for p in paths:
        r = json.loads(pathlib.Path(p).read_text())
        rows = r["rows"]
        texts = list(rows["fp32"]["ppl"])
        print(f"\n{r['model']} ({p}; {r['machine']}, {r['date']}; {r['n_calib']} x {r['seq_len']} calibration)")
        print("| row | avg bits | " + " | ".join(texts) + " | held-out NLL |")
        print("|---|---:|" + "---:|" * (len(texts) + 1))
        for k, v in rows.items():
            cells = []
            for t in texts:
                d = v["ppl"][t] - rows["fp32"]["ppl"][t]
                ref = "seq_w4a8" if k.startswith("seq_") and "seq_w4a8" in rows else "w4a8"  # same pipeline
                d4 = rows[ref]["ppl"][t] - rows["fp32"]["ppl"][t]
                cells.append(f"{v['ppl'][t]:.2f}" if k == "fp32" else f"{d:+.2f} ({d / d4:.2f})")
            print(f"| {k} | {v['avg_bits']:.2f} | " + " | ".join(cells) + f" | {v['holdout_nll']:.4f} |")
        for a, b in COMPARE:
            if a in rows and b in rows:
                cells = []
                for t in texts:
                    m, se, won, n = e2e._paired(rows[b]["windows"][t], rows[a]["windows"][t])
                    cells.append(f"{t} {m:+.4f} +- {se:.4f} ({won}/{n})")
                print(f"- {a} minus {b}: " + "; ".join(cells))
        if "gain_summary" in r:
            print("\n" + json.dumps(r["gain_summary"]))
            kl = r.get("gain_kl", {})
            types = {}
            for n, gv in r["gain"].items():
                t = n.rsplit(".", 1)[-1]
                a = types.setdefault(t, [0.0, 0.0, 0, 0.0])
                a[0] += gv
                a[1] += r["salience_sum"][n]
                a[2] += int(np.prod(r["shape"][n]))
                a[3] += kl.get(n, 0.0)
            tot = [sum(a[i] for a in types.values()) or 1.0 for i in range(4)]
            print("| layer type | share of measured gain | share of KL gain | share of salience | share of weights |")
            print("|---|---:|---:|---:|---:|")
            for t, a in types.items():
                kl_cell = f"{100 * a[3] / tot[3]:.1f}%" if kl else "-"
                print(
                    f"| {t} | {100 * a[0] / tot[0]:.1f}% | {kl_cell} | {100 * a[1] / tot[1]:.1f}% "
                    f"| {100 * a[2] / tot[2]:.1f}% |"
                )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=data.DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--texts", default="wiki,news")
    p.add_argument("--texts-json", default=None)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--n-holdout", type=int, default=8)
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--fp32-ref", default=None)
    p.add_argument("--write-fp32-ref", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seq", action="store_true", help="also the default pipeline's rows (block by block)")
    p.add_argument("--no-restore", action="store_true", help="skip the quantized-point salience (step 4)")
    p.add_argument(
        "--gains-from",
        nargs="+",
        help="JSON files of earlier runs: use their gains, averaged weighted by their held-out window counts",
    )
    p.add_argument(
        "--kl-gains",
        action="store_true",
        help="also the gains as drops of the KL divergence from the float model, and their allocation calibrated_kl",
    )
    p.add_argument("--selections", default=None, help="comma list: evaluate only these allocations of step 3")
    p.add_argument(
        "--refreshes",
        type=int,
        default=0,
        help="also the whole-layer greedy that re-measures the gains this many times per budget (0: off)",
    )
    p.add_argument(
        "--oracle-eval",
        action="store_true",
        help="a ceiling, not a method: the calibrated allocation with gains measured on each evaluation text",
    )
    p.add_argument("--summary", nargs="+", help="print the tables of these JSON files and exit")
    args = p.parse_args(argv)
    if args.summary:
        summary(args.summary)
        return
    if not args.out:
        p.error("--out: required")
    run(args)


if __name__ == "__main__":
    main()
