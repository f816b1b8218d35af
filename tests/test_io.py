"""mixllm.save / mixllm.load on the default real model: bit-identical logits, atomic writes, clear errors."""

import json
import os

import pytest
import torch
from _e2e import calib_ids, eval_ids, model_and_tokenizer

import mixllm
from mixllm import io


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tok = model_and_tokenizer()
    cfg = mixllm.MixLLMConfig(bits=4.4, gptq=False, clip=False, only=r"layers\.(0|29)\.", progress=False)
    mixllm.quantize(model, cfg, calib_ids())
    d = tmp_path_factory.mktemp("io") / "q"
    mixllm.save(model, d, tokenizer=tok)
    with torch.no_grad():
        logits = model(eval_ids()[None, :200]).logits
    return d, logits


def test_round_trip_bit_identical(saved):
    d, logits = saved
    assert {"config.json", "mixllm.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(d))
    model = mixllm.load(d)
    assert isinstance(model.model.layers[0].mlp.down_proj, mixllm.MixedLinear)
    assert not isinstance(model.model.layers[1].mlp.down_proj, mixllm.MixedLinear)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        assert torch.equal(model(eval_ids()[None, :200]).logits, logits)
    meta = io.read_meta(d)
    assert meta["method"] == "mixllm" and abs(meta["report"]["avg_bits"] - 4.4) < 0.01


def test_overwrite_is_atomic_and_leaves_no_temp(saved, tmp_path):
    d, logits = saved
    model = mixllm.load(d)
    out = tmp_path / "m"
    mixllm.save(model, out)
    mixllm.save(model, out)  # replaces the previous one
    assert sorted(os.listdir(tmp_path)) == ["m"]
    with pytest.raises(FileExistsError):
        mixllm.save(model, out, overwrite=False)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupted_weights(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "c")
    f = d / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(ValueError, match="corrupted"):
        mixllm.load(d)
    f.write_bytes(bytes(b[:100]))  # truncated, checksum check off: still a clear error
    with pytest.raises(ValueError, match="safetensors"):
        mixllm.load(d, verify=False)


def _config(d):
    return json.loads((d / "config.json").read_text())


def test_bad_metadata(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "m")
    cfg = _config(d)
    mods = cfg["quantization_config"]["modules"]
    mods["model.layers.0.mlp.up_proj"]["args"]["n8"] += 1  # mismatched with the tensors
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        mixllm.load(d)
    mods["model.layers.0.mlp.nope"] = mods.pop("model.layers.0.mlp.up_proj")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not exist"):
        mixllm.load(d)
    meta = json.loads((d / "mixllm.json").read_text())
    meta["format_version"] = 99
    (d / "mixllm.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        mixllm.load(d)
    (d / "mixllm.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        mixllm.load(d)
    os.unlink(d / "mixllm.json")
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a mixllm model"):
        mixllm.load(d)
    with pytest.raises(FileNotFoundError):
        mixllm.load(tmp_path / "missing")


def _write_v1(model, d):
    """A folder in format version 1 (mixllm <= 0.1.0): one model.safetensors, modules in mixllm.json."""
    from safetensors.torch import save_model

    d.mkdir()
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (d / "config.json").write_text(json.dumps(cfg))
    save_model(model, str(d / "model.safetensors"))
    meta = {
        "format_version": 1,
        "method": "mixllm",
        "config": None,
        "report": None,
        "dtype": "float32",
        "modules": {n: {"class": type(m).__name__, "args": m.get_config()} for n, m in io._quantized_modules(model)},
        "sha256": io._sha256(d / "model.safetensors"),
    }
    (d / "mixllm.json").write_text(json.dumps(meta))


def test_reads_format_version_1(saved, tmp_path):
    d, logits = saved
    model = mixllm.load(d)
    v1 = tmp_path / "v1"
    _write_v1(model, v1)
    old = mixllm.load(v1)
    assert isinstance(old.model.layers[0].mlp.down_proj, mixllm.MixedLinear)
    with torch.no_grad():
        assert torch.equal(old(eval_ids()[None, :200]).logits, logits)
    with pytest.raises(ValueError, match="version 1"):
        mixllm.load(v1, dtype=torch.float16)
    mixllm.save(old, tmp_path / "v2")  # saving again upgrades it
    assert io.read_meta(tmp_path / "v2")["format_version"] == 2


def test_save_errors(tmp_path):
    with pytest.raises(TypeError):
        mixllm.save("model", tmp_path / "x")
    with pytest.raises(TypeError, match="Hugging Face"):
        mixllm.save(torch.nn.Linear(2, 2), tmp_path / "x")
