"""A tiled model's image decision by its feature memory (#36), as a part of the
:class:`~ckaad_fast.model.Detector` (:class:`MemoryDecision`): the memory of the training
images' features (:mod:`ckaad_fast.feature_memory`) kept as a buffer the checkpoint and the
fingerprint carry, optionally the per-position statistics of the training images' maps
(:mod:`ckaad_fast.map_norm`) that pick where it looks, and the image scores it gives.
Measured in docs/BENCHMARKS.md ("Small defects on large images")."""
from __future__ import annotations

import torch

from .errors import ArgumentError
from .feature_memory import FeatureMemory
from .map_norm import MapNormalization, fit_map_normalization
from .profiling import nvtx_range
from .tiling import tiled_maps
from .validation import bad, is_int

__all__ = ["MemoryDecision", "MEMORY_KEY", "MAX_MEMORY_BYTES", "MEMORY_NORM_KEYS", "check_memory"]

#: The state-dict key of a tiled model's feature memory (present only where it has one).
MEMORY_KEY = "memory_vectors"
#: The largest feature memory a model keeps (bytes): above it, every k-th cell of each image.
MAX_MEMORY_BYTES = 2 << 30
#: The state-dict keys of the per-position statistics of the training images' maps (mean and
#: spread grids), present only where ``memory_norm_cell`` is set and they were fitted.
MEMORY_NORM_KEYS = ("memory_norm_mean", "memory_norm_spread")


def check_memory(kind: str, candidates, edge, tile_size, norm_cell=None) -> tuple[int | None, int]:
    """(memory_candidates, memory_edge) checked: None or an int >= 1 (0 is read as None: no
    memory), only for a tiled model; an edge of 0 or more cells; ``norm_cell`` None or an int
    >= 1 with a memory."""
    if candidates == 0 and is_int(candidates):
        candidates = None
    if candidates is not None:
        if not is_int(candidates) or candidates < 1:
            raise bad(kind, "memory_candidates", "be None (the top-k rule) or an int >= 1", candidates)
        if tile_size is None:
            raise bad(kind, "memory_candidates", "be None for a model that does not tile (the feature memory "
                      "decides for tiled models)", candidates)
    if not is_int(edge) or edge < 0:
        raise bad(kind, "memory_edge", "be an int >= 0 (grid cells)", edge)
    if norm_cell is not None and (not is_int(norm_cell) or norm_cell < 1 or candidates is None):
        raise bad(kind, "memory_norm_cell", "be None or an int >= 1 (pixels) with a feature memory "
                  "(memory_candidates)", norm_cell)
    return (None if candidates is None else int(candidates)), int(edge)


