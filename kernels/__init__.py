"""Triton kernels and their launchers. Installed as ``ckaad_fast.kernels``.

Kernels know nothing of models: they take tensors and sizes, check shapes, allocate outputs with
``new_empty`` and never synchronise.
"""
