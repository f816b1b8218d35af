"""Loading hostile checkpoints (issues 6 and 12): truncated, bit-flipped and mismatched files, missing
shards, configs with absurd sizes, a config naming mixllm over another method's tensors, give a clear
ValueError naming the file and the field -- never a crash, never an absurd allocation, never a
half-built model -- through ``mixllm.load`` and through ``AutoModelForCausalLM.from_pretrained``.

The model is a tiny Llama built from a config (no download); two of its linears are MixedLinear. It is
saved in format version 2 with small shards (several safetensors files + index).
"""

import json
import resource
import shutil
import struct

import numpy as np
import pytest
import torch

from mixllm import io
from mixllm.nn import MixedLinear

transformers = pytest.importorskip("transformers")
from _models import tiny_llama  # noqa: E402  (needs transformers)

# Peak RSS may grow by this much during one hostile load at most (the tiny model is ~0.5 MiB;
# an absurd config would ask for gigabytes).
RSS_SLACK_MB = 150
COUNT = {"files": 0}  # hostile files tried (docs/readme_reliability.md)


def _tiny_model():
    model = tiny_llama(vocab_size=96, tie_word_embeddings=True)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = MixedLinear.from_linear(mlp.down_proj, rows8=[1, 5, 9], group_size=32)
    mlp.up_proj = MixedLinear.from_linear(mlp.up_proj, rows8=[], group_size=32)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _tiny_model()
    d = tmp_path_factory.mktemp("hostile") / "good"
    io.save(model, d, max_shard_size="64KB")
    assert (d / "model.safetensors.index.json").exists()
    ids = torch.arange(12)[None] % 96
    with torch.no_grad():
        logits = model(ids).logits
    return d, ids, logits


def _maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _from_pretrained(d, verify=True):
    return transformers.AutoModelForCausalLM.from_pretrained(d)


def _assert_load_fails(d, match=None, loader=None, **kw):
    """load(d) must raise ValueError (matching `match`) without growing the peak RSS."""
    COUNT["files"] += 1
    before = _maxrss_mb()
    with pytest.raises(ValueError, match=match):
        (loader or io.load)(d, **kw)
    assert _maxrss_mb() - before < RSS_SLACK_MB, "a hostile file made load() allocate a lot"


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


def _shard(d, key):
    """The weight file of `d` that holds tensor `key`."""
    return d / _index(d)[key]


def _config(d):
    return json.loads((d / "config.json").read_text())


def _write_config(d, cfg):
    (d / "config.json").write_text(json.dumps(cfg))


def _copy(saved, tmp_path, name="c"):
    return shutil.copytree(saved[0], tmp_path / name)


def _meta(d):
    return json.loads((d / "mixllm.json").read_text())


def _write_meta(d, meta):
    (d / "mixllm.json").write_text(json.dumps(meta))


