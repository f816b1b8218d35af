"""mixllm.fuse: sibling MixedLinear layers run as one (MixedLinear.concat / output_slice,
fuse_projections / unfuse_projections). On the CPU the fused layer computes every output row as the
separate layers do (the activations are quantized per token and group either way), so outputs are
compared bit for bit; the GPU counterpart is in tests/test_cuda.py."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _models import random_mixed_linear, tiny_llama  # noqa: E402

import mixllm  # noqa: E402
from mixllm.fuse import FusedProjection, SharedInputProjections, fuse_projections, unfuse_projections  # noqa: E402
from mixllm.nn import MixedLinear  # noqa: E402


def _quantize_blocks(model, frac=0.2, seed=0):
    """Every block linear as a MixedLinear with a random ``frac`` of its rows 8-bit (RTN)."""
    g = np.random.default_rng(seed)
    for mod in list(model.modules()):
        for child, lin in list(mod.named_children()):
            if isinstance(lin, torch.nn.Linear) and child != "lm_head":
                N = lin.out_features
                setattr(mod, child, MixedLinear.from_linear(lin, g.choice(N, int(frac * N), replace=False)))
    return model


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("K,g", [(300, 128), (256, 64), (96, 128)])
def test_concat_matches_separate_layers_and_slices_back(bias, K, g):
    layers = [
        random_mixed_linear(1, 37, K, 0.2, bias=bias, group_size=g),
        random_mixed_linear(2, 16, K, 0.0, bias=bias, group_size=g),
        random_mixed_linear(3, 9, K, 1.0, bias=bias, group_size=g),
    ]
    fused = MixedLinear.concat(layers)
    assert (fused.out_features, fused.n8) == (62, sum(m.n8 for m in layers))
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(4))[:, ::2]  # non-contiguous tokens
    y = fused(x)
    assert torch.equal(y, torch.cat([m(x) for m in layers], dim=-1))
    # the dequantized weight is the layers' weights stacked, and output_slice gives the layers back
    W = fused.dequantized_weight()
    assert torch.equal(W, torch.cat([m.dequantized_weight() for m in layers]))
    for m, (a, b) in zip(layers, [(0, 37), (37, 53), (53, 62)]):
        back = fused.output_slice(a, b)
        for name, t in m.state_dict().items():
            assert torch.equal(back.state_dict()[name], t), name


def test_concat_and_slice_errors():
    a, b = random_mixed_linear(0, 8, 128, 0.5, bias=False), random_mixed_linear(1, 8, 256, 0.5, bias=False)
    with pytest.raises(ValueError, match="in_features"):
        MixedLinear.concat([a, b])
    with pytest.raises(ValueError, match="group_size"):
        MixedLinear.concat([a, random_mixed_linear(1, 8, 128, 0.5, bias=False, group_size=64)])
    with pytest.raises(ValueError, match="has_bias"):
        MixedLinear.concat([a, random_mixed_linear(1, 8, 128, 0.5, bias=True)])
    with pytest.raises(TypeError, match="layers"):
        MixedLinear.concat([a, torch.nn.Linear(128, 8)])
    with pytest.raises(TypeError, match="layers"):
        MixedLinear.concat([])
    with pytest.raises(ValueError, match="start, stop"):
        a.output_slice(4, 4)
    with pytest.raises(ValueError, match="start, stop"):
        a.output_slice(0, 9)
    with pytest.raises(TypeError, match="start"):
        a.output_slice(0.5, 4)


def test_fused_model_is_bit_identical_and_generates_the_same_tokens():
    ref = _quantize_blocks(tiny_llama(seed=1, hidden_size=160, intermediate_size=200, head_dim=40))
    fused = _quantize_blocks(tiny_llama(seed=1, hidden_size=160, intermediate_size=200, head_dim=40))
    assert fuse_projections(fused) == 4  # q/k/v and gate/up in each of 2 blocks
    assert fuse_projections(fused) == 0  # already fused
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedProjection) and isinstance(
        attn.mixllm_fused_q_proj_k_proj_v_proj, SharedInputProjections
    )
    # the fused group's layer is counted once (a registered child of the parent only)
    # per block: q+k+v, gate+up, o, down
    assert sum(isinstance(m, MixedLinear) for m in fused.modules()) == 2 * 4
    assert sum(isinstance(m, MixedLinear) for m in ref.modules()) == 2 * 7
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, ref(ids).logits)
        kw = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
        assert torch.equal(fused.generate(ids, **kw), ref.generate(ids, **kw))
    # every input and output of the fused layer is released once all members took their slices
    assert all(g._pending is None for g in mixllm.fuse.fused_groups(fused))


def test_members_with_other_inputs_or_inputs_changed_in_place_recompute():
    layers = [random_mixed_linear(s, 24, 128, 0.25, bias=False) for s in range(3)]
    group = SharedInputProjections(MixedLinear.concat(layers), ("a", "b", "c"), [24, 24, 24])
    members = [FusedProjection(group, i) for i in range(3)]
    gen = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(3, 128, generator=gen), torch.randn(3, 128, generator=gen)
    # cross-attention-like: members read different tensors
    assert torch.equal(members[0](x), layers[0](x))
    assert torch.equal(members[1](x2), layers[1](x2))
    assert torch.equal(members[2](x), layers[2](x))
    # the same member twice with the same input (its slice was served): computed again, same result
    assert torch.equal(members[0](x), layers[0](x))
    assert torch.equal(members[0](x), layers[0](x))
    # in-place change of the input between members
    assert torch.equal(members[0](x), layers[0](x))
    x.mul_(2)
    assert torch.equal(members[1](x), layers[1](x))
    assert torch.equal(members[2](x), layers[2](x))


def test_unfuse_restores_the_layers_and_save_refuses_fused(tmp_path):
    model = _quantize_blocks(tiny_llama(seed=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_projections(model, groups=[("gate_proj", "up_proj")]) == 2
    assert isinstance(model.model.layers[0].self_attn.q_proj, MixedLinear)  # not in the groups given
    with pytest.raises(ValueError, match="fused projections"):
        mixllm.save(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert unfuse_projections(model) == 2
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    mixllm.save(model, tmp_path / "m")


def test_groups_that_cannot_share_a_layer_stay_separate():
    model = _quantize_blocks(tiny_llama(seed=3))
    blk = model.model.layers[0]
    blk.mlp.up_proj = random_mixed_linear(
        0, blk.mlp.up_proj.out_features, 64, 0.1, bias=False, group_size=32
    )  # another group size
    assert fuse_projections(model) == 3  # block 0's gate/up stays
    assert isinstance(blk.mlp.gate_proj, MixedLinear)
    model.model.layers[1].self_attn.k_proj = torch.nn.Linear(64, 32, bias=False)  # not quantized
    with pytest.raises(ValueError, match="groups"):
        fuse_projections(model, groups=[("q_proj",)])
    with pytest.raises(ValueError, match="groups"):
        fuse_projections(model, groups=[("q_proj", "q_proj")])
    with pytest.raises(TypeError, match="model"):
        fuse_projections("model")


def test_torch_compile_traces_one_call_per_fused_group(monkeypatch):
    """torch.compile(fullgraph=True): MixedLinear is one custom op (mixllm::mixed_linear), and a
    fused group's members share one call of it per input, as in eager mode."""
    model = _quantize_blocks(tiny_llama(seed=4))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(ids).logits
    assert fuse_projections(model) == 4
    calls = []
    eager = MixedLinear._forward_eager
    monkeypatch.setattr(
        MixedLinear, "_forward_eager", lambda self, x: calls.append(self.out_features) or eager(self, x)
    )
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(ids)  # trace
        calls.clear()
        out = compiled(ids).logits
    assert torch.equal(out, ref)
    # per block: q+k+v (64 + 2 * 32), o, gate+up (2 * 96), down
    assert calls == [128, 64, 192, 64] * 2
    assert all(g._pending is None for g in mixllm.fuse.fused_groups(model))


