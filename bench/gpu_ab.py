"""A/B (or A/B/C...) of CUDA builds of mixllm in one GPU-machine call: the layer table of each, rotating.

Device time is short and the GPU's clock drifts between calls, so kernel variants are compared in one
process tree, in rotating rounds: for each round and each build, the extension is rebuilt in place from
that build's prebuilt objects (bench/gpu_prebuild.sh DIR, carried to the GPU machine; an experimental
variant with MIXC_NVCC_FLAGS=-D...) and `bench/gpu_linear.py ARGS` runs on it, the builds' order rotated
every round (two builds: a b, b a, ...). Then, for every (N, K, M) cell, the mean W4.4A8 time of each build
and its ratio to build a's.

    MIXC_NVCC_FLAGS=-DMY_VARIANT bash bench/gpu_prebuild.sh .device_carry/cuobj_b   # here
    bash bench/gpu_prebuild.sh .device_carry/cuobj_a
    python3 bench/gpu_ab.py .device_carry/cuobj_a .device_carry/cuobj_b --rounds 2 --out $OUT \\
        -- --shapes 28672x8192,8192x28672 --ms 9,16,64                                       # there

Writes OUT/gpu_ab.json (every run's rows and the summary) after every run, so that a call that runs out of
time keeps what it measured, prints each run's cells as it lands and the summary at the end. The extension
is left built from build A (unless --no-restore). With --budget-s SECONDS no run starts that would, at the
pace of the longest run so far, leave too little time to restore build A within SECONDS: a device call
under a timeout then ends with build A in place (measurements after the A/B in the same call would
otherwise run on whichever build was last) and the summary of the runs that finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_now = time.monotonic  # replaced in the tests


def summarize(runs, key="w4.4a8"):
    """``runs``: [(build, rows)] with gpu_linear.py's rows (N, K, M and times), two or more builds. Returns
    one dict per cell present in every build's runs: each build's ``key`` times and, for every build x after
    the first (a), the ratio of the means ``x_over_a`` (below 1: build x is faster)."""
    builds = []
    for b, _ in runs:
        if b not in builds:
            builds.append(b)
    if len(builds) < 2:
        raise ValueError(f"runs: expected at least two builds, got {builds}")
    times = {}
    for b, rows in runs:
        for r in rows:
            times.setdefault((r["N"], r["K"], r["M"]), {}).setdefault(b, []).append(r[key])
    out = []
    for (N, K, M), per in sorted(times.items()):
        if len(per) != len(builds):
            continue
        mean = {x: sum(per[x]) / len(per[x]) for x in builds}
        cell = {"N": N, "K": K, "M": M, **{x: per[x] for x in builds}}
        cell.update({f"{x}_over_{builds[0]}": mean[x] / mean[builds[0]] for x in builds[1:]})
        out.append(cell)
    return out


def geomean_ratios(summary, builds):
    """{build: geometric mean over the cells of its time over build a's} for every build after the first: one
    number per variant, so that a cell or two moving with the run does not decide an A/B."""
    out = {}
    for b in builds[1:]:
        rs = [s[f"{b}_over_{builds[0]}"] for s in summary]
        if rs:
            out[b] = math.exp(sum(math.log(r) for r in rs) / len(rs))
    return out


def format_summary(summary, builds, unit_scale=1e3):
    head = " | ".join(f"{b + ' (us)':>18}" for b in builds)
    ratios = " ".join(f"{b}/{builds[0]:<3}" for b in builds[1:])
    lines = [f"{'N':>6} {'K':>6} {'M':>5} | {head} | {ratios}"]
    for s in summary:
        ts = " | ".join(f"{'/'.join(f'{t * unit_scale:.1f}' for t in s[b]):>18}" for b in builds)
        rs = " ".join(f"{s[f'{b}_over_{builds[0]}']:<5.3f}" for b in builds[1:])
        lines.append(f"{s['N']:6d} {s['K']:6d} {s['M']:5d} | {ts} | {rs}")
    if summary:
        gm = geomean_ratios(summary, builds)
        width = len(lines[0]) - len(ratios)  # the ratios' column
        lines.append(f"{'geometric mean':<{width}}" + " ".join(f"{gm[b]:<5.3f}" for b in builds[1:]))
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
    ap.add_argument("builds", nargs="+", metavar="DIR", help="objects of builds a, b, ... (bench/gpu_prebuild.sh DIR)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-restore", action="store_true", help="leave the extension as the last run built it")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="start no run that could keep build A from being restored in time"
    )
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds: expected at least 1")
    if args.budget_s is not None and args.budget_s <= 0:
        ap.error(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")
    if not 2 <= len(args.builds) <= 8:
        ap.error(f"DIR: expected 2 to 8 builds, got {len(args.builds)}")
    names = [chr(ord("a") + i) for i in range(len(args.builds))]
    os.makedirs(args.out, exist_ok=True)  # before any run: a missing --out directory would lose the first one
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    report = {}

    def save():
        """The report so far (device time is short: a call that runs out keeps every finished run)."""
        report.update(
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            builds={n: os.path.abspath(d) for n, d in zip(names, args.builds)},
            gpu_linear_args=rest,
            rounds=args.rounds,
            runs=[{"build": b, "rows": rows} for b, rows in runs],
            summary=summarize(runs) if {b for b, _ in runs} == set(names) else [],
        )
        report["geomean_over_a"] = geomean_ratios(report["summary"], names)
        with open(os.path.join(args.out, "gpu_ab.json"), "w") as f:
            json.dump(report, f, indent=1)

    t0 = _now()
    longest_run = longest_build = 0.0
    stopped = None
    for rnd in range(args.rounds):
        order = list(zip(names, args.builds))
        # the second of two runs in a row reads 1-3% slower (measured 2026-12-02: the same decode
        # kernel in both builds), so the order rotates: a b c, b c a, c a b, ... (two builds: a b, b a)
        for name, objdir in order[rnd % len(order) :] + order[: rnd % len(order)]:
            if args.budget_s is not None and runs and _now() - t0 + longest_run + longest_build > args.budget_s:
                stopped = f"round {rnd + 1}, build {name}"
                break
            t_run = _now()
            build(objdir)
            longest_build = max(longest_build, _now() - t_run)
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
            longest_run = max(longest_run, _now() - t_run)
            runs.append((name, res["rows"]))
            report["device"] = res.get("device")
            save()
            cells = " ".join(f"{r['N']}x{r['K']}/{r['M']}:{r['w4.4a8'] * 1e3:.1f}" for r in res["rows"])
            print(f"round {rnd + 1}, build {name} (W4.4A8 us): {cells}", flush=True)
        if stopped:
            print(f"stopped before {stopped}: --budget-s {args.budget_s:g} (the runs so far are kept)", flush=True)
            report["stopped_before"] = stopped
            save()
            break
    if not args.no_restore:
        build(args.builds[0])
    summary = report["summary"]
    print(f"# {report['device']}, {report['date']}: W4.4A8 us per call, builds {' / '.join(names)} (each round)")
    print(format_summary(summary, names))
    return report


if __name__ == "__main__":
    main()
