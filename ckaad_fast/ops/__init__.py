"""The fused ops: a functional API that knows nothing of CKAAD.

Every op has a float64 reference in :mod:`ckaad_fast.ops.reference`, a Triton path for CUDA
tensors and a vectorised PyTorch path for CPU tensors (choose with ``CKAAD_FAST_BACKEND`` or
:func:`backend`), and is registered with ``torch.library`` so that ``torch.compile(fullgraph=True)``
and CUDA graphs go through it.
"""
from . import reference
from ._backend import BACKENDS, backend, current_backend
from ._buffers import release_buffers
from .cosine import cosine_error_map, cosine_error_map_float32, cosine_reconstruction_loss
from .energy import discriminator_loss, energy_hinge_loss, generator_loss
from .scoring import anomaly_map, anomaly_map_standard_ops, image_score, upsample_blur_sum

__all__ = [
    "release_buffers",
    "BACKENDS",
    "anomaly_map",
    "anomaly_map_standard_ops",
    "backend",
    "cosine_error_map",
    "cosine_error_map_float32",
    "cosine_reconstruction_loss",
    "current_backend",
    "discriminator_loss",
    "energy_hinge_loss",
    "generator_loss",
    "image_score",
    "reference",
    "upsample_blur_sum",
]
