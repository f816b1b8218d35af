"""The Hugging Face round trip (issue 12): after ``import mixllm``, ``AutoModelForCausalLM.from_pretrained``
loads mixllm checkpoints with the quantized layers in place, bit-identical to the saved model and to
``mixllm.load``; sharded saves both ways; ``quantization_config`` says how to rebuild every layer;
loading streams shards (peak host memory measured in a subprocess); ``dtype`` / ``device_map``.

On the default real model (a few layers quantized, tiny calibration) and on small random models
built from its config with and without ``tie_word_embeddings`` (CUDA device maps: code path only,
this test machine has no GPU)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _e2e import calib_ids, eval_ids, model_and_tokenizer  # noqa: E402

import mixllm  # noqa: E402  (registers quant_method "mixllm")
from mixllm import data, hf, io  # noqa: E402
from mixllm.nn import MixedLinear  # noqa: E402
from mixllm.nn_weight_only import WeightOnlyLinear  # noqa: E402

AutoModel = transformers.AutoModelForCausalLM
SHARD = "20MB"


def _logits(model, n=160):
    with torch.no_grad():
        return model(eval_ids()[None, :n]).logits


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    """The default model, MixLLM W4.4A8 on blocks 0 and 29 (global salience, tiny calibration),
    saved by mixllm.save with 20 MB shards, plus its logits and perplexity before saving."""
    model, tok = model_and_tokenizer()
    cfg = mixllm.MixLLMConfig(bits=4.4, gptq=False, clip=False, only=r"layers\.(0|29)\.", progress=False)
    mixllm.quantize(model, cfg, calib_ids())
    ppl = mixllm.perplexity(model, eval_ids(), seq_len=256)
    d = tmp_path_factory.mktemp("hf") / "w44"
    mixllm.save(
        model,
        d,
        tokenizer=tok,
        max_shard_size=SHARD,
        evaluation={"perplexity": ppl, "tokens": int(eval_ids().numel()), "seq_len": 256},
    )
    return model, d, _logits(model), ppl


def test_transformers_version_is_supported():
    assert hf.registered(), f"transformers {transformers.__version__} < {hf.MIN_TRANSFORMERS}"
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["mixllm"] is hf.MixllmQuantizationConfig
    assert AUTO_QUANTIZER_MAPPING["mixllm"] is hf.MixllmHfQuantizer


def test_from_pretrained_bit_identical_to_saved_and_to_mixllm_load(default):
    model, d, logits, ppl = default
    a = AutoModel.from_pretrained(d)
    assert isinstance(a.model.layers[0].mlp.down_proj, MixedLinear)
    assert isinstance(a.model.layers[29].self_attn.q_proj, MixedLinear)
    assert type(a.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # still tied
    assert not a.training and a.model.layers[0].mlp.down_proj.perm.device.type == "cpu"
    assert torch.equal(_logits(a), logits)
    b = mixllm.load(d)
    assert torch.equal(_logits(b), logits)
    assert mixllm.perplexity(a, eval_ids(), seq_len=256) == ppl  # the same perplexity as before saving
    for name, m in model.named_modules():  # every quantized layer, with the same part sizes
        if isinstance(m, MixedLinear):
            assert a.get_submodule(name).get_config() == m.get_config()
            assert torch.equal(a.get_submodule(name).perm, m.perm)


def test_folder_is_a_hf_model_folder(default):
    model, d, _, ppl = default
    names = set(os.listdir(d))
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "mixllm.json",
        "model.safetensors.index.json",
    } <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 3
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    # every shard but the one holding the 113 MB embedding respects the 20 MB limit
    sizes = sorted(os.path.getsize(d / s) for s in shards)
    assert all(s <= 20e6 + 1e5 for s in sizes[:-1])
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mixllm" and qc["format_version"] == 2 and qc["method"] == "mixllm"
    assert qc["group_size"] == 128 and qc["act_bits"] == 8 and abs(qc["weight_bits"] - 4.4) < 0.02
    assert len(qc["modules"]) == 14  # 7 linears in each of 2 blocks
    spec = qc["modules"]["model.layers.0.mlp.down_proj"]
    m = model.model.layers[0].mlp.down_proj
    assert spec == {
        "class": "MixedLinear",
        "args": {
            "in_features": 1536,
            "out_features": 576,
            "n8": m.n8,
            "bias": False,
            "group_size": 128,
            "weight_only": False,
        },
    }
    card = (d / "README.md").read_text()
    assert "MixLLM" in card and "4.4" in card and f"{ppl:.3f}" in card and "from_pretrained" in card
    meta = io.read_meta(d)
    assert meta["format_version"] == 2 and sorted(meta["files"]) == shards
    assert meta["evaluation"]["perplexity"] == ppl
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert tok("hello").input_ids


def test_save_pretrained_on_quantized_model_round_trips(default, tmp_path):
    model, _, logits, _ = default
    out = tmp_path / "sp"
    model.save_pretrained(out, max_shard_size=SHARD)  # the plain transformers call on a mixllm.quantize'd model
    assert (out / "model.safetensors.index.json").exists()
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) >= 3
    a = AutoModel.from_pretrained(out)
    assert torch.equal(_logits(a), logits)
    assert torch.equal(_logits(mixllm.load(out)), logits)  # no mixllm.json: loads without checksums
    # and a model loaded by from_pretrained saves again (is_serializable) and reloads identically
    again = tmp_path / "again"
    a.save_pretrained(again, max_shard_size="50MB")
    assert torch.equal(_logits(AutoModel.from_pretrained(again)), logits)
    mixllm.save(a, tmp_path / "again2")
    assert torch.equal(_logits(mixllm.load(tmp_path / "again2")), logits)


def test_save_pretrained_right_after_quantize(tmp_path):
    """No mixllm.save in between: mixllm.quantize already set model.config.quantization_config."""
    model = _small(False, False, plain=True)
    cfg = mixllm.MixLLMConfig(bits=4.4, gptq=False, clip=False, selection="random", group_size=64, progress=False)
    mixllm.quantize(model, cfg, torch.randint(0, 256, (2, 32)))
    assert model.config.quantization_config.modules
    model.save_pretrained(tmp_path / "q", max_shard_size="100KB")
    ids = torch.arange(40)[None] % 256
    with torch.no_grad():
        assert torch.equal(AutoModel.from_pretrained(tmp_path / "q")(ids).logits, model(ids).logits)


def test_dtype_and_device_map(default):
    _, d, logits, _ = default
    for dm in ("cpu", "auto", {"": "cpu"}):
        m = AutoModel.from_pretrained(d, device_map=dm)
        assert torch.equal(_logits(m), logits), dm
    m = AutoModel.from_pretrained(d, dtype=torch.bfloat16)
    q = m.model.layers[0].mlp.down_proj
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16 and m.lm_head.weight.dtype == torch.bfloat16
    assert q.scale4.dtype == torch.float32 and q.qweight4.dtype == torch.uint8  # the format's dtypes stay
    out = _logits(m)
    assert out.dtype == torch.bfloat16
    assert (out.float() - logits).abs().max() < 0.05 * logits.abs().max()
    m = mixllm.load(d, dtype=torch.float16, device="cpu")
    assert m.model.norm.weight.dtype == torch.float16 and m.model.layers[0].mlp.down_proj.scale8.dtype == torch.float32


def test_peak_host_memory_while_loading(default):
    """Loading streams the shards: the peak RSS growth of a fresh process, measured after
    from_pretrained and again after a forward pass has touched every weight (the shards are memory
    mapped, so pages are read on first use), stays <= checkpoint size + 2 shards. A loader that built
    the 540 MB float model and then read the 490 MB checkpoint into it would fail this."""
    _, d, _, _ = default
    shards = [d / n for n in os.listdir(d) if n.endswith(".safetensors")]
    ckpt = sum(os.path.getsize(s) for s in shards)
    bound = ckpt + 2 * max(os.path.getsize(s) for s in shards)
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's (pytest's) peak across exec.
    code = textwrap.dedent(f"""
        import json
        import torch, transformers, mixllm
        def status(key):
            return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
        before = status("VmRSS:")
        m = transformers.AutoModelForCausalLM.from_pretrained({str(d)!r})
        loaded = status("VmHWM:")
        with torch.no_grad():
            m(torch.arange(8)[None])
        print(json.dumps({{"before": before, "loaded": loaded, "forward": status("VmHWM:")}}))
    """)
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    MiB = 2**20
    print(
        f"\npeak RSS growth: {(got['loaded'] - got['before']) / MiB:.0f} MiB after loading, "
        f"{(got['forward'] - got['before']) / MiB:.0f} MiB after a forward pass; checkpoint {ckpt / MiB:.0f} MiB "
        f"in {len(shards)} files; bound (checkpoint + 2 largest shards) {bound / MiB:.0f} MiB"
    )
    assert got["loaded"] - got["before"] <= bound
    assert got["forward"] - got["before"] <= bound


def test_cli_output_loads_both_ways(tmp_path, capsys):
    from mixllm.cli import main

    out = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                "--bits",
                "4.4",
                "--only",
                r"layers\.1\.self_attn",
                "--n-calib",
                "2",
                "--seq-len",
                "64",
                "--no-gptq",
                "--no-clip",
                "--out",
                str(out),
                "--quiet",
                "--cache-dir",
                "none",
            ]
        )
        == 0
    )
    capsys.readouterr()
    a, b = AutoModel.from_pretrained(out), mixllm.load(out)
    assert isinstance(a.model.layers[1].self_attn.k_proj, MixedLinear)
    assert torch.equal(_logits(a, 64), _logits(b, 64))


# ------------------------------------------------------------------ small random models from the default config
def _small(tie: bool, head: bool, weight_only_kind=None, plain=False):
    """A 2-block model with the default model's config (scaled down), tied or untied embeddings;
    ``head``: quantize the output head too; ``weight_only_kind``: WeightOnlyLinear layers instead."""
    base = json.loads((data.default_model_dir() / "config.json").read_text())
    base.update(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=tie,
    )
    base.pop("quantization_config", None)
    cfg = transformers.LlamaConfig(**{k: v for k, v in base.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(1 + tie + 2 * head)
    model = AutoModel.from_config(cfg).eval()
    if plain:
        return model
    targets = [
        (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (head or "lm_head" not in n)
    ]
    for i, (n, lin) in enumerate(targets):
        if weight_only_kind is None:
            q = MixedLinear.from_linear(lin, rows8=range(0, lin.out_features, 7), group_size=64)
        elif weight_only_kind == "group":
            q = WeightOnlyLinear.from_linear(lin, bits=3 + i % 2, group_size=64)
        else:  # codebook with outliers (CMPQ's layout)
            import numpy as np

            K = lin.in_features
            cb = np.sort(np.random.default_rng(i).normal(0, 0.05, (K, 8)), 1)
            codes = np.random.default_rng(i + 1).integers(0, 8, (lin.out_features, K))
            q = WeightOnlyLinear.from_codebook(
                lin, codes, cb, np.full(K, 3), outliers=([0, 3], [5, 7], [0.5, -0.25]), method="cmpq"
            )
        parent, _, attr = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, q)
    model.mixllm_info = {"method": "mixllm" if weight_only_kind is None else "test", "config": None, "report": None}
    return model


@pytest.mark.parametrize(
    "tie,head,kind",
    [
        (True, False, None),
        (False, False, None),
        (False, True, None),
        (True, True, None),
        (True, False, "group"),
        (False, True, "codebook"),
    ],
)
def test_tied_and_untied_structures(tmp_path, tie, head, kind):
    model = _small(tie, head, kind)
    ids = torch.arange(40)[None] % 256
    with torch.no_grad():
        ref = model(ids).logits
    mixllm.save(model, tmp_path / "a", max_shard_size="100KB")
    model.save_pretrained(tmp_path / "b", max_shard_size="100KB")
    assert len([n for n in os.listdir(tmp_path / "a") if n.endswith(".safetensors")]) >= 2
    for d in ("a", "b"):
        for loaded in (AutoModel.from_pretrained(tmp_path / d), mixllm.load(tmp_path / d)):
            with torch.no_grad():
                assert torch.equal(loaded(ids).logits, ref), (d, tie, head, kind)
            emb, out = loaded.get_input_embeddings(), loaded.get_output_embeddings()
            if head:  # a quantized head is a separate module; the saved config no longer ties it
                assert type(out) in (MixedLinear, WeightOnlyLinear)
                assert not json.loads((tmp_path / d / "config.json").read_text())["tie_word_embeddings"]
            else:
                assert (out.weight.data_ptr() == emb.weight.data_ptr()) == tie
            assert not any(
                p.requires_grad
                for m in loaded.modules()
                if isinstance(m, (MixedLinear, WeightOnlyLinear))
                for p in m.parameters()
            )


def test_from_pretrained_refuses_to_quantize_on_the_fly(tmp_path):
    model = _small(True, False)
    model.config.quantization_config = None
    plain = tmp_path / "plain"
    AutoModel.from_config(model.config).save_pretrained(plain)
    qc = hf.quantization_config_for(model)
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModel.from_pretrained(plain, quantization_config=qc)
