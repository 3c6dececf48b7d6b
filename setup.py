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
    python_requires=">=3.11",  # tested: 3.11 (CI) and 3.12 (the lent GPU)
    # bench too: with it installed (pip install -e ".[bench]"), python -m bench answers from any
    # folder, not only from the repository root. Its workers still run from the repository.
    packages=find_packages(include=["atlas_kernels", "atlas_kernels.*", "bench"]),
    install_requires=[
        "torch>=2.11",  # tested: 2.11.0 (.ci/oldest.sh) and 2.14.1 (.ci/run)
        # Triton is not listed: Linux builds of torch pin the triton they were built with, and an
        # unpinned "triton" here made pip first download the newest triton (286 MB) and then
        # replace it with torch's pin. The kernels use whichever triton torch brings.
        "open_clip_torch>=2.24",  # tested: 2.24.0 (.ci/oldest.sh) and 3.3.0
        "numpy",
        "safetensors>=0.4.5",  # tested: 0.4.5 (.ci/oldest.sh) and 0.8.0
    ],
    extras_require={
        # timm and transformers: test_towers.py patches tiny timm ViT/ConvNeXt and Hugging Face
        # CLIPVisionModel towers (timm comes with open_clip_torch; transformers adds about 70 s of
        # pip install on a loaded 2-core machine, and test_towers skips its case without it).
        "test": ["pytest>=7", "pytest-benchmark", "timm", "transformers"],
        # matplotlib draws the benchmark's plot and the training heatmap.
        "bench": ["pytest-benchmark", "matplotlib"],
        "train": ["matplotlib"],
        # A peer's own code beside ours: `python -m bench` runs FusionBench's LayerWiseMergedModel (the
        # AdaMerging layer-wise wrapper: the same composition, trained the paper's way) as the method
        # `fusionbench` where this is installed, so that one comparison is against their code, not our
        # re-implementation (bench/peers.py). Pinned: the version the bench was checked with. Not in the
        # core install nor in [bench]: it pulls 33 packages, about 400 MB (pyarrow, pandas, lightning,
        # hydra, datasets, tensorboard, ...; 25 s of pip install here), none of which this library uses.
        "peers": ["fusion-bench==0.2.33"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
