"""bench/gpu_ab.py's summary of an A/B run (the device part needs a GPU; the arithmetic does not)."""

import importlib.util
import json
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "gpu_ab", os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_ab.py")
)
gpu_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_ab)


def _row(N, K, M, t):
    return {"N": N, "K": K, "M": M, "w4.4a8": t, "bf16": 1.0}


def test_summary_means_and_ratio_per_cell():
    runs = [
        ("a", [_row(8, 16, 1, 0.010), _row(8, 16, 64, 0.100), _row(4, 4, 1, 0.5)]),
        ("b", [_row(8, 16, 1, 0.009), _row(8, 16, 64, 0.104)]),
        ("a", [_row(8, 16, 1, 0.012), _row(8, 16, 64, 0.100)]),
        ("b", [_row(8, 16, 1, 0.011), _row(8, 16, 64, 0.106)]),
    ]
    s = gpu_ab.summarize(runs)
    assert [(c["N"], c["K"], c["M"]) for c in s] == [(8, 16, 1), (8, 16, 64)]  # 4x4 ran in build a only
    assert s[0]["a"] == [0.010, 0.012] and s[0]["b"] == [0.009, 0.011]
    assert s[0]["b_over_a"] == pytest.approx(0.010 / 0.011)
    assert s[1]["b_over_a"] == pytest.approx(0.105 / 0.100)
    text = gpu_ab.format_summary(s, ["a", "b"])
    assert "10.0/12.0" in text and "0.909" in text and "1.050" in text
    gm = (0.010 / 0.011 * 0.105 / 0.100) ** 0.5  # the cells' ratios, geometric mean
    assert gpu_ab.geomean_ratios(s, ["a", "b"]) == {"b": pytest.approx(gm)}
    assert text.splitlines()[-1].startswith("geometric mean") and f"{gm:.3f}" in text.splitlines()[-1]


def test_summary_needs_two_builds_and_takes_more():
    with pytest.raises(ValueError, match="at least two builds"):
        gpu_ab.summarize([("a", [_row(1, 1, 1, 1.0)])])
    runs = [
        ("a", [_row(8, 16, 1, 0.010), _row(4, 4, 1, 0.5)]),
        ("b", [_row(8, 16, 1, 0.009), _row(4, 4, 1, 0.4)]),
        ("c", [_row(8, 16, 1, 0.012)]),
    ]
    s = gpu_ab.summarize(runs)
    assert [(c["N"], c["M"]) for c in s] == [(8, 1)]  # 4x4 did not run in build c
    assert s[0]["b_over_a"] == pytest.approx(0.9) and s[0]["c_over_a"] == pytest.approx(1.2)
    text = gpu_ab.format_summary(s, ["a", "b", "c"])
    assert "0.900" in text and "1.200" in text and "12.0" in text


def test_rounds_alternate_and_every_run_is_saved(tmp_path, monkeypatch):
    """main(): builds a b, then b a, ...; gpu_ab.json holds every finished run at each point (a call that
    runs out of device time keeps them), the summary once both builds ran."""
    built, saved = [], []
    times = {"A": 0.010, "B": 0.009}
    monkeypatch.setattr(gpu_ab, "build", lambda objdir: built.append(objdir))

    def fake_run(cmd, **kw):
        out = cmd[cmd.index("--out") + 1]
        with open(os.path.join(out, "gpu_linear.json"), "w") as f:
            json.dump({"device": "fake", "rows": [_row(8, 16, 1, times[built[-1]])]}, f)
        if os.path.exists(tmp_path / "gpu_ab.json"):
            with open(tmp_path / "gpu_ab.json") as f:
                saved.append(len(json.load(f)["runs"]))

    monkeypatch.setattr(gpu_ab.subprocess, "run", fake_run)
    report = gpu_ab.main(["A", "B", "--rounds", "3", "--out", str(tmp_path), "--", "--ms", "1"])
    assert built == ["A", "B", "B", "A", "A", "B", "A"]  # the last: the extension left as build a
    assert saved == [1, 2, 3, 4, 5]  # before each later run, the runs so far were on disk
    assert [r["build"] for r in report["runs"]] == ["a", "b", "b", "a", "a", "b"]
    assert report["summary"][0]["b_over_a"] == pytest.approx(0.9)
    assert report["geomean_over_a"] == {"b": pytest.approx(0.9)}
    with open(tmp_path / "gpu_ab.json") as f:
        assert len(json.load(f)["runs"]) == 6
    gpu_ab.main(["A", "B", "--rounds", "1", "--no-restore", "--out", str(tmp_path)])
    assert built[-2:] == ["A", "B"]


