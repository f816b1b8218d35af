"""The scalable MixLLM pipeline: salience without weight gradients, GPTQ in PyTorch against the C GPTQ,
the one Hessian accumulator, block-by-block quantization with resume after a kill, GPU memory bound."""

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mixllm import ops
from mixllm.calib import _rtn_dequant_torch, rtn_delta
from mixllm.gptq import gptq, gptq_torch
from mixllm.hessian import HessianAccumulator

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _hessian(rng, K, n=256, dead=()):
    X = rng.standard_normal((n, K)) @ (np.eye(K) + 0.3 * rng.standard_normal((K, K)) / np.sqrt(K))
    X[:, list(dead)] = 0
    return 2 * X.T @ X / n


# ----------------------------------------------------------------------------- salience
def _salience_ref(x, g, delta):
    t = ((g.T.double() @ x.double()) * delta.double()).sum(1)  # G = g^T x, t_c = G_c . delta_c
    return (t + t * t / 2).abs()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_salience_io_equals_weight_gradient_definition(rng, device):
    S, K, N = 37, 72, 29  # odd sizes
    acc_io = torch.zeros(N, dtype=torch.float64, device=device)
    acc_g = torch.zeros(N, dtype=torch.float64)
    ref = torch.zeros(N, dtype=torch.float64)
    delta = torch.from_numpy(rng.standard_normal((K, N)).astype(np.float32)).T  # non-contiguous [N, K]
    for _ in range(3):
        x = torch.from_numpy(rng.standard_normal((S, K)).astype(np.float32))
        g = torch.from_numpy(rng.standard_normal((N, S)).astype(np.float32)).T  # non-contiguous [S, N]
        ops.salience_accumulate_io(acc_io, x.to(device), g.to(device), delta.to(device))
        ops.salience_accumulate(acc_g, (g.T @ x).contiguous(), delta.contiguous())  # the C op on G
        ref += _salience_ref(x, g, delta)
    np.testing.assert_allclose(acc_io.cpu().numpy(), ref.numpy(), rtol=1e-4)
    np.testing.assert_allclose(acc_g.numpy(), ref.numpy(), rtol=1e-4)
    with pytest.raises(ValueError, match="acc"):
        ops.salience_accumulate_io(acc_io.float(), x.to(device), g.to(device), delta.to(device))
    with pytest.raises(ValueError, match="shapes"):
        ops.salience_accumulate_io(acc_io, x[:, :-1].to(device), g.to(device), delta.to(device))
    with pytest.raises(TypeError, match="x"):
        ops.salience_accumulate_io(acc_io, x.numpy(), g, delta)


@cuda
def test_rtn_delta_cuda_equals_c(rng):
    for K, g in ((300, 128), (256, 128), (100, 128)):
        W = torch.from_numpy((rng.standard_normal((9, K)) ** 3).astype(np.float32))
        assert torch.equal(rtn_delta(W.cuda(), 4, g).cpu(), rtn_delta(W, 4, g))


def test_rtn_dequant_torch_equals_c_on_host(rng):
    for K, g in ((300, 128), (64, 16), (100, 128)):
        W = torch.from_numpy((rng.standard_normal((5, K)) ** 3).astype(np.float32))
        assert torch.equal(_rtn_dequant_torch(W, 4, g) - W, rtn_delta(W, 4, g))


# ----------------------------------------------------------------------------- Hessians
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_hessian_accumulator_matches_float64(rng, device):
    K = 45
    acc = HessianAccumulator(K, keep_p=0.5, generator=torch.Generator().manual_seed(1))
    xs = [rng.standard_normal((b, 3, K)).astype(np.float32) for b in (2, 5)]
    for x in xs:
        acc.add(torch.from_numpy(x).to(device).transpose(0, 1))  # non-contiguous
    X = np.concatenate([x.transpose(1, 0, 2).reshape(-1, K) for x in xs]).astype(np.float64)
    H = acc.hessian("cpu").numpy()
    np.testing.assert_allclose(H, 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)
    assert acc.n == 21 and 0 < acc.sample_rows().shape[0] < 21
    with pytest.raises(ValueError, match="x"):
        acc.add(torch.zeros(2, K + 1, device=device))
    with pytest.raises(ValueError, match="K"):
        HessianAccumulator(0)


