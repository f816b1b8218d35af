"""How long MixLLM takes on real LLM sizes, on one GPU (issue 10).

Models are built from the Llama-3-8B and Llama-3-70B configurations (typed below) with RANDOM weights:
quantization time and memory do not depend on the weight values (accuracy is measured on real models
elsewhere). Calibration tokens are random ids. W4.4A8, GPTQ with group reordering and the clipping search,
global salience, ``MixLLMConfig`` defaults otherwise.

  8B:  the whole model in bf16 on the GPU, all blocks, end to end (salience pass, block-by-block pass).
  70B: ``--layers L`` blocks; the salience pass with the model on the GPU (measured at L and L/2 blocks:
       the difference gives the cost per block), then the block-by-block pass with the model on the host
       and one block at a time on the GPU (``offload=True``); extrapolated to 80 blocks.

  python bench/quantize_scale.py --model 8b [--layers 32] [--n-calib 128] [--seq-len 2048]
  python bench/quantize_scale.py --model 70b --layers 4
  python bench/quantize_scale.py --model default   # the default real model: GPU vs CPU pipeline
  python bench/quantize_scale.py --model 70b --split-gpus 2 --n-calib 16   # salience pass, model over 2 GPUs

``--split-gpus G`` builds the whole model (all blocks) directly on G GPUs, contiguous runs of blocks per
GPU, dispatched with accelerate's ``dispatch_model`` (a ``device_map``: each block runs on the GPU that
holds it, activations move between GPUs), and times the salience pass only (forward + backward per
sequence, ``t = (g * (x @ delta^T)).sum(0)`` accumulated on each layer's own GPU); the total for 128
sequences is extrapolated linearly from the time per sequence after the first (the first pays one-off
CUDA set-up).

``--model default`` quantizes the default real model (SmolLM2-135M, float32) with the same config twice,
on the host (C GPTQ) and on the GPU (PyTorch GPTQ), and evaluates both quantized models on the host
(same kernels): perplexity on the default text and the agreement of the 8-bit row sets.

Writes ``$OUT/quantize_scale_<model>.json`` (or ``--out``): times per phase in total and per block, peak
GPU memory (in total and of the block-by-block pass), peak host memory (max RSS), device and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_shapes import LLAMA3  # noqa: E402

CONFIGS = LLAMA3  # bench/llama_shapes.py: typed-in Llama-3 configs, random weights


def build(name: str, layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(CONFIGS[name], num_hidden_layers=layers)
    cfg = LlamaConfig(**kw)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval(), cfg


def build_split(name: str, layers: int, devices):
    """The model with its blocks spread over ``devices`` (contiguous runs), each part constructed on its
    device (never whole on one), and accelerate's hooks that move activations between them."""
    from accelerate import dispatch_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    cfg = LlamaConfig(**dict(CONFIGS[name], num_hidden_layers=layers))
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        per = -(-layers // len(devices))
        dmap = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
        with torch.device(devices[0]):
            model.model.embed_tokens = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
        for i in range(layers):
            d = devices[i // per]
            with torch.device(d):
                model.model.layers[i] = LlamaDecoderLayer(cfg, i)
            dmap[f"model.layers.{i}"] = d
        with torch.device(devices[-1]):
            model.model.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
            model.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        dmap["model.norm"] = dmap["lm_head"] = devices[-1]
    finally:
        torch.set_default_dtype(old)
    return dispatch_model(model.eval(), device_map=dmap), cfg, dmap


def split_salience(a, res):
    """The salience pass of the whole model split over ``a.split_gpus`` GPUs (see the module docstring)."""
    from mixllm.calib import target_linears
    from mixllm.methods.mixllm import MixLLMConfig
    from mixllm.pipeline import PhaseTimer

    G = a.split_gpus
    if torch.cuda.device_count() < G:
        raise SystemExit(f"--split-gpus {G}: only {torch.cuda.device_count()} GPUs visible")
    devices = [f"cuda:{i}" for i in range(G)]
    L = a.layers or CONFIGS[a.model]["num_hidden_layers"]
    t0 = time.perf_counter()
    model, cfg, dmap = build_split(a.model, L, devices)
    res["build_s"] = time.perf_counter() - t0
    res["gpus"] = [torch.cuda.get_device_name(i) for i in range(G)]
    res["blocks_per_gpu"] = [
        sum(1 for k, v in dmap.items() if k.startswith("model.layers.") and v == d) for d in devices
    ]
    res["weights_gb_per_gpu"] = [torch.cuda.memory_allocated(i) / 1e9 for i in range(G)]
    layers = target_linears(model)
    ids = torch.randint(0, cfg.vocab_size, (a.n_calib, a.seq_len), generator=torch.Generator().manual_seed(0))
    c = MixLLMConfig(bits=4.4, progress=not a.quiet, cache_dir=None)
    per_seq = []
    for i in range(a.n_calib):  # one sequence at a time: the time per sequence, and a check of the result
        for d in range(G):
            torch.cuda.synchronize(d)
        t = PhaseTimer()
        t1 = time.perf_counter()
        sal = c._salience(model, layers, ids[i : i + 1], "", t)
        for d in range(G):
            torch.cuda.synchronize(d)
        per_seq.append(time.perf_counter() - t1)
        print(f"sequence {i}: {per_seq[-1]:.2f} s", flush=True)
    import numpy as np

    finite = all(np.isfinite(v).all() for v in sal.values())
    by_dev = {}
    for _, m in layers:
        by_dev[str(m.weight.device)] = by_dev.get(str(m.weight.device), 0) + 1
    steady = per_seq[1:] or per_seq
    res.update(
        layers_run=L,
        n_calib_run=a.n_calib,
        seq_len=a.seq_len,
        per_sequence_s=per_seq,
        salience_s_per_sequence=sum(steady) / len(steady),
        salience_s_extrapolated_128=sum(steady) / len(steady) * 128,
        salience_finite=bool(finite),
        linears_per_gpu=by_dev,
        peak_gpu_gb_per_gpu=[torch.cuda.max_memory_allocated(i) / 1e9 for i in range(G)],
        peak_host_rss_gb=host_peak_gb(),
    )


def host_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(model, ids, offload: bool, progress: bool):
    from mixllm.methods.mixllm import MixLLMConfig
    from mixllm.pipeline import PhaseTimer

    timer = PhaseTimer()
    cfg = MixLLMConfig(
        bits=4.4,
        n_calib=ids.shape[0],
        seq_len=ids.shape[1],
        device="cuda",
        offload=offload,
        progress=progress,
        cache_dir=None,
    )
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rep = cfg.apply(model, ids, timer=timer)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, rep, timer


def compare_default(a, res):
    """GPU vs CPU pipeline on the default real model (see the module docstring)."""
    from mixllm import data
    from mixllm.eval import perplexity
    from mixllm.methods.mixllm import MixLLMConfig
    from mixllm.nn import MixedLinear
    from mixllm.pipeline import PhaseTimer

    torch.set_num_threads(os.cpu_count())
    base, tok = data.load_model()
    ids = data.calibration_samples(tok, a.n_calib, a.seq_len, 0)
    ev = tok(data.evaluation_text(), return_tensors="pt").input_ids[0][:16384]
    res.update(
        model="SmolLM2-135M-Instruct (default real model), float32",
        n_calib=a.n_calib,
        seq_len=a.seq_len,
        eval_tokens=int(ev.numel()),
    )
    res["fp32_ppl"] = perplexity(base, ev, 512, progress=False)
    models = {}
    import copy

    for dev in ("cpu", "cuda"):
        m = copy.deepcopy(base)
        t = PhaseTimer()
        t0 = time.perf_counter()
        MixLLMConfig(bits=4.4, n_calib=a.n_calib, seq_len=a.seq_len, device=dev, progress=False, cache_dir=None).apply(
            m, ids, timer=t
        )
        res[f"{dev}_pipeline_s"] = time.perf_counter() - t0
        res[f"{dev}_phases_s"] = dict(t.total)
        m.to("cpu")
        res[f"{dev}_ppl"] = perplexity(m, ev, 512, progress=False)
        models[dev] = m
        print(dev, res[f"{dev}_pipeline_s"], res[f"{dev}_ppl"], flush=True)
    same = tot = 0
    for (na, a8), (nb, b8) in zip(
        ((n, x) for n, x in models["cpu"].named_modules() if isinstance(x, MixedLinear)),
        ((n, x) for n, x in models["cuda"].named_modules() if isinstance(x, MixedLinear)),
    ):
        if na != nb:
            raise RuntimeError(f"layer lists differ: {na} vs {nb}")
        ra, rb = set(a8.perm[: a8.n8].tolist()), set(b8.perm[: b8.n8].tolist())
        same += len(ra & rb)
        tot += max(len(ra), len(rb))
    res["rows8_agreement"] = same / max(tot, 1)
    res["ppl_rel_diff"] = abs(res["cuda_ppl"] - res["cpu_ppl"]) / res["cpu_ppl"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(CONFIGS) + ["default"], default="8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--split-gpus", type=int, default=0, help="salience pass only, the model split over G GPUs")
    a = ap.parse_args()
    if a.split_gpus:
        res = {
            "model": f"Llama-3-{a.model.upper()}-shaped, random bf16 weights, split over {a.split_gpus} GPUs",
            "what": "salience pass only (MixLLM W4.4A8 salience, RTN 4-bit delta), accelerate dispatch_model",
            "torch": torch.__version__,
            "host_cpus": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        }
        split_salience(a, res)
        print(json.dumps(res, indent=1), flush=True)
        out = a.out or os.path.join(os.environ.get("OUT", "."), f"quantize_scale_{a.model}_split{a.split_gpus}.json")
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        return
    if a.model == "default":
        res = {
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "host_cpus": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        }
        compare_default(a, res)
        print(json.dumps(res, indent=1), flush=True)
        with open(a.out or os.path.join(os.environ.get("OUT", "."), "quantize_scale_default.json"), "w") as f:
            json.dump(res, f, indent=1)
        return
    L = a.layers or CONFIGS[a.model]["num_hidden_layers"]
    L_full = CONFIGS[a.model]["num_hidden_layers"]
    ids = torch.randint(
        0, CONFIGS[a.model]["vocab_size"], (a.n_calib, a.seq_len), generator=torch.Generator().manual_seed(0)
    )
    res = {
        "model": f"Llama-3-{a.model.upper()}-shaped, random bf16 weights",
        "config": CONFIGS[a.model],
        "layers_run": L,
        "n_calib": a.n_calib,
        "seq_len": a.seq_len,
        "budget": "W4.4A8, GPTQ + clip, global",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "host_cpus": os.cpu_count(),
    }
    print(json.dumps({k: v for k, v in res.items() if k != "config"}), flush=True)

    if a.model == "8b":
        model, cfg = build(a.model, L, "cuda")
        res["bf16_model_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        torch.cuda.reset_peak_memory_stats()
        wall, rep, timer = run(model, ids, offload=False, progress=not a.quiet)
        res["total_s"] = wall
        res["peak_gpu_gb"] = timer.peak_gpu_gb()
        res["extrapolated_total_s"] = wall if L == L_full else None
    else:
        # salience pass cost per block: two model depths on the GPU
        sal = {}
        for depth in [max(1, L // 2)] if L > 1 else []:
            model, cfg = build(a.model, depth, "cuda")
            from mixllm.methods.mixllm import MixLLMConfig
            from mixllm.pipeline import PhaseTimer

            c = MixLLMConfig(bits=4.4, device="cuda", progress=not a.quiet, cache_dir=None)
            t = PhaseTimer()
            from mixllm.calib import target_linears

            c._salience(model, target_linears(model), ids, "", t)
            sal[depth] = t.total["salience"]
            del model
            torch.cuda.empty_cache()
        # then the model on the GPU for the salience pass (depth L), moved to the host for the block-by-block
        # pass: one block at a time on the GPU
        model, cfg = build(a.model, L, "cuda")
        res["bf16_block_gb"] = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()) / 1e9
        torch.cuda.reset_peak_memory_stats()
        wall, rep, timer = run(model, ids, offload=True, progress=not a.quiet)
        sal[L] = timer.total["salience"]
        depths = sorted(sal)
        per_block_sal = (sal[depths[-1]] - sal[depths[0]]) / max(depths[-1] - depths[0], 1)
        res["salience_s_by_depth"] = sal
        res["salience_s_per_block"] = per_block_sal
        res["total_s"] = wall
        res["peak_gpu_gb"] = timer.peak_gpu_gb()
        res["pass2_peak_gpu_gb_per_block"] = [b.get("peak_gpu_gb") for b in timer.blocks]
        blk = [sum(v for k, v in b.items() if k != "peak_gpu_gb") for b in timer.blocks]
        steady = blk[1:] if len(blk) > 1 else blk
        per_block_pass2 = sum(steady) / len(steady)
        fixed_sal = sal[depths[0]] - per_block_sal * depths[0]  # embedding, head, loss
        res["pass2_s_per_block"] = per_block_pass2
        res["extrapolated_total_s"] = fixed_sal + per_block_sal * L_full + per_block_pass2 * L_full
    res["phases_s"] = dict(timer.total)
    res["blocks"] = [dict(b) for b in timer.blocks]
    res["pass2_peak_gpu_gb"] = max((b.get("peak_gpu_gb", 0) for b in timer.blocks), default=None)
    res["peak_host_rss_gb"] = host_peak_gb()
    res["avg_bits"] = rep["avg_bits"]
    if res.get("extrapolated_total_s"):
        res["extrapolated_total_min"] = res["extrapolated_total_s"] / 60
    print(json.dumps({k: v for k, v in res.items() if k not in ("config", "blocks")}, indent=1), flush=True)
    out = a.out or os.path.join(os.environ.get("OUT", "."), f"quantize_scale_{a.model}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
