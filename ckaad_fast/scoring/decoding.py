"""Decoding image files on DataLoader worker processes, for the scorer's streams.

A file that cannot be decoded gives an error marker instead of an exception, so one bad file
never stops the stream: :func:`collate` splits a batch into the decoded images and the errors.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch.utils.data import Dataset

from ..data import ImageRejected, decode_image
from ..errors import error_text
from ..profiling import enable_nvtx, nvtx_range

__all__ = ["DecodeDataset", "collate", "default_workers", "error_text", "worker_init"]


class DecodeDataset(Dataset):
    """Items ``(index, image or None, error or None)``: a file that cannot be decoded gives an
    error marker instead of an exception, so one bad file never stops the stream."""

    def __init__(self, paths: Sequence[str], image_size, nvtx_on: bool, tiling=None):
        self.paths = list(paths)
        self.image_size = image_size
        self.nvtx_on = nvtx_on
        self.tiling = tiling  # a tiled model's: a file smaller than a tile is an error row

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with nvtx_range("decode"):
            try:
                image = decode_image(self.paths[i], self.image_size)
                if self.tiling is not None and not self.tiling.fits(*image.shape[-2:]):
                    raise ImageRejected(self.tiling.too_small(*image.shape[-2:]))
                return i, image, None
            except Exception as e:  # noqa: BLE001 - any failure to read is reported, not raised
                return i, None, error_text(e)


def worker_init(worker_id: int) -> None:
    # Decoding is single-threaded work; torch's intra-op threads would only oversubscribe cores.
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        enable_nvtx(info.dataset.nvtx_on)


def collate(items):
    """(indices of the decoded items, their images stacked, [(index, error)] of the others)."""
    good = [(i, x) for i, x, err in items if err is None]
    errors = [(i, err) for i, x, err in items if err is not None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    if not good:
        return idx, None, errors
    imgs = [x for _, x in good]
    if any(x.dtype != torch.uint8 for x in imgs):
        # A 16-bit image in the batch: convert the 8-bit ones exactly as load_image does.
        imgs = [x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x for x in imgs]
    # One image (a tiled model's stream): a view, not a copy of what may be hundreds of megabytes.
    return idx, imgs[0][None] if len(imgs) == 1 else torch.stack(imgs), errors



def default_workers(num_workers: int | None, n_paths: int, batch_size: int, device: torch.device) -> int:
    """The decoding processes of a stream: ``num_workers`` when given, else a number from the CPU
    count (shared by the processes torchrun starts on the machine)."""
    if num_workers is not None:
        return num_workers
    if n_paths <= batch_size:
        return 0  # starting processes costs more than decoding one batch
    cpus = os.cpu_count() or 1
    try:
        # Under torchrun the machine's cores are shared by its LOCAL_WORLD_SIZE processes.
        cpus = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    except ValueError:
        pass
    if device.type == "cuda":
        return max(1, min(8, cpus - 1))
    # On the CPU the model needs the cores far more than decoding does (a few ms per image
    # against tens of ms): one decoding process per 4 cores, none below 4.
    return min(4, cpus // 4)
