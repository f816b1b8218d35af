"""Side-by-side weight-only results: RTN, GPTQ, SliM-LLM, CMPQ (and MixLLM weight-only) on the default
real model (SmolLM2-135M-Instruct, mixllm.data) — perplexity on the held-out Wikipedia split and size.

One configuration (the rerunnable command of a table row):
    python bench/sister_methods.py --method slim --bits 2
Several in one process (calibration statistics collected once and shared, same numbers):
    python bench/sister_methods.py --sweep rtn:2,3,4 gptq:2,3,4 slim:2,3,4 cmpq:2,2.5,3,3.5,4
Render the table from the JSON lines:
    python bench/sister_methods.py --table

Every run appends one JSON line to bench/results/sister_methods.jsonl. Defaults: 16 calibration
sequences of 512 tokens (seed 0) from the calibration split, 4096 evaluation tokens in windows of 512.
GPTQ and SliM-LLM calibrate sequentially (block by block on the quantized prefix, as the GPTQ paper);
CMPQ uses one pass of the full-precision model (its statistics are shared by a sweep); RTN needs none.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sister_methods.jsonl"
TABLE = HERE / "results" / "sister_methods.md"


def make_config(method: str, bits: float, group_size: int):
    from mixllm.methods.baselines import GPTQConfig, RTNConfig
    from mixllm.methods.cmpq import CMPQConfig
    from mixllm.methods.slim import SliMConfig

    if method == "rtn":
        return RTNConfig(bits=int(bits), group_size=group_size)
    if method == "gptq":
        return GPTQConfig(bits=int(bits), group_size=group_size)
    if method == "slim":
        return SliMConfig(bits=int(bits), group_size=group_size)
    if method == "cmpq":
        return CMPQConfig(bits=float(bits))
    if method == "mixllm":
        from mixllm.methods.mixllm import MixLLMConfig

        return MixLLMConfig(bits=float(bits), weight_only=True, group_size=group_size)
    raise ValueError(f"unknown method {method!r}")


def fp16_bytes_of_rest(model, quantized_names):
    """Bytes of everything not quantized, at 16 bits (tied embeddings counted once)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        if mod in quantized_names or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * 2
    return total


