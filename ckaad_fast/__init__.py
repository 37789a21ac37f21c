"""ckaad_fast: fused Triton kernels for CKAAD and other feature-reconstruction anomaly detectors."""

__version__ = "0.1.0"
