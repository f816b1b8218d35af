"""Fuzz driver for the public entry points of mixllm._C (atheris / libFuzzer).

  python fuzz/run.py list                          entry points and their targets
  python fuzz/run.py check                         fail if an entry point has only the generic target
  python fuzz/run.py fuzz NAME [libFuzzer args]    e.g. fuzz quantize_weight -max_total_time=20 DIR SEEDS
  python fuzz/run.py replay NAME FILE...           run saved inputs once (no libFuzzer), e.g. a crash file
  python fuzz/run.py sweep N [CORPUS_ROOT...]      every entry point in one process: its seeds, the
                                                   inputs under CORPUS_ROOT/NAME, and N random inputs
                                                   (the leak check: LeakSanitizer scans once, at exit)

Set MIXLLM_FUZZ_TORCH=1 to let the targets hand torch tensors over too (off by default: importing
torch under AddressSanitizer costs ~10 s per target). .ci/hardening.sh runs every target under the
ASan+UBSan build.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402,F401  (imported before instrumentation: not worth instrumenting)

import mixllm.ops  # noqa: E402,F401


def main(argv):
    if len(argv) < 2 or argv[1] not in ("list", "check", "fuzz", "replay", "sweep"):
        print(__doc__)
        return 2
    cmd = argv[1]
    if cmd in ("list", "check"):
        import targets

        names = targets.entry_points()
        missing = [n for n in names if n not in targets.TARGETS]
        for n in names:
            print(f"{n}: {'dedicated' if n in targets.TARGETS else 'generic (from _C.__signatures__)'}")
        if cmd == "check" and missing:
            print(f"entry points with only the generic target: {', '.join(missing)}")
        return 0
    if cmd == "sweep":
        import random

        import atheris
        import targets

        n_random, roots = int(argv[2]), [os.path.join(HERE, "corpus")] + argv[3:]
        total = 0
        for name in targets.entry_points():
            inputs = []
            for root in roots:
                d = os.path.join(root, name)
                if not os.path.isdir(d) and root == roots[0]:
                    d = os.path.join(root, "generic")
                if os.path.isdir(d):
                    for f in sorted(os.listdir(d)):
                        with open(os.path.join(d, f), "rb") as fh:
                            inputs.append(fh.read())
            r = random.Random(name)
            inputs += [bytes(r.randrange(256) for _ in range(r.randrange(1, 600))) for _ in range(n_random)]
            for data in inputs:
                targets.run_one(name, data, atheris.FuzzedDataProvider)
            total += len(inputs)
            print(f"sweep {name}: {len(inputs)} inputs")
        print(f"swept {total} inputs: {targets.STATS}")
        return 0
    name = argv[2]
    if cmd == "replay":
        import atheris
        import targets

        for path in argv[3:]:
            with open(path, "rb") as f:
                targets.run_one(name, f.read(), atheris.FuzzedDataProvider)
        print(f"replayed {len(argv) - 3} inputs: {targets.STATS}")
        return 0
    import atheris

    with atheris.instrument_imports():
        import dlfake  # noqa: F401
        import targets
    if name not in targets.entry_points():
        print(f"unknown entry point {name!r}; have {targets.entry_points()}")
        return 2

    def one_input(data):
        targets.run_one(name, data, atheris.FuzzedDataProvider)

    atheris.Setup([argv[0]] + argv[3:], one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
