"""Is a GPU usable here? The one place that asks CUDA, beneath everything that needs to know
(:mod:`ckaad_fast.precision` builds its device checks on it, :mod:`ckaad_fast.distributed` its
process group)."""
from __future__ import annotations

__all__ = ["cuda_usable", "default_device"]


def cuda_usable() -> bool:
    """Whether this machine has a CUDA device torch can use."""
    import torch  # here, not above: a deployment without torch imports this module's callers

    return torch.cuda.is_available()


def default_device() -> str:
    """"cuda" where a GPU is usable, else "cpu": what a command runs on when told nothing."""
    return "cuda" if cuda_usable() else "cpu"
