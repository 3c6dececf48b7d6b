"""atlas_kernels: Triton kernels for aTLAS (task vectors with learned anisotropic scaling).

The optional compiled extension in csrc/ is not built by default: ATLAS_KERNELS_BUILD_EXT=1 builds
its CPU kernels, plus the CUDA kernels when CUDA_HOME is set (see csrc/README.md).
"""
import os

from setuptools import find_packages, setup

# ---- optional compiled extension (csrc/): opt-in, never required --------------------------------
ext_modules, cmdclass = [], {}
if os.environ.get("ATLAS_KERNELS_BUILD_EXT") == "1":
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
    from build_ext import extension  # noqa: E402  (csrc/build_ext.py: sources and flags)

    ext_modules, cmdclass = extension()

setup(
    name="atlas_kernels",
    version="0.1.0",
    description="Fast, memory-lean aTLAS: compose task vectors with learned per-block coefficients",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["atlas_kernels", "atlas_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        # Triton ships with Linux builds of torch; listed so the kernels' dependency is explicit.
        "triton; platform_system == 'Linux'",
        "open_clip_torch>=2.24",
        "numpy",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark"],
        # matplotlib draws the benchmark's plot and the training heatmap.
        "bench": ["pytest-benchmark", "matplotlib"],
        "train": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
