"""Keeping Python's cycle collector off the objects a step starts with, and out of its loops.

A step process holds a large heap before it does any work: Dagster, pydantic and SQLAlchemy
imported, the job's plan loaded. The collector's full passes walk all of it again and again
while a chunk allocates (hundreds of lookups' worth of futures, responses and answers every
second), though none of it will become garbage during the step. `gc.freeze()` moves what
exists now out of the collector's sight; `gc.unfreeze()` at the step's end gives it back, so a
long-lived worker running many steps still collects their cycles. Measured on S3 at
`--scale 0.1` (12,000 calls, in process): worker CPU per provider call 1.53-1.73 ms without,
1.22-1.33 ms with.

And a step allocates in bursts that live a little while: a page of 5,000 rows read, patched and
encoded, a page of detected keys. With Python's default first threshold (a collection every 700
net allocations) each burst sets off hundreds of young collections whose survivors are promoted
and then walked by full passes, though rows and keys hold no cycles. `quiet_collector` raises
that threshold for the step: writing 200,000 rows (`bench/rows_throughput.py`, pages of 1,000
or 5,000) took 4.0-4.7 s of CPU with the default, 0.7-1.5 s of it collecting, and 3.1-3.7 s
with it; detecting 300,000 rows 3.7 s and 2.9 s.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STEP_GEN0_THRESHOLD = 50_000
"""Net allocations between young collections inside a step (Python's default is 700). Cyclic
garbage waits that much longer (a few MB at most); nothing else changes."""


class _Thresholds:
    """The collector's thresholds raised while any block wants it (steps may overlap in one
    process: the first in raises them, the last out puts back what it found)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._saved = gc.get_threshold()

    def raise_gen0(self, gen0: int) -> None:
        with self._lock:
            if self._holders == 0:
                self._saved = gc.get_threshold()
                first, *rest = self._saved
                if first:  # 0: automatic collection is off, and stays off
                    gc.set_threshold(max(first, gen0), *rest)
            self._holders += 1

    def restore(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                gc.set_threshold(*self._saved)


_THRESHOLDS = _Thresholds()


@contextmanager
def quiet_collector(gen0: int = STEP_GEN0_THRESHOLD) -> Iterator[None]:
    """Run the block with young collections every `gen0` net allocations, not every 700."""
    _THRESHOLDS.raise_gen0(gen0)
    try:
        yield
    finally:
        _THRESHOLDS.restore()


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Run the block with the objects that exist now out of the cycle collector's passes, and
    a quiet collector (`quiet_collector`).

    Garbage must not be frozen: it would outlive the block, and the block after it (the next
    step in this process) would freeze it again, and so on (S3's steps in one process, batched:
    557 MiB at scale 1, against ~330 collecting). So the young generations are collected
    before the freeze, and the block's own objects (all it left unfrozen) at its end, before
    the heap is given back: each pass walks what is new, never the whole heap again (a full
    collection per step was 7 % of the worker's CPU on S3 at `--scale 0.3`, 16 steps)."""
    gc.collect(1)
    gc.freeze()
    try:
        with quiet_collector():
            yield
    finally:
        gc.collect()
        gc.unfreeze()


def freeze_before_fork() -> None:
    """For a process that forks workers (the fork server of defs/warm.py, the fork launcher):
    what it has loaded lives as long as it does, so move it out of the collector's sight for
    good, here and in every child. A step freezes its heap itself (`frozen_heap`), but only once
    its body runs; before that (Dagster's setup, its inputs unpickled) a full collection walked
    the ~280,000 objects a step inherits, touching and so copying every page they are on:
    ~0.15 s of CPU in each step process. The garbage is collected first: frozen, it would stay."""
    gc.collect()
    gc.freeze()
