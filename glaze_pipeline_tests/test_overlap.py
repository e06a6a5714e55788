"""The page loop's read-ahead and write-behind (core/overlap.py): order, errors, one in flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from glaze_pipeline.core.overlap import WriteBehind, read_ahead


class Pages:
    """A page source that records which thread fetched each page and whether it was closed."""

    def __init__(self, count: int, *, fail_at: int | None = None) -> None:
        self.count = count
        self.fail_at = fail_at
        self.fetched: list[int] = []
        self.threads: set[str] = set()
        self.closed = False

    def __iter__(self) -> Iterator[int]:
        try:
            for page in range(self.count):
                self.threads.add(threading.current_thread().name)
                if page == self.fail_at:
                    raise LookupError(f"page {page} could not be read")
                self.fetched.append(page)
                yield page
        finally:
            self.closed = True


def test_read_ahead_yields_every_page_in_order_fetched_in_its_own_thread() -> None:
    pages = Pages(5)
    assert list(read_ahead(iter(pages), name="pages")) == [0, 1, 2, 3, 4]
    assert pages.closed
    assert len(pages.threads) == 1 and next(iter(pages.threads)).startswith("pages")


def test_read_ahead_fetches_the_next_page_while_the_caller_works_on_this_one() -> None:
    pages = Pages(3)
    source = read_ahead(iter(pages))
    assert next(source) == 0
    deadline = time.monotonic() + 5
    while pages.fetched != [0, 1] and time.monotonic() < deadline:
        time.sleep(0.001)
    assert pages.fetched == [0, 1]  # page 1 is read already, and only page 1: one ahead
    assert list(source) == [1, 2]


def test_read_ahead_raises_a_fetch_error_where_the_caller_meets_that_page() -> None:
    pages = Pages(5, fail_at=2)
    seen = []
    with pytest.raises(LookupError, match="page 2 could not be read"):
        for page in read_ahead(iter(pages)):
            seen.append(page)
    assert seen == [0, 1]
    assert pages.closed


def test_leaving_a_read_ahead_early_waits_for_the_fetch_in_flight_and_closes_the_source() -> None:
    pages = Pages(100)
    source = read_ahead(iter(pages))
    assert next(source) == 0
    source.close()
    assert pages.closed
    assert pages.fetched in ([0], [0, 1])  # at most the one page ahead, never more


def test_write_behind_runs_calls_in_order_one_at_a_time_off_the_caller_s_thread() -> None:
    done: list[int] = []
    running = []
    threads = set()
    caller = threading.current_thread().name

    def write(page: int) -> None:
        running.append(page)
        assert len(running) == 1, "two writes in flight"
        threads.add(threading.current_thread().name)
        time.sleep(0.005)
        done.append(page)
        running.remove(page)

    with WriteBehind(name="writes") as writes:
        for page in range(6):
            writes.submit(write, page)
    assert done == [0, 1, 2, 3, 4, 5]
    assert caller not in threads and all(name.startswith("writes") for name in threads)


def test_a_failed_write_is_raised_at_the_next_submit_and_nothing_after_it_runs() -> None:
    done: list[int] = []

    def write(page: int) -> None:
        if page == 1:
            raise ValueError("page 1 refused")
        done.append(page)

    with pytest.raises(ValueError, match="page 1 refused"), WriteBehind() as writes:
        for page in range(4):
            writes.submit(write, page)
    assert done == [0]


def test_the_last_write_s_error_is_raised_on_leaving_the_block() -> None:
    def write() -> None:
        raise ValueError("the last page refused")

    with pytest.raises(ValueError, match="the last page refused"), WriteBehind() as writes:
        writes.submit(write)


def test_an_error_in_the_block_waits_for_the_write_in_flight_and_keeps_the_block_s_error() -> None:
    finished = threading.Event()

    def write() -> None:
        time.sleep(0.05)
        finished.set()
        raise ValueError("hidden by the block's own error")

    with pytest.raises(KeyError, match="stopped"), WriteBehind() as writes:
        writes.submit(write)
        raise KeyError("stopped")
    assert finished.is_set()  # the write ran to its end before the error went on


def test_write_behind_with_two_in_flight_overlaps_two_calls_and_never_three() -> None:
    lock = threading.Lock()
    running = [0]
    most = [0]
    done: list[int] = []

    def write(page: int) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
            done.append(page)

    with WriteBehind(in_flight=2) as writes:
        for page in range(8):
            writes.submit(write, page)
    assert sorted(done) == list(range(8))
    assert most[0] == 2


def test_write_behind_needs_at_least_one_call_in_flight() -> None:
    with pytest.raises(ValueError, match="in_flight must be >= 1"):
        WriteBehind(in_flight=0)
