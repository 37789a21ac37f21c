"""Accumulation dtypes: the one rule for the kernels and the PyTorch paths of the ops alike.

Importable without Triton (the PyTorch paths use :func:`acc_dtype` where Triton is missing);
only :func:`tl_acc_dtype` needs it.
"""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every input dtype, float64 for float64 inputs (so gradcheck sees exact math)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    """The Triton counterpart of :func:`acc_dtype`, passed to kernels as a constexpr."""
    import triton.language as tl  # here, not at the top: see the module's docstring

    return tl.float64 if dtype == torch.float64 else tl.float32
