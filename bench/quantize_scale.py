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

CONFIGS = {  # from the published config.json files of meta-llama/Meta-Llama-3-8B and -70B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               num_hidden_layers=32, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                num_hidden_layers=80, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                rms_norm_eps=1e-5),
}


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


def host_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def run(model, ids, offload: bool, progress: bool):
    from mixllm.methods.mixllm import MixLLMConfig
    from mixllm.pipeline import PhaseTimer
    timer = PhaseTimer()
    cfg = MixLLMConfig(bits=4.4, n_calib=ids.shape[0], seq_len=ids.shape[1], device="cuda", offload=offload,
                       progress=progress, cache_dir=None)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rep = cfg.apply(model, ids, timer=timer)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, rep, timer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(CONFIGS), default="8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    L = a.layers or CONFIGS[a.model]["num_hidden_layers"]
    L_full = CONFIGS[a.model]["num_hidden_layers"]
    ids = torch.randint(0, CONFIGS[a.model]["vocab_size"], (a.n_calib, a.seq_len),
                        generator=torch.Generator().manual_seed(0))
    res = {"model": f"Llama-3-{a.model.upper()}-shaped, random bf16 weights", "config": CONFIGS[a.model],
           "layers_run": L, "n_calib": a.n_calib, "seq_len": a.seq_len, "budget": "W4.4A8, GPTQ + clip, global",
           "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
           "host_cpus": os.cpu_count()}
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
        for depth in sorted({max(1, L // 2), L}):
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
        depths = sorted(sal)
        per_block_sal = (sal[depths[-1]] - sal[depths[0]]) / max(depths[-1] - depths[0], 1)
        res["salience_s_by_depth"] = sal
        res["salience_s_per_block"] = per_block_sal
        # block-by-block pass: the model on the host, one block at a time on the GPU
        model, cfg = build(a.model, L, "cuda")
        res["bf16_block_gb"] = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()) / 1e9
        torch.cuda.reset_peak_memory_stats()
        wall, rep, timer = run(model, ids, offload=True, progress=not a.quiet)
        res["total_s"] = wall
        res["peak_gpu_gb"] = timer.peak_gpu_gb()
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
