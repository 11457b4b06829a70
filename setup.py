"""Build of effnlp_ext: compiles the C++ (and, with a CUDA torch, CUDA) ops into effnlp_ext._C.

torch must already be installed (pip install --no-build-isolation .); it is deliberately not a
build requirement, since an unpinned torch there would pull a multi-GB CUDA build.
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# Flags measured on x86_64 (see DESIGN.md §3): -fopenmp at compile AND link time, otherwise
# at::parallel_for runs on one thread; the CPU_CAPABILITY defines select the AVX2
# at::vec::Vectorized instead of the generic one. -g0 nearly halves the build time.
# No -std here: torch's BuildExtension adds the standard its headers need (torch 2.14's use C++20
# operator<=>, so a hard-coded -std=c++17 breaks every build against it).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"]
if os.uname().machine in ("x86_64", "AMD64"):
    CXX_FLAGS += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
LINK_FLAGS = ["-fopenmp"]


def want_cuda() -> bool:
    flag = os.environ.get("EFFNLP_WITH_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--extended-lambda", "--expt-relaxed-constexpr",
                "-DEFFNLP_WITH_CUDA"]
        extra_inc = os.environ.get("EFFNLP_CUDA_EXTRA_INCLUDE")
        if extra_inc:
            include_dirs += extra_inc.split(os.pathsep)
        return CUDAExtension(
            "effnlp_ext._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS + ["-DEFFNLP_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=LINK_FLAGS)
    return CppExtension(
        "effnlp_ext._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS)


setup(
    packages=find_packages(include=["effnlp_ext", "effnlp_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