# ----------------------------------------------------------------------------- GPTQ
CASES = [  # N, K, g, bits, symmetric, group_order, clip_grid, dead inputs
    (6, 160, 64, 4, False, True, 20, ()),  # groups straddle the 128-column blocks
    (5, 150, 64, 8, True, True, 20, (5,)),  # short last group, reordered into the middle; a dead input
    (4, 96, 32, 3, False, True, 5, ()),
    (5, 130, 32, 4, False, False, 0, (0, 129)),
    (3, 40, 128, 2, False, True, 20, ()),  # group wider than K
]


@pytest.mark.parametrize("N,K,g,bits,sym,go,grid,dead", CASES)
def test_gptq_torch_float64_equals_c(rng, N, K, g, bits, sym, go, grid, dead):
    """The same codes, scales and zero points as csrc/gptq.c on the same Hessian."""
    H = _hessian(rng, K, dead=dead)
    w = (rng.standard_normal((N, K)) ** 3).astype(np.float32)
    q, s, z = ops.gptq_quantize(w, H, bits, g, symmetric=sym, group_order=go, clip=grid > 0, clip_grid=max(grid, 1))
    c, s2, z2 = gptq_torch(torch.from_numpy(w), torch.from_numpy(H), bits, g, sym, 0.01, go, grid)
    np.testing.assert_array_equal(c.numpy(), q.astype(np.int16))
    np.testing.assert_array_equal(s2.numpy(), s)
    if not sym:
        np.testing.assert_array_equal(z2.numpy(), z)
    # no Hessian: round-to-nearest plus the clip search
    q, s, z = ops.gptq_quantize(w, None, bits, g, symmetric=sym, clip=grid > 0, clip_grid=max(grid, 1))
    c, s2, _ = gptq_torch(torch.from_numpy(w), None, bits, g, sym, 0.01, go, grid)
    np.testing.assert_array_equal(c.numpy(), q.astype(np.int16))


def test_gptq_torch_per_row_formats_equal_separate_runs(rng):
    """4-bit asymmetric and 8-bit symmetric rows in one pass = each row set quantized on its own."""
    N, K, g = 11, 96, 32
    H = _hessian(rng, K)
    w = torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32))
    rows8 = torch.tensor([1, 4, 5, 10])
    bits = torch.full((N,), 4)
    bits[rows8] = 8
    c, s, z = gptq_torch(w, torch.from_numpy(H), bits, g)
    r4 = torch.tensor([i for i in range(N) if i not in rows8.tolist()])
    q4, s4, z4 = ops.gptq_quantize(w[r4].contiguous(), H, 4, g)
    q8, s8, _ = ops.gptq_quantize(w[rows8].contiguous(), H, 8, g)
    assert torch.equal(c[r4], q4.to(torch.int16)) and torch.equal(s[r4], s4) and torch.equal(z[r4], z4)
    assert torch.equal(c[rows8], q8.to(torch.int16)) and torch.equal(s[rows8], s8)
    assert int(z[rows8].max()) == 0


def test_gptq_dispatch_and_errors(rng):
    w = torch.from_numpy(rng.standard_normal((4, 64)).astype(np.float32))
    H = torch.from_numpy(_hessian(rng, 64))
    a = gptq(w, H, 4, 32, impl="c")
    b = gptq(w, H, 4, 32, impl="torch")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="impl"):
        gptq(w, H, impl="gpu")
    with pytest.raises(ValueError, match="bits"):
        gptq_torch(w, H, torch.full((3,), 4))
    with pytest.raises(ValueError, match="H"):
        gptq_torch(w, H[:5, :5])
    with pytest.raises(ValueError, match="w"):
        gptq_torch(w.clone().fill_(float("nan")), H)


