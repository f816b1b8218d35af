"""Build mixllm's extensions in place on a GPU machine, reusing CUDA objects compiled beforehand.

Device time is what a GPU session is short of, and compiling cuda/*.cu there takes most of a minute.
`bench/gpu_prebuild.sh DIR` compiles them here (sm_90a) into DIR with the nvcc version and the
-gencode flags beside them; carry DIR to the GPU machine and run `python3 bench/gpu_fast_build.py DIR`
there (with MIXLLM_CUDA_ARCH="-gencode=arch=compute_90a,code=sm_90a", as bench/gpu_check.sh sets on
Hopper): setup.py's build runs as usual, except that an nvcc step whose object is in DIR copies it
instead, only when the machine's nvcc reports the same version, the step asks for the same
-gencode flags and the sources (cuda/*, csrc/*.h) are those the objects were compiled from (else it
compiles: objects of older sources linked against a newer C module break at run time). Then run with
PYTHONPATH set to the repository root (an in-place build, not an install).
"""

import os
import shutil
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def nvcc_version():
    try:
        return subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def sources_digest(root=ROOT):
    """sha256 over the files the CUDA objects are compiled from (also written by bench/gpu_prebuild.sh)."""
    import hashlib

    h = hashlib.sha256()
    for d, exts in (("cuda", (".cu", ".cuh", ".h")), ("csrc", (".h",))):
        for name in sorted(os.listdir(os.path.join(root, d))):
            if name.endswith(exts):
                h.update(name.encode())
                with open(os.path.join(root, d, name), "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: python3 bench/gpu_fast_build.py DIR  (DIR from bench/gpu_prebuild.sh)")
    pre = os.path.abspath(sys.argv[1])
    stamp, arch_file = os.path.join(pre, "nvcc_version.txt"), os.path.join(pre, "gencode.txt")
    have = nvcc_version()
    reuse = os.path.exists(stamp) and have is not None and open(stamp).read().strip() == have
    digest_file = os.path.join(pre, "sources.sha256")
    if reuse and (not os.path.exists(digest_file) or open(digest_file).read().strip() != sources_digest()):
        print("gpu_fast_build: the objects were compiled from other sources: rerun bench/gpu_prebuild.sh")
        reuse = False
    gencode = open(arch_file).read().split() if os.path.exists(arch_file) else None
    why = "nvcc, its stamp or the sources differ"
    extra_file = os.path.join(pre, "extra_flags.txt")  # MIXC_NVCC_FLAGS of bench/gpu_prebuild.sh
    extra = open(extra_file).read().strip() if os.path.exists(extra_file) else ""
    print(
        f"gpu_fast_build: {'reusing' if reuse else f'not reusing ({why})'} objects from {pre}"
        + (f" (built with {extra})" if reuse and extra else "")
    )
    os.environ.setdefault("MIXLLM_CUDA", "1")
    check_call = subprocess.check_call

    def build_step(cmd, *args, **kw):
        if reuse and cmd and os.path.basename(str(cmd[0])) == "nvcc" and [a for a in cmd if "-gencode" in a] == gencode:
            obj = cmd[cmd.index("-o") + 1]
            src = os.path.join(pre, os.path.basename(obj))
            if os.path.exists(src):
                dst = obj if os.path.isabs(obj) else os.path.join(kw.get("cwd") or ROOT, obj)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)
                return 0
        return check_call(cmd, *args, **kw)

    subprocess.check_call = build_step
    os.chdir(ROOT)
    setup = os.path.abspath("setup.py")
    sys.argv = [setup, "build_ext", "--inplace", "--force", "-j", "2"]
    exec(compile(open(setup).read(), setup, "exec"), {"__file__": setup, "__name__": "__main__"})


if __name__ == "__main__":
    if sys.argv[1:] == ["--digest"]:
        print(sources_digest())
    else:
        main()
