"""Running on several processes with ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc_per_node N ...`` (or ``python -m torch.distributed.run``) starts N copies of a
command and tells each one who it is through the environment: ``RANK`` (0..WORLD_SIZE-1 over all
machines), ``LOCAL_RANK`` (0..N-1 on this machine), ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`init_distributed` reads them and joins the process group:

- the backend is NCCL when the run's device is a GPU and gloo on the CPU (``CKAAD_FAST_DIST_BACKEND``
  overrides it);
- on a GPU each process uses ``cuda:LOCAL_RANK`` (:func:`local_device`);
- next to an NCCL group, a gloo group carries the small Python objects (file lists, results,
  metrics) and the barriers, so that they never touch the GPUs.

Without torchrun (``WORLD_SIZE`` unset or 1) every helper here is the single-process identity:
``rank() == 0``, ``world_size() == 1``, ``barrier()`` does nothing, ``shard(x) == x``.

Test-only fault injection (``CKAAD_FAST_TEST_DIE_AFTER_BATCHES``) lives in :mod:`ckaad_fast.faults`,
re-exported here.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler

from .devices import cuda_usable, default_device
from .faults import DIE_ENV, DIE_EXIT_CODE, maybe_die_for_test

__all__ = [
    "DIE_ENV",
    "DIE_EXIT_CODE",
    "DistInfo",
    "GlobalBatchSampler",
    "all_gather_object",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "distributed_session",
    "gather_object",
    "info",
    "init_distributed",
    "is_distributed",
    "is_main",
    "local_device",
    "maybe_die_for_test",
    "rank",
    "run_on_main",
    "shard",
    "shard_bounds",
    "unshard",
    "world_size",
]

T = TypeVar("T")

_CPU_GROUP = None  # gloo group for objects and barriers when the default group is NCCL
_OWNED = False  # the group was created by init_distributed (and is destroyed by destroy_distributed)


@dataclass(frozen=True)
class DistInfo:
    """Who this process is: ``rank`` of ``world_size`` (``local_rank`` on its machine) and the
    backend (None in a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes shared files."""
    return rank() == 0


def info() -> DistInfo:
    if not is_distributed():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend())


def init_distributed(device: str | torch.device | None = None, backend: str | None = None,
                     timeout_minutes: float | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment.

    Args:
        device: the run's device (its type is enough): a CUDA device picks NCCL, the CPU gloo.
            None: CUDA when available.
        backend: force a backend ("nccl", "gloo"); default ``CKAAD_FAST_DIST_BACKEND`` or the
            automatic choice above.
        timeout_minutes: how long a collective waits for a slow rank (default
            ``CKAAD_FAST_DIST_TIMEOUT_MIN`` or 60). A rank that dies is detected by torchrun,
            which stops the others, well before that.

    Returns the :class:`DistInfo`. Does nothing (and returns a single-process DistInfo) when
    ``WORLD_SIZE`` is unset or 1, and nothing new when the group is already initialised (by
    this function or by the caller). On a GPU, sets the current CUDA device to ``LOCAL_RANK``.
    """
    global _CPU_GROUP, _OWNED
    if dist.is_available() and dist.is_initialized():
        return info()
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if "RANK" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but RANK is not set: launch with torchrun")
    local = _env_int("LOCAL_RANK", 0)
    dev_type = torch.device(device if device is not None else default_device()).type
    backend = backend or os.environ.get("CKAAD_FAST_DIST_BACKEND") or ("nccl" if dev_type == "cuda" else "gloo")
    if dev_type == "cuda":
        if not cuda_usable():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available")
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible: "
                               "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
    minutes = timeout_minutes if timeout_minutes is not None else float(
        os.environ.get("CKAAD_FAST_DIST_TIMEOUT_MIN", "60"))
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=minutes)}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local)
    # torch._dynamo, when first imported while a group exists, keeps references to it (seen with
    # torch 2.14), so that destroy_process_group cannot free it and its worker threads outlive the
    # interpreter: now and then a process then aborts at exit ("terminate called without an
    # active exception"). The library's ops import it on their first call anyway: import it first.
    importlib.import_module("torch._dynamo")
    dist.init_process_group(backend=backend, **kwargs)
    _OWNED = True
    _CPU_GROUP = dist.new_group(backend="gloo") if backend != "gloo" else None
    return info()


def destroy_distributed(wait: bool = True) -> None:
    """Leave the process group, if :func:`init_distributed` created it. ``wait``: first wait for
    every rank (a barrier), so that no collective is still being torn down when the group goes;
    pass False on an error path, where the other ranks may never come."""
    global _CPU_GROUP, _OWNED
    if _OWNED and dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier(group=_CPU_GROUP)
            time.sleep(0.01)  # let the backend's threads release the last collectives' buffers
        dist.destroy_process_group()
    _CPU_GROUP = None
    _OWNED = False


@contextlib.contextmanager
def distributed_session(device: str | torch.device | None = None) -> Iterator[DistInfo]:
    """``with distributed_session(device) as d:`` joins the group (when launched by torchrun)
    and leaves it on exit (after a barrier when the block ended normally)."""
    owned_before = dist.is_available() and dist.is_initialized()
    d = init_distributed(device)
    ok = False
    try:
        yield d
        ok = True
    finally:
        if not owned_before:
            destroy_distributed(wait=ok)


