"""The data plumbing of training: the shuffled loaders of every epoch, their seeds, and the RNG
states a checkpoint carries so that a resumed run continues bit for bit.

Data: the industrial protocol (no real anomalies) pairs every normal batch with its own elastic
distortion (:class:`WithDistortion`, redrawn each epoch); with a coarse anomaly set (the medical
protocol) a separate loader of batch ``min(batch_size, n)`` cycles, reshuffled at every pass
(:func:`cycle`). The normal loader drops its last incomplete batch. Every loader's order comes
from a generator seeded with (seed, epoch, stream), so the same configuration draws the same
batches on 1 or N processes.
"""
from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data import PseudoAnomalyDataset
from ..data.files import warn_skip
from ..distributed import GlobalBatchSampler
from ..errors import ArgumentError
from ..tiling import Tiling

__all__ = ["Images", "TileImages", "WithDistortion", "epoch_loader", "cycle", "seed_everything", "rng_state", "set_rng_state"]


class Images(Dataset):
    """Only the image (item[0]) of any of the library's data sets: cheaper to collate."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0]


class TileImages(Dataset):
    """The tiles of every image of a data set of full-size images (:mod:`ckaad_fast.tiling`):
    item k is ``(tile, label)``, the tile a (3, h, w) tensor at the model's ``input_size`` (resized, bilinear and
    antialiased, when the tile size differs). Every tile of an image has its label, so an
    anomalous image's tiles are all anomalous (the paper's patch argument: the image-level
    discriminator sees parts of anomalous images as anomalous). ``labels``: per tile.

    Each image is decoded once when the set is indexed (its size fixes its grid) and kept, up to
    ``cache_bytes`` of decoded images (least recently used first out); past that, a tile decodes
    its image again."""

    def __init__(self, dataset, tiling: Tiling, input_size, cache_bytes: int = 4 << 30):
        self.dataset, self.tiling, self.input_size = dataset, tiling, tuple(input_size)
        self.mean = getattr(dataset, "mean", None)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self.index: list[tuple[int, int, int]] = []
        labels = getattr(dataset, "labels", None)
        self.labels = []
        smaller = []
        for i in range(len(dataset)):
            image = self._image(i)
            h, w = image.shape[-2:]
            if not tiling.fits(h, w):  # left out with a warning, as data sets leave out odd files
                smaller.append((i, h, w))
                continue
            for y, x in tiling.grid(h, w):
                self.index.append((i, y, x))
                self.labels.append(int(labels[i]) if labels is not None else 0)
        if smaller and not self.index:
            i, h, w = smaller[0]
            raise ArgumentError("tile_size", f"{tiling.size} is larger than every image of the data set (image {i} "
                                f"is {w}x{h} pixels): use a tile size <= {min(h, w)}, or no tiling")
        paths = getattr(dataset, "paths", None)
        for i, h, w in smaller:
            warn_skip(paths[i] if paths is not None else f"image {i} of the data set", tiling.too_small(h, w))

    def _image(self, i: int) -> torch.Tensor:
        image = self._cache.get(i)
        if image is not None:
            self._cache.move_to_end(i)
            return image
        item = self.dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        self._cache[i] = image
        self._cached_bytes += image.nbytes
        while len(self._cache) > 1 and self._cached_bytes > self.cache_bytes:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return image

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        i, y, x = self.index[k]
        s = self.tiling.size
        tile = self._image(i)[:, y:y + s, x:x + s]
        if (s, s) != self.input_size:
            tile = F.interpolate(tile[None].float(), size=self.input_size, mode="bilinear", align_corners=False,
                                 antialias=True)[0]
        return tile.contiguous(), self.labels[k]


class WithDistortion(Dataset):
    """(normal image, its elastic distortion): the industrial protocol's paired batches."""

    def __init__(self, pseudo: PseudoAnomalyDataset):
        self.pseudo = pseudo

    def __len__(self):
        return len(self.pseudo)

    def __getitem__(self, i):
        image = self.pseudo.normal_dataset[i][0]
        return image, self.pseudo.distort(image, i)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _seed_worker(_worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def epoch_loader(dataset, batch_size: int, cfg, epoch: int, stream: int, drop_last: bool,
                 world: int = 1) -> DataLoader:
    """The shuffled loader of one epoch; ``batch_size`` is the global batch. With ``world`` > 1
    processes, this rank's part (``batch_size // world`` images) of the same global batches."""
    g = torch.Generator()
    g.manual_seed(_derived_seed(cfg.seed, epoch, stream))
    common = dict(num_workers=cfg.num_workers, generator=g, worker_init_fn=_seed_worker if cfg.num_workers else None,
                  pin_memory=torch.device(cfg.device).type == "cuda")
    if world == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, **common)
    sampler = GlobalBatchSampler(dataset, batch_size, g, drop_last=drop_last)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size // world, sampler=sampler, drop_last=drop_last, **common)


def cycle(loader: DataLoader):
    """Iterate ``loader`` forever, reshuffling at every pass (unlike itertools.cycle)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the anomaly loader yields no batch")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (the model's initialisation draws from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