def test_good_file_round_trips(saved):
    d, ids, logits = saved
    model = io.load(d)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated(saved, tmp_path, verify):
    d = _copy(saved, tmp_path)
    f = _shard(d, K + "qweight4")
    data = f.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    for cut in sorted(
        {0, 1, 7, 8, 9, 8 + header_len // 2, 8 + header_len, 8 + header_len + 1, len(data) // 2, len(data) - 1}
    ):
        f.write_bytes(data[:cut])
        _assert_load_fails(d, "corrupted|safetensors|match|shape", verify=verify)


def test_bit_flips_are_caught_by_the_checksum(saved, tmp_path):
    d = _copy(saved, tmp_path)
    f = _shard(d, K + "qweight4")
    data = f.read_bytes()
    rng = np.random.default_rng(0)
    for pos in list(rng.integers(0, len(data), 12)) + [3, 8 + 5, len(data) - 1]:
        b = bytearray(data)
        b[pos] ^= 1 << int(rng.integers(0, 8))
        f.write_bytes(bytes(b))
        _assert_load_fails(d, "corrupted")


def test_bit_flips_without_checksum(saved, tmp_path):
    """verify=False: a flip in the header is a clear error; one in the data loads (the checksum is
    what catches it) and, where it makes codes invalid, the layer's forward raises ValueError."""
    d = _copy(saved, tmp_path)
    f = _shard(d, K + "qweight4")
    data = f.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    rng = np.random.default_rng(1)
    ids = saved[1]
    for pos in rng.integers(0, 8 + header_len, 12):  # length prefix or JSON header: always refused
        b = bytearray(data)
        b[pos] ^= 0xFF
        f.write_bytes(bytes(b))
        _assert_load_fails(d, verify=False)
    outcomes = {"load refused": 0, "forward refused": 0, "ran": 0}
    for pos in rng.integers(8 + header_len, len(data), 12):  # tensor data: caught later, or harmless
        b = bytearray(data)
        b[pos] ^= 0xFF
        f.write_bytes(bytes(b))
        COUNT["files"] += 1
        try:
            model = io.load(d, verify=False)
        except ValueError:
            outcomes["load refused"] += 1
            continue
        try:
            with torch.no_grad():
                out = model(ids).logits
        except ValueError:
            outcomes["forward refused"] += 1
            continue
        assert out.shape == saved[2].shape and out.dtype == saved[2].dtype
        outcomes["ran"] += 1
    assert sum(outcomes.values()) == 12, outcomes


K = "model.layers.0.mlp.down_proj."


def _rewrite_tensors(d, edit, key=K + "qweight4"):
    """Apply edit(state) to the tensors of the shard holding `key` and rewrite it (with a matching
    checksum in mixllm.json; the index is left as it was, as a tamperer would)."""
    from safetensors.torch import load_file, save_file

    f = _shard(d, key)
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f), metadata={"format": "pt"})
    meta = _meta(d)
    meta["files"][f.name] = io._sha256(f)
    _write_meta(d, meta)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: s.__setitem__(K + "qweight4", s[K + "qweight4"][:, :-1].contiguous()), "shape"),
        (lambda s: s.__setitem__(K + "scale8", s[K + "scale8"].repeat(2, 1)), "shape"),
        (lambda s: s.__setitem__(K + "qweight4", s[K + "qweight4"].to(torch.int16)), "shape|dtype"),
        (lambda s: s.__setitem__(K + "scale4", s[K + "scale4"].double()), "shape|dtype"),
        (lambda s: s.__setitem__(K + "perm", s[K + "perm"].int()), "shape|dtype"),
        (lambda s: s.pop(K + "zero4"), "missing"),
        (lambda s: s.__setitem__("model.layers.0.mlp.down_proj.extra", torch.zeros(3)), "unexpected"),
        (
            lambda s: s.__setitem__("model.layers.1.mlp.down_proj.weight", torch.zeros(64, 96, dtype=torch.float16)),
            "shape|dtype|also stored",
        ),
        (lambda s: s.__setitem__("model.embed_tokens.weight", torch.zeros(10**5, 64)), "shape|GiB|also stored"),
        (lambda s: s.__setitem__(K + "qweight8", s[K + "qweight8"].to(torch.uint8)), "dtype I8"),
    ],
)
@pytest.mark.parametrize("loader", [io.load, _from_pretrained])
def test_mismatched_tensors(saved, tmp_path, edit, match, loader):
    d = _copy(saved, tmp_path)
    _rewrite_tensors(d, edit)
    _assert_load_fails(d, match, loader)


@pytest.mark.parametrize(
    "args,match",
    [
        ({"n8": 4}, "shape"),  # config not matching the tensors
        ({"in_features": 128}, "shape"),
        ({"group_size": 64}, "shape"),
        ({"bias": True}, "unexpected|missing"),  # the file has no bias for it
        ({"out_features": 2**28}, "shape|GiB"),  # would be GiBs of buffers
        ({"out_features": 10**15, "n8": 0}, "shape|GiB"),
        ({"in_features": 2**40}, "shape|GiB"),
        ({"in_features": -1}, "bad arguments"),
        ({"group_size": 0}, "bad arguments"),
        ({"n8": 10**6}, "bad arguments"),
        ({"n8": 1.5}, "bad arguments"),
        ({"in_features": "64"}, "bad arguments"),
        ({"surprise": 1}, "bad arguments"),
    ],
)
@pytest.mark.parametrize("loader", [io.load, _from_pretrained])
def test_module_config_mismatch_or_absurd(saved, tmp_path, args, match, loader):
    """Tampered part sizes in config.json's quantization_config: the error names the file, the module
    and the field."""
    d = _copy(saved, tmp_path)
    cfg = _config(d)
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.down_proj"]["args"].update(args)
    _write_config(d, cfg)
    _assert_load_fails(d, match, loader)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"vocab_size": 10**9}, "GiB|shape"),
        ({"hidden_size": 2**20, "intermediate_size": 2**22}, "GiB|shape|cannot be built"),
        ({"num_hidden_layers": 10**6}, "num_hidden_layers"),
        ({"num_hidden_layers": 3}, "missing|shape"),
        ({"intermediate_size": 128}, "shape"),
        ({"model_type": "no-such-model"}, "could not be read"),
    ],
)
def test_hf_config_mismatch_or_absurd(saved, tmp_path, change, match):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_load_fails(d, match)