@cuda
def test_gptq_cuda_agrees_with_c(rng):
    """float64 on the GPU: the C codes up to summation-order ties; float32: nearly all codes."""
    N, K, g = 64, 512, 128
    H = _hessian(rng, K, n=1024)
    w = (rng.standard_normal((N, K))).astype(np.float32)
    q, s, z = ops.gptq_quantize(w, H, 4, g)
    c64, _, _ = gptq_torch(torch.from_numpy(w).cuda(), torch.from_numpy(H).cuda(), 4, g)
    c32, _, _ = gptq_torch(torch.from_numpy(w).cuda(), torch.from_numpy(H).cuda(), 4, g, dtype=torch.float32)
    same64 = (c64.cpu().numpy() == q).mean()
    same32 = (c32.cpu().numpy() == q).mean()
    print(f"identical codes: float64 {same64:.6f}, float32 {same32:.6f}")
    assert same64 > 0.9999 and same32 > 0.98


# ----------------------------------------------------------------------------- block-by-block pipeline
_TINY = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=3, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(1))
"""


def _tiny():
    ns = {}
    exec(_TINY, ns)
    return ns["tiny"], ns["ids"]


def _cfg(cache_dir, **kw):
    from mixllm.methods.mixllm import MixLLMConfig

    return MixLLMConfig(bits=4.4, group_size=32, progress=False, cache_dir=cache_dir, **kw)


def test_blockwise_resume_after_kill_gives_the_same_model(tmp_path):
    """A run killed (SIGKILL) right after its second block reached the cache resumes from there and
    gives the model of an uninterrupted run; the killed run leaves no partial file behind."""
    from mixllm.pipeline import PhaseTimer

    tiny, ids = _tiny()
    cache = tmp_path / "cache"
    script = _TINY + textwrap.dedent(f"""
        import os, signal
        from mixllm import cache as C
        from mixllm.methods.mixllm import MixLLMConfig
        orig = C.DiskCache.write
        def write(self, fname, t):
            orig(self, fname, t)
            if fname == "block_00001.safetensors":
                os.kill(os.getpid(), signal.SIGKILL)
        C.DiskCache.write = write
        MixLLMConfig(bits=4.4, group_size=32, progress=False, cache_dir={str(cache)!r}).apply(tiny(), ids)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    files = sorted(p.name for d in cache.iterdir() for p in d.iterdir())
    assert files == ["block_00000.safetensors", "block_00001.safetensors", "salience.safetensors"]
    resumed, timer = tiny(), PhaseTimer()
    _cfg(str(cache)).apply(resumed, ids, timer=timer)
    assert "salience" not in timer.total  # read from the cache
    assert [("gptq" in b) for b in timer.blocks] == [False, False, True]  # blocks 0 and 1 restored
    ref = tiny()
    _cfg(None).apply(ref, ids)
    x = ids[:1, :16]
    with torch.no_grad():
        assert torch.equal(resumed(x).logits, ref(x).logits)
    from mixllm.nn import MixedLinear

    assert all(isinstance(m, MixedLinear) for n, m in resumed.named_modules() if n.endswith("_proj"))


def test_blockwise_cache_key_tracks_settings_and_budget(tmp_path):
    tiny, ids = _tiny()
    a = tiny()
    rep = _cfg(str(tmp_path)).apply(a, ids)
    assert abs(rep["avg_bits"] - 4.4) < 0.05
    _cfg(str(tmp_path), fraction=0.2, damp=0.02).apply(tiny(), ids)  # other settings: a new entry, same salience
    dirs = sorted(sorted(p.name for p in d.iterdir()) for d in tmp_path.iterdir())
    assert dirs.count(["salience.safetensors"]) == 1 and len(dirs) == 3
    # one-pass mode (sequential=False) and the block-by-block mode both quantize every target layer
    b = tiny()
    _cfg(None, sequential=False).apply(b, ids)
    from mixllm.nn import MixedLinear

    assert all(isinstance(m, MixedLinear) for n, m in b.named_modules() if n.endswith("_proj"))


