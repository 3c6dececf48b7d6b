"""Sources and flags of the compiled extension ``atlas_kernels._C`` (used by setup.py).

- CPU kernels always; CUDA kernels when ``CUDA_HOME`` is set (compiled for ``TORCH_CUDA_ARCH_LIST``,
  default ``"8.0;9.0"``: sm_80 and sm_90).
- x86-64: ``-mavx2 -mfma -mf16c`` (the CPU kernels decode compact storage with AVX2/F16C); set
  ``ATLAS_KERNELS_EXT_NO_AVX2=1`` to build the portable scalar loops instead.
"""
import os
import platform

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(*parts):
    return os.path.relpath(os.path.join(HERE, *parts), os.path.dirname(HERE))


def extension():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # pip's isolated build environment has no torch
        raise RuntimeError(
            "ATLAS_KERNELS_BUILD_EXT=1 needs torch importable while building: run "
            "`ATLAS_KERNELS_BUILD_EXT=1 pip install -e . --no-build-isolation`") from exc
    sources = [_rel("atlas_ops.cpp"), _rel("cpu", "atlas_cpu.cpp"), _rel("cpu", "atlas_fused_linear.cpp")]
    cxx = ["-O3"]  # the C++ standard is the one torch asks for (C++20 for torch >= 2.10)
    if platform.system() == "Linux":
        # at::parallel_for is a header template: without -fopenmp (_OPENMP undefined) it compiles to a
        # plain serial call, and every CPU kernel of the extension ran on one thread whatever
        # torch.get_num_threads() said. Compile only: the GOMP symbols resolve to the OpenMP runtime
        # torch itself loads, so the process keeps one thread pool.
        cxx += ["-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("ATLAS_KERNELS_EXT_NO_AVX2") != "1":
        cxx += ["-mavx2", "-mfma", "-mf16c"]
    if os.environ.get("CUDA_HOME"):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "atlas_kernels._C", sources + [_rel("cuda", "atlas_cuda.cu")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        )
    else:
        ext = CppExtension("atlas_kernels._C", sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}
