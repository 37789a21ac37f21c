"""ckaad_fast: fused Triton kernels for CKAAD and other feature-reconstruction anomaly detectors."""

__version__ = "0.1.0"


def _source_tree_kernels() -> None:
    """Make ``ckaad_fast.kernels`` importable from a bare checkout.

    The kernels live in the top-level folder ``kernels/`` and an install maps them to
    ``ckaad_fast.kernels`` (setup.py). Run from a checkout that is not installed (or whose
    editable install failed, e.g. with an older setuptools under ``--no-build-isolation``), that
    sub-package would be missing and every CUDA tensor would raise: so, only then, a finder maps
    the one name to the folder beside this package. An installed package never takes this path.
    """
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    folder = here.parent / "kernels"
    if (here / "kernels").exists() or not (folder / "__init__.py").is_file() or not (here.parent / "setup.py").is_file():
        return
    name = f"{__name__}.kernels"

    class _KernelsFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    # Appended: an install's own finder (editable or not) still wins.
    sys.meta_path.append(_KernelsFinder())


_source_tree_kernels()
del _source_tree_kernels
