"""Build script for the optional C++/CUDA extension ``distprop_fast._C``.

The CPU extension (OpenMP) builds wherever a C++ compiler is found. The CUDA
sources join it when ``nvcc`` is found; ``nvcc`` on PATH may be a wrapper script,
so the toolkit root is found from the binary it runs. Set
``DISTPROP_NO_EXTENSION=1`` to skip the build; the pure-PyTorch path then runs.
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _real_nvcc(path):
    """Follow symlinks and ``exec`` wrapper scripts to the real nvcc binary."""
    path = os.path.realpath(path)
    for _ in range(4):
        with open(path, "rb") as handle:
            head = handle.read(4096)
        if head.startswith(b"\x7fELF") or not head.startswith(b"#!"):
            return path
        match = re.search(rb"exec\s+\"?([^\s\"]+/nvcc)\"?", head)
        if match is None:
            return path
        path = os.path.realpath(match.group(1).decode())
    return path


def find_cuda_home():
    """Return the CUDA toolkit root, or ``None`` when no nvcc is found."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # The toolkit root is two levels above the real binary: ROOT/bin/nvcc.
    return os.path.dirname(os.path.dirname(_real_nvcc(nvcc)))


def default_cuda_arch_list():
    """Return the GPU architectures to compile for when no GPU is visible, or ``None``.

    With TORCH_CUDA_ARCH_LIST unset, torch.utils.cpp_extension compiles for the
    visible GPUs and fails when there are none. A build without a GPU then
    targets every architecture this torch build supports, newest with PTX.
    """
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return None
    arches = [a[3:] for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    if not arches:
        return None
    versions = [f"{int(a[:-1])}.{a[-1]}" for a in arches]
    versions[-1] += "+PTX"
    return ";".join(versions)


def extension_modules():
    if os.environ.get("DISTPROP_NO_EXTENSION") == "1":
        print("distprop_fast: DISTPROP_NO_EXTENSION=1, building no extension", file=sys.stderr)
        return [], {}
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if not cpu_sources:
        print("distprop_fast: no C++ sources, building no extension", file=sys.stderr)
        return [], {}

    cuda_home = find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    # torch 2.14 headers require C++20. The kernels use neither errno nor
    # floating-point traps, and without both flags GCC 12 keeps loops that call
    # sqrt or select between floats scalar.
    cxx_flags = ["-O3", "-fopenmp", "-std=c++20", "-fno-math-errno", "-fno-trapping-math"]
    sources = ["csrc/ext.cpp"] + cpu_sources
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = os.environ.get("DISTPROP_NO_CUDA") != "1"
    if cuda_home is not None and cuda_sources and want_cuda:
        cpp_extension.CUDA_HOME = cuda_home
        arch_list = default_cuda_arch_list()
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
            print(
                f"distprop_fast: no GPU visible, compiling for TORCH_CUDA_ARCH_LIST={arch_list} "
                "(set TORCH_CUDA_ARCH_LIST to build for fewer architectures)",
                file=sys.stderr,
            )
        ext = cpp_extension.CUDAExtension(
            "distprop_fast._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
        built = f"CPU (OpenMP) and CUDA ({cuda_home})"
    else:
        ext = cpp_extension.CppExtension(
            "distprop_fast._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
        reason = "no nvcc found" if cuda_home is None else "CUDA disabled or no .cu sources"
        built = f"CPU (OpenMP) only, {reason}"
    print(f"distprop_fast: building extension backends: {built}", file=sys.stderr)
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=False)}
    return [ext], cmdclass


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
