"""notebooks/bit_budget.ipynb runs headless (fast mode: two blocks, tiny calibration) and plots."""
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NB = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "bit_budget.ipynb"


def test_bit_budget_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXLLM_NB_FAST", "1")
    monkeypatch.setenv("MIXLLM_NB_OUT", str(tmp_path))
    nb = nbformat.read(NB, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "MixLLM (global)" in text and "RTN W4A8" in text
    png = tmp_path / "bit_budget.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    # the sweep's rows: avg bits rise with the budget and 8-bit beats 4-bit
    rows = [l.split() for l in text.splitlines() if l.startswith("MixLLM (global)")]
    bits = [float(r[2]) for r in rows]
    ppl = [float(r[3]) for r in rows]
    assert bits == sorted(bits) and abs(bits[0] - 4) < 1e-6 and abs(bits[-1] - 8) < 1e-6
    assert ppl[-1] < ppl[0]
