"""Build of the C core (mixllm._C) and, where nvcc is found, the CUDA kernels (mixllm._cuda).

Environment:
  MIXLLM_CUDA=0/1         skip / require the CUDA extension (default: build it when nvcc is found)
  MIXLLM_CUDA_ARCH        extra -gencode flags (default: sm_90a and sm_80)
  MIXLLM_SANITIZE=address,undefined   build the C core with sanitizers (hardening CI step)
No part is built against PyTorch's C++ ABI: arrays cross the boundary through DLPack.
"""

import glob
import os
import shutil
import subprocess
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
C_FLAGS = ["-std=c11", "-O3", "-fopenmp", "-Wall", "-Wno-unused-parameter"]
LINK_FLAGS = ["-fopenmp"]
sanitize = os.environ.get("MIXLLM_SANITIZE", "").strip()
if sanitize:
    C_FLAGS = [f for f in C_FLAGS if f != "-O3"] + ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}"]
    LINK_FLAGS += [f"-fsanitize={sanitize}"]

CORE_SOURCES = [
    "csrc/args.c",
    "csrc/dlpack_bridge.c",
    "csrc/quant.c",
    "csrc/gptq.c",
    "csrc/salience.c",
    "csrc/gemm_cpu.c",
    "csrc/cluster.c",
    "csrc/slim.c",
    "csrc/woq.c",
]
CUDA_GENCODE = os.environ.get(
    "MIXLLM_CUDA_ARCH",
    "-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80",
).split()


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
                return os.path.join(home, "bin", "nvcc")
    return nvcc


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc, the rest with the C compiler."""

    def build_extension(self, ext):
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if not cu:
            return super().build_extension(ext)
        nvcc = find_nvcc()
        objs = []
        os.makedirs(self.build_temp, exist_ok=True)
        py_inc = sysconfig.get_paths()["include"]
        for src in cu:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [
                nvcc,
                "-c",
                src,
                "-o",
                obj,
                "-O3",
                "-std=c++17",
                "-Xcompiler",
                "-fPIC",
                "--expt-relaxed-constexpr",
                "-Icsrc",
                "-I" + py_inc,
                *CUDA_GENCODE,
            ]
            print(" ".join(cmd))
            subprocess.check_call(cmd, cwd=HERE)
            objs.append(obj)
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        ext.extra_objects = objs
        cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        homes = [cuda_home] + [h for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if h]
        ext.library_dirs = [
            os.path.join(h, d)
            for h in homes
            for d in ("lib64", "lib", "targets/x86_64-linux/lib")
            if os.path.isdir(os.path.join(h, d))
        ]
        # static runtime: the module needs no libcudart at run time (the driver is enough)
        ext.libraries = ["cudart_static", "stdc++", "rt", "pthread", "dl"]
        return super().build_extension(ext)


ext_modules = [
    Extension(
        "mixllm._C",
        sources=["csrc/module.c", *CORE_SOURCES],
        include_dirs=["csrc"],
        extra_compile_args=C_FLAGS,
        extra_link_args=LINK_FLAGS,
    ),
]

want_cuda = os.environ.get("MIXLLM_CUDA", "auto")
cuda_sources = sorted(glob.glob(os.path.join("cuda", "*.cu")))
if want_cuda != "0" and cuda_sources and os.path.exists(os.path.join(HERE, "csrc", "cuda_module.c")):
    if find_nvcc():
        ext_modules.append(
            Extension(
                "mixllm._cuda",
                sources=["csrc/cuda_module.c", "csrc/args.c", "csrc/dlpack_bridge.c", *cuda_sources],
                include_dirs=["csrc"],
                extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wno-unused-parameter"],
            )
        )
    elif want_cuda == "1":
        raise RuntimeError("MIXLLM_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
