"""A page loop's database waits overlapped with its Python work: read-ahead and write-behind.

Reading a page of rows, deciding what to do with it, and writing what was decided are three
waits taken in turn when done in one thread: the database's time to serve the read, Python's
time to decode and work, the database's time to run the write. On a machine with a spare core
the two database waits can run while Python works (a thread waiting on a socket lets go of the
GIL), so a loop costs about its longest part instead of their sum. A read-ahead holds one page
beyond the caller's; a write-behind runs at most `in_flight` calls at once (one by default, so
writes stay in order).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_END = object()


def read_ahead(items: Iterator[T], *, name: str = "read-ahead") -> Generator[T, None, None]:
    """`items`, each fetched in a thread while the caller works on the one before.

    An error raised fetching an item is raised where the caller would have met it. Leaving the
    loop early waits for the fetch in flight (its item is dropped) and closes `items`."""
    pool = ThreadPoolExecutor(1, thread_name_prefix=name)
    try:
        pending: Future[Any] = pool.submit(next, items, _END)
        while True:
            item = pending.result()
            if item is _END:
                return
            pending = pool.submit(next, items, _END)
            yield item
    finally:
        pool.shutdown(wait=True)
        close = getattr(items, "close", None)
        if close is not None:
            close()


class WriteBehind:
    """Runs calls in threads while the caller goes on, at most `in_flight` at a time.

    `submit` first waits for the oldest call while `in_flight` are running (raising its error,
    if it failed). With one in flight (the default) calls run one at a time, in order; with
    more, they overlap each other too (writes that touch different rows, whose order does not
    matter). Leaving the `with` block waits for every call; the first error is raised unless
    the block is already raising one of its own."""

    def __init__(self, *, name: str = "write-behind", in_flight: int = 1) -> None:
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix=name)
        self._in_flight = in_flight
        self._pending: deque[Future[object]] = deque()

    def submit(self, call: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        while len(self._pending) >= self._in_flight:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(call, *args, **kwargs))

    def wait(self) -> None:
        """Wait for every call in flight; raise the first error."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_rest: object) -> None:
        try:
            if kind is None:
                self.wait()
            else:
                # The block is raising: let the writes in flight finish (a page is either
                # written or not), and keep the block's error rather than theirs.
                for pending in self._pending:
                    pending.exception()
                self._pending.clear()
        finally:
            self._pool.shutdown(wait=True)
