"""Test-only fault injection: ``CKAAD_FAST_TEST_DIE_AFTER_BATCHES=[RANK:]N`` makes the process of
that rank (every rank when ``RANK:`` is left out) stop dead with ``os._exit`` after its N-th batch
of ``ckaad-fast score`` (see :func:`maybe_die_for_test`). It exists for the tests of ``--resume``
after a crash; never set it otherwise.

Kept apart from :mod:`ckaad_fast.distributed` (which needs torch) because the results folder that
calls it is written by the deployment path too, which has no torch."""
from __future__ import annotations

import os
import sys
from typing import Callable

__all__ = ["DIE_ENV", "DIE_EXIT_CODE", "maybe_die_for_test"]

#: Environment variable of the fault injection (see the module's docstring).
DIE_ENV = "CKAAD_FAST_TEST_DIE_AFTER_BATCHES"
#: Exit code of a process stopped by the fault injection.
DIE_EXIT_CODE = 99


def _rank() -> int:
    # A process group exists only where ckaad_fast.distributed joined one; else torchrun's RANK.
    ddp = sys.modules.get("ckaad_fast.distributed")
    if ddp is not None and ddp.is_distributed():
        return ddp.rank()
    value = os.environ.get("RANK", "").strip()
    return int(value) if value else 0


def _die_after() -> int | None:
    spec = os.environ.get(DIE_ENV, "").strip()
    if not spec:
        return None
    who, _, n = spec.rpartition(":")
    if who and int(who) != _rank():
        return None
    return int(n)


def maybe_die_for_test(batches_done: int, before_exit: Callable[[], None] | None = None) -> None:
    """Stop this process dead (``os._exit``, no clean-up, no ``finally``) once it has finished
    ``CKAAD_FAST_TEST_DIE_AFTER_BATCHES`` batches, after ``before_exit`` (which saves what a
    periodic save would have saved). Does nothing when the variable is unset."""
    n = _die_after()
    if n is not None and batches_done >= n:
        if before_exit is not None:
            before_exit()
        os._exit(DIE_EXIT_CODE)
