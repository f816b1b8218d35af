"""The `mixllm` command on the default real model (a few layers, short calibration and text)."""

import json
import subprocess
import sys

import pytest

from mixllm.cli import main


def _json_lines(out):
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def test_quantize_report_eval_round_trip(tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(
        [
            "quantize",
            "--bits",
            "4.4",
            "--only",
            r"layers\.(0|1)\.self_attn",
            "--n-calib",
            "2",
            "--seq-len",
            "64",
            "--out",
            str(out),
            "--eval",
            "--eval-max-tokens",
            "600",
            "--quiet",
            "--cache-dir",
            "none",
        ]
    )
    assert rc == 0
    lines = _json_lines(capsys.readouterr().out)
    assert abs(lines[0]["avg_bits"] - 4.4) < 0.01
    ppl_after_quantize = lines[-1]["perplexity"]
    assert (out / "bits_per_layer.png").exists()

    assert main(["report", str(out), "--layers"]) == 0
    rep = capsys.readouterr().out
    assert "avg_bits" in rep and "model.layers.1.self_attn.o_proj" in rep and "method: mixllm" in rep

    # eval fuses the quantized q/k/v (mixllm.fuse_projections) by default: bit-identical either way
    assert main(["eval", "--model", str(out), "--max-tokens", "600", "--quiet"]) == 0
    assert _json_lines(capsys.readouterr().out)[-1]["perplexity"] == ppl_after_quantize  # bit-identical
    assert main(["eval", "--model", str(out), "--max-tokens", "600", "--quiet", "--no-fuse"]) == 0
    assert _json_lines(capsys.readouterr().out)[-1]["perplexity"] == ppl_after_quantize


def test_quantize_selection_measured(tmp_path, capsys):
    """--selection measured holds out --gain-windows windows, measures each layer's gain on them and
    still spends the budget (docs/method.md "Measured layer gains")."""
    out = tmp_path / "m"
    argv = ["quantize", "--bits", "4.4", "--selection", "measured", "--gain-windows", "1", "--only"]
    argv += [r"layers\.0\.self_attn", "--n-calib", "3", "--seq-len", "64", "--out", str(out), "--quiet"]
    assert main(argv + ["--cache-dir", "none"]) == 0
    rep = _json_lines(capsys.readouterr().out)[0]
    assert abs(rep["avg_bits"] - 4.4) < 0.05
    assert main(["report", str(out), "--layers"]) == 0
    listing = capsys.readouterr().out
    assert "model.layers.0.self_attn.v_proj" in listing and listing.count("measured gain") == 4
    bad = ["quantize", "--selection", "measured", "--gain-windows", "3", "--n-calib", "3", "--only"]
    bad += [r"layers\.0\.self_attn", "--seq-len", "64", "--out", str(tmp_path / "x"), "--quiet"]
    assert main(bad) == 2  # every window held out: nothing left to calibrate on
    assert "gain_windows=3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # --gain-metric kl: the same windows, the KL divergence from the float model
    out_kl = tmp_path / "kl"
    argv_kl = [a if a != str(out) else str(out_kl) for a in argv] + ["--gain-metric", "kl"]
    assert main(argv_kl + ["--cache-dir", "none"]) == 0
    assert abs(_json_lines(capsys.readouterr().out)[0]["avg_bits"] - 4.4) < 0.05
    assert main(["report", str(out_kl), "--layers"]) == 0
    assert capsys.readouterr().out.count("measured gain") == 4
    assert main(argv_kl[:-1] + ["ppl", "--cache-dir", "none"]) == 2
    assert "gain_metric" in capsys.readouterr().err


def test_method_flags_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--method", "mixllm", "--help"])
    assert e.value.code == 0
    h = capsys.readouterr().out
    for flag in ("--bits", "--selection", "--no-gptq", "--group-size", "--weight-only", "--eval-max-tokens"):
        assert flag in h
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "nope", "--out", str(tmp_path)])
    assert "unknown method" in capsys.readouterr().err
    assert main(["quantize", "--bits", "9", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "bits" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a mixllm model" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2


def test_entry_point_module():
    r = subprocess.run([sys.executable, "-m", "mixllm.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "quantize" in r.stdout and "report" in r.stdout