class MemoryDecision:
    """The Detector's feature memory and the decision it makes (a mixin: it uses the model's
    ``config``, ``backbone``, forward and buffers)."""

    def set_memory(self, memory: FeatureMemory | None) -> None:
        """Make ``memory`` this model's feature memory (None: drop it). Its vectors become the
        buffer :data:`MEMORY_KEY`, so a checkpoint and the fingerprint carry them."""
        if memory is None:
            self._buffers.pop(MEMORY_KEY, None)
            self._memory = None
            return
        cfg = self.config
        if cfg.tile_size is None:
            raise ArgumentError("memory", "a feature memory decides for a tiled model; this one does not tile")
        want = (cfg.backbone, tuple(cfg.layers), cfg.memory_scale)
        if (memory.backbone, tuple(memory.layers), memory.scale) != want:
            raise ArgumentError("memory", f"it holds {memory.backbone} layers {memory.layers} at scale {memory.scale:g}; "
                                f"this model needs {want[0]} layers {want[1]} at scale {want[2]:g}")
        device = next(self.backbone.parameters()).device
        self.register_buffer(MEMORY_KEY, memory.vectors.to(device))
        self._memory = None

    @property
    def memory(self) -> FeatureMemory | None:
        """The model's :class:`~ckaad_fast.feature_memory.FeatureMemory` (None: it has none),
        on the model's device."""
        vectors = self._buffers.get(MEMORY_KEY)
        if vectors is None:
            return None
        if getattr(self, "_memory", None) is None or self._memory.vectors is not vectors:
            cfg = self.config  # rebuilt after the buffer moved (.to) or was loaded
            self._memory = FeatureMemory(vectors, cfg.memory_scale, cfg.backbone, tuple(cfg.layers))
        return self._memory

    def fit_memory(self, images, max_bytes: int = MAX_MEMORY_BYTES) -> FeatureMemory:
        """Fit the feature memory on normal full-size ``images`` (normalised (3, H, W) tensors;
        a sequence is kept within ``max_bytes``), make it the model's, and return it."""
        memory = FeatureMemory.fit(self.backbone, images, self.config.memory_scale, max_bytes=max_bytes)
        self.set_memory(memory)
        return memory

    def fit_memory_normalization(self, images, batch: int = 16) -> None:
        """Fit the per-position statistics (``config.memory_norm_cell``) of the stitched maps of
        normal full-size ``images`` (normalised (3, H, W) tensors, at least two: the training
        images, after training; maps of other sizes than the first's are resized to it, since
        the statistics are kept by relative position) and keep them as buffers
        (:data:`MEMORY_NORM_KEYS`)."""
        cell = self.config.memory_norm_cell
        if not cell:
            raise ArgumentError("memory_norm_cell", "this model's configuration normalises no maps (None)")
        maps, was_training = [], self.training
        self.eval()  # the maps a scorer computes: the auto-encoder's normalisation layers in eval mode
        try:
            with torch.no_grad():
                for image in images:
                    amap = tiled_maps(image, self.config.tiling, self.config.image_size, lambda x: self(x),
                                      batch=batch)
                    if maps and amap.shape != maps[0].shape:  # statistics by relative position
                        amap = torch.nn.functional.interpolate(amap[None, None], size=maps[0].shape, mode="bilinear",
                                                               align_corners=False)[0, 0]
                    maps.append(amap.cpu().numpy())
        finally:
            self.train(was_training)
        norm = fit_map_normalization(maps, cell)
        device = next(self.backbone.parameters()).device
        for key, grid in zip(MEMORY_NORM_KEYS, (norm.mean, norm.spread)):
            self.register_buffer(key, torch.from_numpy(grid).to(device))

    def memory_map(self, amap: torch.Tensor):
        """The map the memory's candidates are picked from: ``amap`` as it is, or normalised per
        position (``config.memory_norm_cell``) by the training images' statistics."""
        if not self.config.memory_norm_cell:
            return amap
        grids = [self._buffers.get(k) for k in MEMORY_NORM_KEYS]
        if any(g is None for g in grids):
            raise ValueError("this model normalises its maps before the feature memory (memory_norm_cell) but holds "
                             "no statistics: they are fitted after training (fit_memory_normalization)")
        mean, spread = (g.cpu().numpy() for g in grids)
        norm = MapNormalization(self.config.memory_norm_cell, tuple(amap.shape), mean, spread, 0)
        return norm.apply(amap.cpu().numpy())

    def memory_scores(self, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """(B,) float32 image scores of normalised full-size ``images`` (B, 3, H, W) and their
        stitched ``maps`` (B, H, W) by the feature memory (:meth:`FeatureMemory.score` with the
        configuration's candidates and edge)."""
        memory = self.memory
        if memory is None:
            raise ValueError("this model decides by a feature memory (memory_candidates) but holds none: "
                             "call fit_memory with its normal training images first")
        scores = []
        with nvtx_range("memory"):
            for image, amap in zip(images, maps):
                feats = memory.features(self.backbone, image)
                # A grid too small for the recorded edge keeps its middle cell(s).
                edge = min(self.config.memory_edge, (min(feats.shape[-2:]) - 1) // 2)
                cells = memory.candidates(feats, self.memory_map(amap), self.config.memory_candidates, edge)
                scores.append(memory.distances(feats, cells).max())
        return torch.stack(scores).float()

    def make_room_for_memory(self, state: dict) -> None:
        """Before ``load_state_dict(state)``: the memory's buffers registered at the stored shapes
        (a ValueError when the configuration decides by a memory the state does not hold)."""
        vectors = state.get(MEMORY_KEY)
        if not self.config.memory_candidates:
            return
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2:
            raise ValueError("the checkpoint's configuration decides by a feature memory (memory_candidates) "
                             "but it holds none")
        self.register_buffer(MEMORY_KEY, torch.empty_like(vectors))
        for key in MEMORY_NORM_KEYS:
            if self.config.memory_norm_cell and isinstance(state.get(key), torch.Tensor):
                self.register_buffer(key, torch.empty_like(state[key]))
