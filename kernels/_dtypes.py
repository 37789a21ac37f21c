"""Accumulation dtypes shared by the kernels."""
import torch
import triton.language as tl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every input dtype, float64 for float64 inputs (so gradcheck sees exact math)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    """The Triton counterpart of :func:`acc_dtype`, passed to kernels as a constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32