def run_one(base, tok, method, bits, args, stats=None, calib_ids=None):
    from mixllm import data
    from mixllm.eval import perplexity
    from mixllm.methods import quantize
    from mixllm.nn import MixedLinear
    from mixllm.nn_weight_only import WeightOnlyLinear

    model = copy.deepcopy(base)
    t0 = time.time()
    if method == "fp16":
        report = {"avg_bits": 16.0}
        qnames = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
        qbytes = None
    else:
        cfg = make_config(method, bits, args.group_size)
        if method == "mixllm":
            report = quantize(model, cfg, calib_ids)
        else:
            report = cfg.apply(model, stats if stats is not None else calib_ids)
        qnames = {n for n, m in model.named_modules() if isinstance(m, (WeightOnlyLinear, MixedLinear))}
        qbytes = report.get("quantized_bytes")
        if qbytes is None:  # MixLLM: packed codes + fp16 scales of its parts
            qbytes = int(report.get("quantized_linear_bytes", 0)) or None
    tq = time.time() - t0
    t0 = time.time()
    ppl = perplexity(
        model, data.evaluation_text(), seq_len=args.seq_len, tokenizer=tok, max_tokens=args.eval_tokens, progress=False
    )
    te = time.time() - t0
    lin_params = sum(
        m.in_features * m.out_features
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    )
    rest = fp16_bytes_of_rest(model, qnames)
    row = dict(
        method=method,
        bits=bits,
        ppl=round(ppl, 3),
        avg_bits=round(float(report.get("avg_bits", 16)), 4),
        linear_MB=round((qbytes if qbytes else lin_params * 2) / 1e6, 3),
        model_MB=round(((qbytes if qbytes else lin_params * 2) + rest) / 1e6, 3),
        quant_s=round(tq, 1),
        eval_s=round(te, 1),
        n_calib=args.n_calib,
        seq_len=args.seq_len,
        eval_tokens=args.eval_tokens,
        group_size=args.group_size,
        calibration=report.get("calibration", "none" if method in ("fp16", "rtn") else "one-pass"),
        command=f"python bench/sister_methods.py --method {method} --bits {bits}",
    )
    print(json.dumps(row), flush=True)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def render_table():
    rows = {}
    for line in open(RESULTS):
        r = json.loads(line)
        rows[(r["method"], float(r["bits"]))] = r  # the latest run of a configuration wins
    order = {"fp16": 0, "rtn": 1, "gptq": 2, "slim": 3, "cmpq": 4, "mixllm": 5}
    names = {
        "fp16": "fp32 model (16-bit size)",
        "rtn": "RTN",
        "gptq": "GPTQ",
        "slim": "SliM-LLM",
        "cmpq": "CMPQ",
        "mixllm": "MixLLM weight-only",
    }
    any_r = next(iter(rows.values()))
    out = [
        "# Weight-only methods side by side (SmolLM2-135M-Instruct)",
        "",
        f"Perplexity on the held-out Wikipedia split ({any_r['eval_tokens']} tokens, windows of "
        f"{any_r['seq_len']}); calibration {any_r['n_calib']} x {any_r['seq_len']} tokens (seed 0); "
        f"group size {any_r['group_size']} for RTN/GPTQ/SliM-LLM. `bits`: the budget; `avg bits`: code "
        "bits per quantized weight achieved; sizes include scales/offsets/codebooks/outliers (fp16) and "
        "the unquantized embeddings and norms at 16 bits.",
        "",
        "`calibration`: sequential (block by block on the quantized prefix, GPTQ paper) or one pass of the "
        "full-precision model.",
        "",
        "| method | bits | avg bits | ppl | linear MB | model MB | calibration | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (m, b), r in sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        how = r.get("calibration", "none" if m in ("fp16", "rtn") else "one-pass")
        out.append(
            f"| {names.get(m, m)} | {b:g} | {r['avg_bits']:.3f} | {r['ppl']:.2f} | {r['linear_MB']:.2f} | "
            f"{r['model_MB']:.2f} | {how} | `{r['command']}` |"
        )
    TABLE.write_text("\n".join(out) + "\n")
    print("\n".join(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["fp16", "rtn", "gptq", "slim", "cmpq", "mixllm"])
    ap.add_argument("--bits", type=float, default=2)
    ap.add_argument("--sweep", nargs="*", help="method:bits,bits ... (shares the calibration pass)")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument(
        "--stats-cache",
        default="",
        help="pickle file to keep / reuse the calibration statistics "
        "(they depend only on the model and the calibration settings)",
    )
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    if args.table:
        return render_table()
    torch.set_num_threads(args.threads)
    from mixllm import data
    from mixllm.methods.baselines import collect_stats

    base, tok = data.load_model()
    base.eval()
    calib_ids = data.calibration_samples(tok, args.n_calib, args.seq_len, 0)
    jobs = []
    if args.sweep:
        for spec in args.sweep:
            m, _, bl = spec.partition(":")
            jobs += [(m, float(b) if "." in b else int(b)) for b in (bl.split(",") if bl else ["16"])]
        jobs = [(m, 16 if m == "fp16" else b) for m, b in jobs]
    elif args.method:
        b = args.bits
        jobs = [(args.method, 16 if args.method == "fp16" else (int(b) if float(b).is_integer() else b))]
    else:
        ap.error("give --method, --sweep or --table")
    stats = None
    if any(m == "cmpq" for m, _ in jobs):
        t0 = time.time()
        cache = pathlib.Path(args.stats_cache) if args.stats_cache else None
        if cache is not None and cache.exists():
            import pickle

            stats = pickle.loads(cache.read_bytes())
        else:
            stats = collect_stats(base, calib_ids, keep_tokens=1024, seed=0)
            if cache is not None:
                import pickle

                tmp = cache.with_suffix(".tmp")
                tmp.write_bytes(pickle.dumps(stats, protocol=4))
                os.replace(tmp, cache)
        print(f"calibration statistics: {time.time() - t0:.1f}s", flush=True)
    for m, b in jobs:
        run_one(base, tok, m, b, args, stats=stats if m == "cmpq" else None, calib_ids=calib_ids)


if __name__ == "__main__":
    sys.exit(main())
