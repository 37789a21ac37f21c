"""The one part of the packaging that needs code: the Triton kernels live in the top-level folder
kernels/ but are installed as the sub-package ckaad_fast.kernels, so that no top-level module named
`kernels` is ever put on a user's path. The native CPU kernels' C source travels with them as
package data: it is compiled on the user's machine at first use (kernels/native.py), so the wheel
stays pure Python. Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ckaad_fast", "ckaad_fast.*"]) + ["ckaad_fast.kernels"],
    package_dir={"ckaad_fast": "ckaad_fast", "ckaad_fast.kernels": "kernels"},
    package_data={"ckaad_fast.kernels": ["*.c"]},
)