def local_device(device: str | torch.device) -> str | torch.device:
    """The device this process uses: ``cuda:LOCAL_RANK`` for a CUDA device under torchrun, else
    ``device`` itself (unchanged, outside a process group)."""
    if not is_distributed():
        return device
    if torch.device(device).type == "cuda":
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return torch.device(device)


# ------------------------------------------------------------------------------------------------
# Collectives (identities in a single process)
# ------------------------------------------------------------------------------------------------
def _cpu_group():
    return _CPU_GROUP


def barrier() -> None:
    """Wait for every rank (over gloo, never on a GPU)."""
    if is_distributed():
        dist.barrier(group=_cpu_group())


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled; for small objects and checkpoints)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=_cpu_group())
    return box[0]


def gather_object(obj: Any, dst: int = 0) -> list | None:
    """The list of every rank's ``obj`` (in rank order) on rank ``dst``; None on the others."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=_cpu_group())
    return out


def all_gather_object(obj: Any) -> list:
    """The list of every rank's ``obj`` (in rank order) on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_cpu_group())
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of ``tensor`` (a new tensor; on the run's device, as the backend wants)."""
    if not is_distributed():
        return tensor
    t = tensor.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world_size()


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; an exception it raises is
    raised on every rank (so that no rank is left waiting in a collective)."""
    if not is_distributed():
        return fn()
    payload = None
    if rank() == 0:
        try:
            payload = (True, fn())
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            payload = (False, e)
    ok, value = broadcast_object(payload)
    if not ok:
        if rank() == 0:
            raise value
        raise value.with_traceback(None)
    return value


# ------------------------------------------------------------------------------------------------
# Sharding
# ------------------------------------------------------------------------------------------------
def shard_bounds(n: int, rank_: int | None = None, world: int | None = None, block: int = 1) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank_``'s contiguous block of ``n`` items (defaults: this
    process's rank and the world size), cut at multiples of ``block`` from the start: the
    ``ceil(n / block)`` blocks are dealt contiguously, the first ranks getting one block more
    when they do not divide evenly. With ``block`` = the batch size, every rank's batches are
    batches a single process would run, image for image (so the results are bit for bit the
    same even where a kernel's rounding depends on the batch)."""
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank {r} is not in [0, world size {w})")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    blocks = -(-int(n) // block)
    base, extra = divmod(blocks, w)
    start = r * base + min(r, extra)
    stop = start + base + (1 if r < extra else 0)
    return min(start * block, n), min(stop * block, n)


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None, block: int = 1) -> list[T]:
    """Rank ``rank_``'s contiguous part of ``items`` (see :func:`shard_bounds`). Concatenating
    the parts of ranks 0, 1, ... gives ``items`` back in order (:func:`unshard`)."""
    start, stop = shard_bounds(len(items), rank_, world, block)
    return list(items[start:stop])


def unshard(parts: Sequence[Sequence[T]]) -> list[T]:
    """The inverse of :func:`shard`: the blocks of ranks 0, 1, ... concatenated."""
    return [x for p in parts for x in p]


class GlobalBatchSampler(DistributedSampler):
    """A DistributedSampler that deals each rank its share of the *global* batches a single
    process would draw.

    The global order is the one of ``RandomSampler(dataset, generator=generator)`` cut into
    batches of ``global_batch_size`` (incomplete last batch dropped when ``drop_last``); rank r
    gets the elements r, r + world, r + 2 world, ... of every global batch, so that a DataLoader
    with ``batch_size=global_batch_size // world`` (and ``generator=generator``) gives each rank
    its part of exactly the single-process batches. With the same generator passed to the
    DataLoader, the generator is consumed exactly as by ``DataLoader(shuffle=True,
    generator=generator)``, so the orders match draw for draw, every pass and every epoch.

    ``set_epoch(epoch)`` reseeds the generator with ``seed_fn(epoch)`` when ``seed_fn`` is given
    (the training loop instead builds a loader per epoch from a generator seeded with (seed, epoch)).
    """

    def __init__(self, dataset, global_batch_size: int, generator: torch.Generator, num_replicas: int | None = None,
                 rank: int | None = None, drop_last: bool = True,
                 seed_fn: Callable[[int], int] | None = None):
        num_replicas = world_size() if num_replicas is None else int(num_replicas)
        rank = globals()["rank"]() if rank is None else int(rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=drop_last)
        if global_batch_size < 1 or global_batch_size % num_replicas:
            raise ValueError(f"the global batch ({global_batch_size}) must be a positive multiple of the "
                             f"number of processes ({num_replicas})")
        self.global_batch_size = int(global_batch_size)
        self.generator = generator
        self.seed_fn = seed_fn
        n = len(dataset)
        if drop_last:
            self.num_samples = (n // self.global_batch_size) * (self.global_batch_size // num_replicas)
        else:
            full, rest = divmod(n, self.global_batch_size)
            self.num_samples = full * (self.global_batch_size // num_replicas) + len(range(rank, rest, num_replicas))
        self.total_size = self.num_samples * num_replicas

    def __iter__(self):
        batches = BatchSampler(RandomSampler(range(len(self.dataset)), generator=self.generator),
                               self.global_batch_size, self.drop_last)
        for batch in batches:
            yield from batch[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.seed_fn is not None:
            self.generator.manual_seed(int(self.seed_fn(self.epoch)))
