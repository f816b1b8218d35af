"""notebooks/bit_budget.ipynb: committed with the outputs of a real run (plots inline, no Agg), and it
executes headless (fast mode: two blocks, tiny calibration) with the from_pretrained round trip."""

import json
import pathlib

import pytest

NB = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "bit_budget.ipynb"


def _images(nb):
    return [
        o
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]


def _text(nb):
    out = []
    for c in nb["cells"]:
        for o in c.get("outputs", []) if c["cell_type"] == "code" else []:
            t = o.get("text", "") or o.get("data", {}).get("text/plain", "")
            out.append("".join(t) if isinstance(t, list) else t)
    return "".join(out)


def _check_sweep(text):
    rows = [line.split() for line in text.splitlines() if line.startswith("MixLLM (global)")]
    bits = [float(r[2]) for r in rows]
    ppl = [float(r[3]) for r in rows]
    assert len(rows) >= 4 and bits == sorted(bits)
    assert abs(bits[0] - 4) < 1e-6 and abs(bits[-1] - 8) < 1e-6
    assert ppl[-1] < ppl[0]  # 8-bit beats 4-bit
    assert "RTN W4A8" in text and "logits bit-identical to the saved model: True" in text


def test_committed_notebook_shows_a_real_run():
    nb = json.loads(NB.read_text())
    src = "".join("".join(c["source"]) for c in nb["cells"])
    assert "Agg" not in src and "matplotlib.use" not in src and "tqdm.auto" in src
    assert "from_pretrained" in src
    assert len(_images(nb)) >= 3, "budget curve and per-layer plots must be committed inline"
    text = _text(nb)
    assert "small run" in text or "full run" in text, "the committed outputs must come from a real run"
    _check_sweep(text)


def test_bit_budget_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MIXLLM_NB_FAST", "1")
    monkeypatch.setenv("MIXLLM_NB_OUT", str(tmp_path))
    nb = nbformat.read(NB, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert len(_images(nb)) >= 3  # inline figures, not only files
    _check_sweep(_text(nb))
    png = tmp_path / "bit_budget.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "w4.4a8" / "model.safetensors.index.json").exists()
