"""A/B of two CUDA builds of mixllm in one GPU-machine call: the layer table of each, alternating.

Device time is short and the GPU's clock drifts between calls, so two kernel variants are compared in
one process tree, in alternating rounds: for each round and each build, the extension is rebuilt in
place from that build's prebuilt objects (bench/gpu_prebuild.sh DIR, carried to the GPU machine; an
experimental variant with MIXC_NVCC_FLAGS=-D...) and `bench/gpu_linear.py ARGS` runs on it, the
builds' order swapped every round. Then, for every (N, K, M) cell, the mean W4.4A8 time of each build
and their ratio.

    MIXC_NVCC_FLAGS=-DMY_VARIANT bash bench/gpu_prebuild.sh .device_carry/cuobj_b   # here
    bash bench/gpu_prebuild.sh .device_carry/cuobj_a
    python3 bench/gpu_ab.py .device_carry/cuobj_a .device_carry/cuobj_b --rounds 2 --out $OUT \\
        -- --shapes 28672x8192,8192x28672 --ms 9,16,64                                       # there

Writes OUT/gpu_ab.json (every run's rows and the summary) after every run, so that a call that runs out of
time keeps what it measured, prints each run's cells as it lands and the summary at the end. The extension
is left built from build A (unless --no-restore).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def summarize(runs, key="w4.4a8"):
    """``runs``: [(build, rows)] with gpu_linear.py's rows (N, K, M and times). Returns one dict per
    cell present in every build's runs: the mean ``key`` time of each build, its runs' times and the
    ratio b / a (below 1: build b is faster)."""
    builds = []
    for b, _ in runs:
        if b not in builds:
            builds.append(b)
    if len(builds) != 2:
        raise ValueError(f"runs: expected two builds, got {builds}")
    times = {}
    for b, rows in runs:
        for r in rows:
            times.setdefault((r["N"], r["K"], r["M"]), {}).setdefault(b, []).append(r[key])
    out = []
    for (N, K, M), per in sorted(times.items()):
        if len(per) != 2:
            continue
        a, b = (sum(per[x]) / len(per[x]) for x in builds)
        out.append({"N": N, "K": K, "M": M, builds[0]: per[builds[0]], builds[1]: per[builds[1]], "b_over_a": b / a})
    return out


def format_summary(summary, builds, unit_scale=1e3):
    lines = [f"{'N':>6} {'K':>6} {'M':>5} | {builds[0] + ' (us)':>18} | {builds[1] + ' (us)':>18} | b/a"]
    for s in summary:
        ta = "/".join(f"{t * unit_scale:.1f}" for t in s[builds[0]])
        tb = "/".join(f"{t * unit_scale:.1f}" for t in s[builds[1]])
        lines.append(f"{s['N']:6d} {s['K']:6d} {s['M']:5d} | {ta:>18} | {tb:>18} | {s['b_over_a']:.3f}")
    return "\n".join(lines)


def build(objdir):
    shutil.rmtree(os.path.join(ROOT, "build"), ignore_errors=True)
    env = dict(os.environ, MIXLLM_CUDA="1")
    env.setdefault("MIXLLM_CUDA_ARCH", "-gencode=arch=compute_90a,code=sm_90a")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_fast_build.py"), objdir],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"{objdir}: the build failed (exit {done.returncode})")
    said = [line for line in done.stdout.splitlines() if line.startswith("gpu_fast_build:")]
    print(*said, sep="\n", flush=True)
    if not said or any("not reusing" in line for line in said):
        raise SystemExit(f"{objdir}: its objects were not reused (rerun bench/gpu_prebuild.sh for these sources)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="objects of build a (bench/gpu_prebuild.sh DIR)")
    ap.add_argument("b", help="objects of build b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-restore", action="store_true", help="leave the extension as the last run built it")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds: expected at least 1")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    report = {}

    def save():
        """The report so far (device time is short: a call that runs out keeps every finished run)."""
        report.update(
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            builds={"a": os.path.abspath(args.a), "b": os.path.abspath(args.b)},
            gpu_linear_args=rest,
            rounds=args.rounds,
            runs=[{"build": b, "rows": rows} for b, rows in runs],
            summary=summarize(runs) if {b for b, _ in runs} == {"a", "b"} else [],
        )
        with open(os.path.join(args.out, "gpu_ab.json"), "w") as f:
            json.dump(report, f, indent=1)

    for rnd in range(args.rounds):
        order = (("a", args.a), ("b", args.b))
        # the second of two runs in a row reads 1-3% slower (measured 2026-12-02: the same decode
        # kernel in both builds), so the order alternates: a b, b a, a b, ...
        for name, objdir in order if rnd % 2 == 0 else order[::-1]:
            build(objdir)
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run(
                    [sys.executable, os.path.join(ROOT, "bench", "gpu_linear.py"), *rest, "--out", tmp],
                    cwd=ROOT,
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                with open(os.path.join(tmp, "gpu_linear.json")) as f:
                    res = json.load(f)
            runs.append((name, res["rows"]))
            report["device"] = res.get("device")
            save()
            cells = " ".join(f"{r['N']}x{r['K']}/{r['M']}:{r['w4.4a8'] * 1e3:.1f}" for r in res["rows"])
            print(f"round {rnd + 1}, build {name} (W4.4A8 us): {cells}", flush=True)
    if not args.no_restore:
        build(args.a)
    summary = report["summary"]
    print(f"# {report['device']}, {report['date']}: W4.4A8 us per call, build a / build b (each round)")
    print(format_summary(summary, ["a", "b"]))
    return report


if __name__ == "__main__":
    main()