@pytest.mark.parametrize(
    "first,second",
    [
        ({}, {"salience_kind": "fisher"}),
        ({}, {"salience_delta": "gptq"}),
        ({"salience_delta": "gptq"}, {"given": True}),
    ],
)
def test_blockwise_cache_key_tracks_the_allocation(tmp_path, first, second):
    """Two runs sharing a cache_dir whose 8-bit rows differ only through the salience (its estimator,
    its delta, or a salience passed in) must not restore each other's blocks: the second gives the
    model of an uncached run with its own settings."""
    tiny, ids = _tiny()
    _cfg(str(tmp_path), **first).apply(tiny(), ids)
    second = dict(second)
    given = None
    if second.pop("given", False):
        from mixllm.calib import target_linears

        layers = target_linears(tiny())
        rng = np.random.default_rng(5)
        given = {n: rng.random(m.out_features) for n, m in layers}
    cached, ref = tiny(), tiny()
    _cfg(str(tmp_path), **second).apply(cached, ids, salience=given)
    _cfg(None, **second).apply(ref, ids, salience=given)
    from mixllm.nn import MixedLinear

    n8 = {n: (m.n8, m.perm.tolist()) for n, m in cached.named_modules() if isinstance(m, MixedLinear)}
    n8_ref = {n: (m.n8, m.perm.tolist()) for n, m in ref.named_modules() if isinstance(m, MixedLinear)}
    assert n8 == n8_ref
    x = ids[:1, :16]
    with torch.no_grad():
        assert torch.equal(cached(x).logits, ref(x).logits)


@cuda
def test_offloaded_blockwise_peak_gpu_memory_is_one_block(tmp_path):
    """Default real model kept on the host, one block at a time on the GPU: the peak GPU memory of the
    block-by-block pass stays near one block + its Hessians + the calibration hidden states."""
    from _e2e import calib_ids, model_and_tokenizer

    from mixllm.methods.mixllm import MixLLMConfig

    model, _ = model_and_tokenizer()
    ids = calib_ids(4, 128)
    blk = model.model.layers[0]
    block_bytes = sum(p.numel() * p.element_size() for p in blk.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    K = [blk.mlp.down_proj.in_features, blk.self_attn.q_proj.in_features]
    hess_bytes = 8 * (K[0] ** 2 + 3 * K[1] ** 2)
    hidden_bytes = ids.numel() * model.config.hidden_size * 4
    from mixllm.pipeline import PhaseTimer

    torch.cuda.reset_peak_memory_stats()
    timer = PhaseTimer()  # peaks per block (it resets the peak statistics at block edges)
    MixLLMConfig(bits=4.4, device="cuda", offload=True, progress=False).apply(model, ids, timer=timer)
    peak = timer.peak_gpu_gb() * 1e9
    assert len(timer.blocks) == model.config.num_hidden_layers
    # nothing of the model left on the GPU; cuBLAS / cuBLASLt keep their workspaces (32 MiB each on Hopper)
    # in PyTorch's allocator until cleared: they are not ours
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    left = torch.cuda.memory_allocated()
    if left >= hidden_bytes + (8 << 20):
        import gc

        on_gpu = [tuple(t.shape) for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.is_cuda]
        raise AssertionError(f"{left / 2**20:.1f} MiB left on the GPU; live CUDA tensors: {on_gpu[:20]}")
    bound = 2 * block_bytes + hess_bytes + 3 * hidden_bytes + (64 << 20)
    print(f"peak GPU {peak / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB; model {model_bytes / 2**20:.1f} MiB")
    assert peak < bound and peak < model_bytes / 2
    assert next(model.parameters()).device.type == "cpu"