def test_gated_mlp_reads_the_fused_gate_up_output():
    """Llama's MLP becomes a FusedGatedMLP (the down projection takes the fused gate/up output through
    MixedLinear.forward_silu_mul): the same children and state-dict keys as without it, logits bit-identical (on the
    CPU forward_silu_mul runs the unfused ops; the GPU kernel is compared bit for bit in
    tests/test_cuda.py), and unfuse_projections puts the original module back."""
    from mixllm.fuse import FusedGatedMLP

    ref = _quantize_blocks(tiny_llama(seed=7, hidden_size=160, intermediate_size=200, head_dim=40))
    model = _quantize_blocks(tiny_llama(seed=7, hidden_size=160, intermediate_size=200, head_dim=40))
    plain = _quantize_blocks(tiny_llama(seed=7, hidden_size=160, intermediate_size=200, head_dim=40))
    assert fuse_projections(plain, gated_mlp=False) == 4
    mlp0 = model.model.layers[0].mlp
    assert fuse_projections(model) == 4
    assert all(isinstance(blk.mlp, FusedGatedMLP) for blk in model.model.layers)
    assert model.model.layers[0].mlp.original is mlp0
    assert set(model.state_dict()) == set(plain.state_dict())  # the same children under the same names
    assert sum(isinstance(m, MixedLinear) for m in model.modules()) == 2 * 4
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert fuse_projections(model) == 0  # already fused: nothing changes
    assert isinstance(model.model.layers[0].mlp, FusedGatedMLP)
    assert unfuse_projections(model) == 4
    assert model.model.layers[0].mlp is mlp0 and isinstance(mlp0.gate_proj, MixedLinear)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_gated_mlp_only_where_asked_and_where_it_applies():
    from mixllm.fuse import FusedGatedMLP

    model = _quantize_blocks(tiny_llama(seed=9))
    assert fuse_projections(model, gated_mlp=False) == 4
    assert not any(isinstance(m, FusedGatedMLP) for m in model.modules())
    unfuse_projections(model)
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()  # not SiLU: left as it is
    fuse_projections(model)
    assert isinstance(model.model.layers[0].mlp, FusedGatedMLP)
    assert not isinstance(model.model.layers[1].mlp, FusedGatedMLP)
    with pytest.raises(TypeError, match="gated_mlp"):
        fuse_projections(model, gated_mlp="yes")


