"""atlas_kernels: Triton kernels for aTLAS (task vectors with learned anisotropic scaling).

The optional CUDA extension in csrc/ is not built by default (set ATLAS_BUILD_CUDA=1 once it exists).
"""
from setuptools import find_packages, setup

setup(
    name="atlas_kernels",
    version="0.1.0",
    description="Fast, memory-lean aTLAS: compose task vectors with learned per-block coefficients",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tested: 3.11 (CI) and 3.12 (the lent GPU)
    packages=find_packages(include=["atlas_kernels", "atlas_kernels.*"]),
    install_requires=[
        "torch>=2.11",  # tested: 2.11.0 (.ci/oldest.sh) and 2.14.1 (.ci/run)
        # Triton ships with Linux builds of torch; listed so the kernels' dependency is explicit.
        "triton; platform_system == 'Linux'",
        "open_clip_torch>=2.24",  # tested: 2.24.0 (.ci/oldest.sh) and 3.3.0
        "numpy",
        "safetensors>=0.4.5",  # tested: 0.4.5 (.ci/oldest.sh) and 0.8.0
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark"],
        # matplotlib draws the benchmark's plot and the training heatmap.
        "bench": ["pytest-benchmark", "matplotlib"],
        "train": ["matplotlib"],
    },
)
