"""The interface every runtime engine keeps: ``engine(x)`` takes normalised float32 images
(B, 3, H, W) as a torch tensor and returns ``(scores (B,), maps (B, H, W))`` as float32 torch
tensors. Each runtime is one subclass in a file of its own (:mod:`.onnxruntime_engine`,
:mod:`.openvino_engine`), which loads or compiles its graph in one place and implements
:meth:`RuntimeEngine.run` on numpy arrays; :mod:`.engines` picks the class by name."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

__all__ = ["RuntimeEngine"]


class RuntimeEngine(ABC):
    """One runtime running one engine graph on the CPU (see the module). :attr:`name` is the
    engine's name, :attr:`dtype` what it really computes in, :attr:`path` the graph's file
    (None for a graph held in memory)."""

    name: str = ""

    def __init__(self, dtype: torch.dtype, path=None):
        self.dtype = dtype
        self.path = path

    @abstractmethod
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, maps)`` of a contiguous float32 array of normalised images (each runtime's own)."""

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        score, amap = self.run(arr)
        return torch.from_numpy(np.asarray(score, dtype=np.float32)), torch.from_numpy(np.asarray(amap, dtype=np.float32))
