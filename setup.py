"""The one part of the packaging that needs code: the Triton kernels live in the top-level folder
kernels/ but are installed as the sub-package ckaad_fast.kernels, so that no top-level module named
`kernels` is ever put on a user's path. Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ckaad_fast", "ckaad_fast.*"]) + ["ckaad_fast.kernels"],
    package_dir={"ckaad_fast": "ckaad_fast", "ckaad_fast.kernels": "kernels"},
)