def test_three_builds_rotate(tmp_path, monkeypatch):
    built = []
    times = {"A": 0.010, "B": 0.009, "C": 0.011}
    monkeypatch.setattr(gpu_ab, "build", lambda objdir: built.append(objdir))

    def fake_run(cmd, **kw):
        with open(os.path.join(cmd[cmd.index("--out") + 1], "gpu_linear.json"), "w") as f:
            json.dump({"device": "fake", "rows": [_row(8, 16, 1, times[built[-1]])]}, f)

    monkeypatch.setattr(gpu_ab.subprocess, "run", fake_run)
    report = gpu_ab.main(["A", "B", "C", "--rounds", "3", "--out", str(tmp_path)])
    assert built == ["A", "B", "C", "B", "C", "A", "C", "A", "B", "A"]  # each build once in each position
    assert report["summary"][0]["c_over_a"] == pytest.approx(1.1)
    with pytest.raises(SystemExit):
        gpu_ab.main(["A", "--out", str(tmp_path)])


def test_missing_out_directory_is_made(tmp_path, monkeypatch):
    """--out naming a directory that does not exist yet: it is made before the first run, whose result is
    then saved (a device call once lost its A/B to a FileNotFoundError after the first run)."""
    built = []
    monkeypatch.setattr(gpu_ab, "build", lambda objdir: built.append(objdir))

    def fake_run(cmd, **kw):
        with open(os.path.join(cmd[cmd.index("--out") + 1], "gpu_linear.json"), "w") as f:
            json.dump({"device": "fake", "rows": [_row(8, 16, 1, 0.01)]}, f)

    monkeypatch.setattr(gpu_ab.subprocess, "run", fake_run)
    out = tmp_path / "not" / "yet"
    report = gpu_ab.main(["A", "B", "--rounds", "1", "--out", str(out)])
    with open(out / "gpu_ab.json") as f:
        assert len(json.load(f)["runs"]) == 2 == len(report["runs"])


def test_budget_stops_in_time_to_restore_build_a(tmp_path, monkeypatch):
    """--budget-s: no run starts that, at the longest run's pace, would leave too little time to rebuild a;
    the runs so far are summarized and the extension is left as build a."""
    clock = [0.0]
    built = []
    monkeypatch.setattr(gpu_ab, "_now", lambda: clock[0])

    def fake_build(objdir):
        built.append(objdir)
        clock[0] += 10.0

    def fake_run(cmd, **kw):
        clock[0] += 30.0
        with open(os.path.join(cmd[cmd.index("--out") + 1], "gpu_linear.json"), "w") as f:
            json.dump({"device": "fake", "rows": [_row(8, 16, 1, {"A": 0.010, "B": 0.008}[built[-1]])]}, f)

    monkeypatch.setattr(gpu_ab, "build", fake_build)
    monkeypatch.setattr(gpu_ab.subprocess, "run", fake_run)
    report = gpu_ab.main(["A", "B", "--rounds", "3", "--budget-s", "100", "--out", str(tmp_path)])
    # a (0-40 s), b (40-80 s); a third run would end at 120 s: stopped, a rebuilt by 90 s
    assert built == ["A", "B", "A"] and clock[0] == 90.0
    assert report["stopped_before"] == "round 2, build b"
    assert report["summary"][0]["b_over_a"] == pytest.approx(0.8)
    with open(tmp_path / "gpu_ab.json") as f:
        assert json.load(f)["stopped_before"] == "round 2, build b"
    with pytest.raises(SystemExit):
        gpu_ab.main(["A", "B", "--budget-s", "0", "--out", str(tmp_path)])
