"""The whole scoring forward as one graph that runs outside Python: ONNX, for ONNX Runtime.

:class:`ScoringGraph` is what a production line deploys: ``image`` (B, 3, H, W) uint8 RGB in,
``score`` (B,), ``normalized_score`` (B,), ``is_anomalous`` (B,) bool and ``anomaly_map``
(B, H, W) float32 out. It normalises the raw pixels, runs the backbone and the auto-encoder, and
computes the anomaly map and the image score with standard operators only: the fused ops' exact
arithmetic written as sums of products (the cosine map) and two small matrix products per layer
(the upsampling and the blur, folded into the matrices the ops build from scipy's rules,
:func:`ckaad_fast.ops.scoring.upsample_blur_matrix`), so the exported graph needs no custom
operator. With a calibration in the checkpoint (:mod:`ckaad_fast.calibration`), the normalised
score and the decision are computed in the graph too; without one, ``normalized_score`` is the
raw score and ``is_anomalous`` is all false, and the sidecar says ``"calibrated": false``.

:func:`export_onnx` writes ``model.onnx`` and ``model.json``, the sidecar with the model's
fingerprint, image size, normalisation, calibration and the tool's and torch's versions.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .atomic import atomic_path, atomic_write_json
from .calibration import read_calibration
from .errors import ArgumentError
from .model import CKAAD, fingerprint, load_checkpoint, model_from_checkpoint
from .ops.scoring import upsample_blur_matrix

__all__ = ["ScoringGraph", "export_onnx", "FORMATS", "INPUT_NAME", "OUTPUT_NAMES"]

FORMATS = ("onnx",)
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "normalized_score", "is_anomalous", "anomaly_map")


class ScoringGraph(nn.Module):
    """uint8 images -> (score, normalized_score, is_anomalous, anomaly_map), standard ops only."""

    def __init__(self, model: CKAAD, calibration=None, sensitivity: float = 0.5):
        super().__init__()
        self.model = model.eval()
        cfg = model.config
        self.image_size = tuple(cfg.image_size)
        self.topk = cfg.topk
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1))
        h, w = self.image_size
        sizes = [(-(-h // s), -(-w // s)) for s in model.backbone.strides]
        for i, (hs, ws) in enumerate(sizes):
            rows = upsample_blur_matrix(hs, h, cfg.sigma, 4.0, cfg.border)
            cols = upsample_blur_matrix(ws, w, cfg.sigma, 4.0, cfg.border)
            self.register_buffer(f"rows{i}", torch.from_numpy(rows).float())
            self.register_buffer(f"cols{i}_t", torch.from_numpy(cols.T.copy()).float())
        self.layers = len(sizes)
        self.calibrated = calibration is not None
        t, lo, hi = ((calibration.image_threshold, calibration.score_min, calibration.score_max)
                     if calibration is not None else (0.0, 0.0, 1.0))
        self.register_buffer("threshold", torch.tensor(float(t)))
        self.register_buffer("span", torch.tensor(max(float(hi - lo), 1e-12)))
        self.register_buffer("cut", torch.tensor(1.0 - float(sensitivity)))

    def forward(self, image: torch.Tensor):
        x = (image.to(torch.float32) / 255.0 - self.mean) / self.std
        feats = self.model.backbone(x)
        recon = self.model.autoencoder(feats)
        amap = None
        for i, (f, r) in enumerate(zip(feats, recon)):
            f, r = f.float(), r.float()
            dot = (f * r).sum(1)
            na = (f * f).sum(1).sqrt().clamp_min(1e-8)
            nb = (r * r).sum(1).sqrt().clamp_min(1e-8)
            err = 1.0 - dot / (na * nb)  # (B, h, w): the cosine error map
            up = torch.matmul(torch.matmul(getattr(self, f"rows{i}"), err), getattr(self, f"cols{i}_t"))
            amap = up if amap is None else amap + up
        flat = amap.reshape(amap.shape[0], -1)
        score = flat.mean(1) if self.topk is None else torch.topk(flat, self.topk, dim=1).values.mean(1)
        if self.calibrated:
            normalized = torch.clamp((score - self.threshold) / self.span + 0.5, 0.0, 1.0)
            anomalous = normalized >= self.cut
        else:
            normalized = score
            anomalous = torch.zeros_like(score, dtype=torch.bool)
        return score, normalized, anomalous, amap


def export_onnx(checkpoint, out_dir, batch: int | None = None, sensitivity: float = 0.5,
                overwrite: bool = False) -> Path:
    """Export the scoring forward of ``checkpoint`` to ``out_dir/model.onnx`` (with its sidecar
    ``model.json``); ``batch``: a fixed batch size, or None for a dynamic one. Returns the file."""
    out = Path(out_dir)
    target = out / "model.onnx"
    if target.exists() and not overwrite:
        raise ArgumentError("out", f"{str(target)!r} exists: choose another folder or --overwrite")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ArgumentError("batch", f"must be a positive int or dynamic, got {batch!r}")
    try:
        ckpt = load_checkpoint(checkpoint)
        model = model_from_checkpoint(ckpt)
        calibration = read_calibration(ckpt)
    except (ValueError, FileNotFoundError) as e:
        raise ArgumentError("checkpoint", str(e)) from None
    graph = ScoringGraph(model, calibration, sensitivity).eval()
    h, w = graph.image_size
    example = torch.zeros((batch or 2, 3, h, w), dtype=torch.uint8)
    dynamic = None if batch is not None else {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}}
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), atomic_path(target) as tmp:
        program = torch.onnx.export(graph, (example,), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes=dynamic, dynamo=True, verbose=False)
        program.save(tmp)
    atomic_write_json(out / "model.json", {
        "format": "onnx",
        "file": target.name,
        "model_sha256": fingerprint(model),
        "backbone": model.config.backbone,
        "layers": list(model.config.layers),
        "image_size": [h, w],
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW RGB", "batch": batch or "dynamic"},
        "outputs": list(OUTPUT_NAMES),
        "normalization": {"mean": list(model.config.mean), "std": list(model.config.std)},
        "calibrated": calibration is not None,
        "calibration": calibration.to_dict() if calibration is not None else None,
        "sensitivity": sensitivity,
        "tool": f"ckaad_fast {__version__}",
        "torch": torch.__version__,
        "checkpoint": os.fspath(checkpoint),
    })
    return target
