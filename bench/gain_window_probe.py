"""Issue 15 probe: do the measured layer gains depend on the window length or on the text?

On Gemma-3 the gains measured on held-out calibration windows (2048 tokens, Wikipedia articles 0-49)
and on the evaluation text (512-token windows, Wikipedia articles 50 on) rank the layers only loosely
alike (Spearman 0.39-0.45; docs/method.md "Re-measured gains, and a ceiling"), and Gemma-3 attends
512 tokens back in five of its six layers. This measures the gains with round-to-nearest parts (no
calibration pass needed) on (a) the held-out calibration tokens as 2048-token windows, (b) the same
tokens as 512-token windows, (c) the Wikipedia evaluation text's first tokens as 512-token windows, and
prints the rank correlations: (a) vs (b) isolates the window length, (b) vs (c) the text.

  python3 bench/gain_window_probe.py --model gemma3-270m --device cuda --out probe.json

The JSON is rewritten after each measurement.
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import e2e  # noqa: E402  (texts, atomic JSON)
from layer_oracle import _spearman  # noqa: E402

from mixllm import data  # noqa: E402
from mixllm.calib import target_linears  # noqa: E402
from mixllm.methods.mixllm import measure_layer_gains  # noqa: E402
from mixllm.nn import MixedLinear  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=data.DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--texts", default="wiki")
    p.add_argument("--texts-json", default=None)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per measurement")
    p.add_argument("--long", type=int, default=2048)
    p.add_argument("--short", type=int, default=512)
    p.add_argument("--blocks", default=None, help="comma list of block indices to measure (default: all)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.tokens % args.long or args.long % args.short:
        p.error("--tokens must be a multiple of --long, --long of --short")
    dev = torch.device(args.device)
    model, tok = data.load_model(args.model)
    model.to(dev).eval()
    calib_text, eval_texts = e2e._texts(args)
    hold = data.calibration_samples(tok, args.tokens // args.long, args.long, seed=1000, text=calib_text)
    wiki = tok(eval_texts["wiki"], return_tensors="pt").input_ids[0][: args.tokens]
    sets = {
        "calib_long": hold,
        "calib_short": hold.reshape(-1, args.short),
        "wiki_short": wiki.reshape(-1, args.short),
    }
    layers = target_linears(model)
    if args.blocks:  # a subset, for a CPU: the layers of these blocks (names "...layers.<i>.<...>")
        want = {f"layers.{int(b)}." for b in args.blocks.split(",")}
        layers = [(n, m) for n, m in layers if any(w in n + "." for w in want)]
        if not layers:
            p.error(f"--blocks {args.blocks}: no target layer in these blocks")
    mods = dict(layers)
    res = {"model": args.model, "machine": e2e._machine(dev), "date": time.strftime("%Y-%m-%d"), "gains": {}}
    res.update(tokens=args.tokens, long=args.long, short=args.short, parts="round to nearest, group 128")
    res.update(blocks=args.blocks or "all", layers=len(layers))
    out = pathlib.Path(args.out)

    cache = {}  # (name, 8-bit rows): only "none" and "all" are asked for, so build each once

    def part(name, rows8):
        key = (name, len(rows8))
        if key not in cache:
            cache[key] = MixedLinear.from_linear(mods[name], np.asarray(rows8, np.int64), 128)
        return cache[key]

    for key, ids in sets.items():
        t0 = time.time()
        g = measure_layer_gains(model, layers, part, ids)
        res["gains"][key] = g
        res[key + "_seconds"] = round(time.time() - t0, 1)
        names = [n for n, _ in layers]
        done = list(res["gains"])
        res["spearman"] = {
            f"{a} vs {b}": _spearman([res["gains"][a][n] for n in names], [res["gains"][b][n] for n in names])
            for i, a in enumerate(done)
            for b in done[i + 1 :]
        }
        e2e._write_json(out, res)
        print(f"{key}: {res[key + '_seconds']} s, sum {sum(g.values()):.4f}; {json.dumps(res['spearman'])}", flush=True)


if __name__ == "__main__":
    main()