def test_forward_silu_mul_checks_its_input():
    down = random_mixed_linear(0, 24, 128, 0.25, bias=True)
    gu = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    want = down(torch.nn.functional.silu(gu[:, :128]) * gu[:, 128:])
    assert torch.equal(down.forward_silu_mul(gu), want)
    with pytest.raises(ValueError, match="gu: expected last dimension 2 \\* K = 256"):
        down.forward_silu_mul(gu[:, :200])
    with pytest.raises(TypeError, match="gu: expected a torch.Tensor"):
        down.forward_silu_mul(gu.numpy())


def test_rmsnorm_runs_in_the_fused_groups_quantizer():
    """A Llama block's two RMSNorms feed only the fused q/k/v and gate/up groups: fuse_projections puts a
    DeferredRMSNorm (identity, the same weight parameter) in their place and the group normalizes its
    input in MixedLinear.forward_rmsnorm. On the CPU that runs the eager ops: logits and generated tokens
    bit-identical, the state dict's keys unchanged, unfuse_projections puts the norms back. (The GPU
    kernel is compared with the eager ops in tests/test_cuda.py.)"""
    from mixllm.fuse import DeferredRMSNorm

    def build():
        return _quantize_blocks(tiny_llama(seed=11, hidden_size=160, intermediate_size=200, head_dim=40))

    ref, model, plain = build(), build(), build()
    norms = [(blk.input_layernorm, blk.post_attention_layernorm) for blk in model.model.layers]
    assert fuse_projections(plain, rmsnorm=False) == 4
    assert not any(isinstance(m, DeferredRMSNorm) for m in plain.modules())
    assert fuse_projections(model) == 4
    for blk, (n_in, n_post) in zip(model.model.layers, norms):
        assert isinstance(blk.input_layernorm, DeferredRMSNorm) and blk.input_layernorm.original is n_in
        assert blk.input_layernorm.weight is n_in.weight
        assert isinstance(blk.post_attention_layernorm, DeferredRMSNorm)
        assert blk.post_attention_layernorm.original is n_post
        assert blk.self_attn.mixllm_fused_q_proj_k_proj_v_proj._norm[0] is blk.input_layernorm
    assert set(model.state_dict()) == set(plain.state_dict())
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        kw = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
    assert fuse_projections(model) == 0  # already fused: nothing changes
    assert unfuse_projections(model) == 4
    for blk, (n_in, n_post) in zip(model.model.layers, norms):
        assert blk.input_layernorm is n_in and blk.post_attention_layernorm is n_post
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    with pytest.raises(TypeError, match="rmsnorm"):
        fuse_projections(model, rmsnorm="yes")


def test_rmsnorm_only_where_its_group_is_fused():
    from mixllm.fuse import DeferredRMSNorm

    model = _quantize_blocks(tiny_llama(seed=13))
    ref = _quantize_blocks(tiny_llama(seed=13))
    assert fuse_projections(model, groups=[("gate_proj", "up_proj")]) == 2  # q/k/v stay separate
    blk = model.model.layers[0]
    assert not isinstance(blk.input_layernorm, DeferredRMSNorm)  # it feeds three separate layers
    assert isinstance(blk.post_attention_layernorm, DeferredRMSNorm)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_forward_rmsnorm_checks_its_input():
    from mixllm.nn import rmsnorm_reference

    lin = random_mixed_linear(0, 24, 128, 0.25, bias=True)
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 128, generator=gen), torch.randn(128, generator=gen)
    assert torch.equal(lin.forward_rmsnorm(x, w, 1e-6), lin(rmsnorm_reference(x, w, 1e-6)))
    # the reference is Hugging Face's LlamaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(128, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(w)
    xb = x.to(torch.bfloat16)
    assert torch.equal(rmsnorm_reference(xb, w.to(torch.bfloat16), 1e-6), hf.to(torch.bfloat16)(xb))
    with pytest.raises(ValueError, match="x: expected last dimension 128"):
        lin.forward_rmsnorm(x[:, :100], w, 1e-6)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        lin.forward_rmsnorm(x.numpy(), w, 1e-6)