QM = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q: q.update(modules=[]), "modules"),
        (lambda q: q.update(modules={}), "modules"),
        (lambda q: q["modules"].update({QM: 7}), "modules.*expected"),
        (lambda q: q["modules"][QM].update({"class": "os.system"}), "unknown class"),
        (lambda q: q["modules"][QM].update({"class": "Linear"}), "unknown class"),
        (lambda q: q["modules"][QM].update({"args": [1, 2]}), "modules.*expected"),
        (lambda q: q["modules"][QM].pop("args"), "modules.*expected"),
        (lambda q: q["modules"].update({"": q["modules"]["model.layers.0.mlp.up_proj"]}), "non-empty"),
        (
            lambda q: q["modules"].update({"model.layers.9.mlp.up_proj": q["modules"]["model.layers.0.mlp.up_proj"]}),
            "does not exist",
        ),
        (lambda q: q["modules"].update({"lm_head": q["modules"]["model.layers.0.mlp.up_proj"]}), "ties|shape"),
        (lambda q: q.update(format_version=3), "format_version"),
        (lambda q: q.update(format_version=True), "format_version"),
        (lambda q: q.update(surprise=1), "unknown field"),
        (lambda q: q.update(group_size=-1), "group_size"),
        (lambda q: q.update(act_bits="8"), "act_bits"),
        (lambda q: q.update(weight_bits="4.4"), "weight_bits"),
        (lambda q: q.pop("modules"), "modules"),
    ],
)
@pytest.mark.parametrize("loader", [io.load, _from_pretrained])
def test_bad_quantization_config(saved, tmp_path, mutate, match, loader):
    d = _copy(saved, tmp_path)
    cfg = _config(d)
    mutate(cfg["quantization_config"])
    _write_config(d, cfg)
    _assert_load_fails(d, match, loader)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda m: m.update(format_version=3), "format_version 3"),
        (lambda m: m.update(format_version="2"), "format_version"),
        (lambda m: m.pop("format_version"), "missing keys"),
        (lambda m: m.pop("files"), "missing keys: files"),
        (lambda m: m.update(files=[]), "files"),
        (lambda m: m["files"].update({"../../etc/passwd.safetensors": "0" * 64}), "files"),
        (lambda m: m["files"].update({"extra.safetensors": "0" * 64}), "weight_map|files"),
        (lambda m: m["files"].pop(sorted(m["files"])[0]), "weight_map|files"),
    ],
)
def test_bad_mixllm_json(saved, tmp_path, mutate, match):
    d = _copy(saved, tmp_path)
    meta = _meta(d)
    mutate(meta)
    _write_meta(d, meta)
    _assert_load_fails(d, match)


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b'"modules"', b'{"modules": {}, "format_version": 1e999}'],
)
def test_garbage_metadata_file(saved, tmp_path, content):
    d = _copy(saved, tmp_path)
    (d / "mixllm.json").write_bytes(content)
    _assert_load_fails(d)


@pytest.mark.parametrize("content", [b"", b"{", b"\x00" * 64, b'{"model_type": "llama", "vocab_size": -5}'])
@pytest.mark.parametrize("loader", [io.load, _from_pretrained])
def test_garbage_hf_config(saved, tmp_path, content, loader):
    d = _copy(saved, tmp_path)
    (d / "config.json").write_bytes(content)
    COUNT["files"] += 1
    # from_pretrained on a config.json without quantization_config is transformers' own business
    # (it reports it as it does for any model); mixllm.load refuses it by name.
    with pytest.raises(ValueError if loader is io.load else (ValueError, OSError, RuntimeError)):
        loader(d)


def test_safetensors_header_lies(saved, tmp_path):
    """Headers that claim absurd sizes or offsets outside the file."""
    d = _copy(saved, tmp_path)
    f = _shard(d, K + "qweight8")
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    name = K + "qweight8"
    variants = []
    h = json.loads(json.dumps(header))
    h[name]["shape"] = [2**40, 2**20]
    variants.append(h)
    h = json.loads(json.dumps(header))
    h[name]["data_offsets"] = [0, 2**62]
    variants.append(h)
    h = json.loads(json.dumps(header))
    h[name]["data_offsets"] = [len(body) - 4, len(body) + 100]
    variants.append(h)
    h = json.loads(json.dumps(header))
    h[name]["dtype"] = "F64"
    variants.append(h)
    for h in variants:
        hb = json.dumps(h).encode()
        f.write_bytes(struct.pack("<Q", len(hb)) + hb + body)
        _assert_load_fails(d, "safetensors|shape|corrupted", verify=False)
    f.write_bytes(struct.pack("<Q", 2**60) + data[8:])  # header length beyond the file
    _assert_load_fails(d, "safetensors", verify=False)


@pytest.mark.parametrize("loader", [io.load, _from_pretrained])
def test_missing_shard(saved, tmp_path, loader):
    d = _copy(saved, tmp_path)
    victim = _shard(d, K + "qweight4")
    victim.unlink()
    COUNT["files"] += 1
    with pytest.raises((ValueError, OSError), match=victim.name):  # the error names the file
        loader(d)


def test_missing_files(saved, tmp_path):
    for victim in ("model.safetensors.index.json", "config.json"):
        d = _copy(saved, tmp_path, victim)
        (d / victim).unlink()
        _assert_load_fails(d, victim.split(".")[0])
    # without mixllm.json (a folder save_pretrained wrote) it loads, only without checksums
    d = _copy(saved, tmp_path, "nometa")
    (d / "mixllm.json").unlink()
    with torch.no_grad():
        assert torch.equal(io.load(d)(saved[1]).logits, saved[2])


def test_index_lies(saved, tmp_path):
    d = _copy(saved, tmp_path)
    f = d / "model.safetensors.index.json"
    idx = json.loads(f.read_text())
    idx["weight_map"][K + "qweight4"] = "model-99999-of-99999.safetensors"
    f.write_text(json.dumps(idx))
    _assert_load_fails(d, "weight_map")
    f.write_text("[1, 2")
    _assert_load_fails(d, "index.json is corrupted")


def _other_method_checkpoint(tmp_path):
    """The tiny model with WeightOnlyLinear (another method's tensors) where the config will claim MixedLinear."""
    from mixllm.nn_weight_only import WeightOnlyLinear

    model = _tiny_model()
    mlp = model.model.layers[0].mlp
    lin = torch.nn.Linear(96, 64, bias=False)
    mlp.down_proj = WeightOnlyLinear.from_linear(lin, bits=4, group_size=32)
    d = tmp_path / "foreign"
    io.save(model, d, max_shard_size="64KB")
    return d


@pytest.mark.parametrize("loader", [io.load, _from_pretrained])
def test_config_names_mixllm_over_another_methods_tensors(saved, tmp_path, loader):
    d = _other_method_checkpoint(tmp_path)
    cfg = _config(d)
    cfg["quantization_config"]["modules"][QM] = _config(saved[0])["quantization_config"]["modules"][QM]
    _write_config(d, cfg)
    _assert_load_fails(
        d,
        r"safetensors: unexpected tensor 'model\.layers\.0\.mlp\.down_proj\.(codes|scale|offset|"
        r"group_bits|rowptr|cols|vals)'.*MixedLinear",
        loader,
    )


@pytest.mark.parametrize("loader", [io.load, _from_pretrained])
def test_float_checkpoint_with_a_mixllm_config(saved, tmp_path, loader):
    """config.json names mixllm but the tensors are a plain float model's."""
    d = _copy(saved, tmp_path)
    cfg = _config(d)
    for f in list(d.glob("*.safetensors")) + [d / "model.safetensors.index.json"]:
        f.unlink()
    plain = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(
            **{k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures", "model_type")}
        )
    )
    plain.save_pretrained(d, max_shard_size="64KB")
    _write_config(d, cfg)  # save_pretrained rewrote it without the quantization_config
    meta = _meta(d)
    meta["files"] = {f.name: io._sha256(f) for f in d.glob("*.safetensors")}
    _write_meta(d, meta)
    _assert_load_fails(d, r"unexpected tensor .*\.weight'.*MixedLinear", loader)


def test_hostile_codes_fail_at_forward(saved, tmp_path):
    """Codes the kernels cannot take (4-bit zero points > 15, 8-bit code -128) load, and the layer's
    first forward raises ValueError from the C validation (no out-of-range arithmetic)."""
    for key, value in ((K + "zero4", 200), (K + "qweight8", -128)):
        d = _copy(saved, tmp_path, key)
        _rewrite_tensors(d, lambda s, key=key, value=value: s[key].view(-1)[0].fill_(value), key)
        COUNT["files"] += 1
        model = io.load(d)
        with pytest.raises(ValueError, match="codes|zero"):
            with torch.no_grad():
                model(saved[1])


def test_count_report(capsys):
    with capsys.disabled():
        print(f"\nhostile files tried: {COUNT['files']}")
    assert COUNT["files"] > 50
