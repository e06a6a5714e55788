"""The collector settings a step runs under, and what it gives back."""

import gc
import threading
from collections.abc import Iterator

import pytest

from glaze_pipeline.core.heap import STEP_GEN0_THRESHOLD, frozen_heap, quiet_collector


@pytest.fixture(autouse=True)
def default_thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*saved)


def test_a_step_collects_less_often_and_gives_the_thresholds_back() -> None:
    with quiet_collector():
        assert gc.get_threshold() == (STEP_GEN0_THRESHOLD, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)
    with pytest.raises(RuntimeError), frozen_heap():
        assert gc.get_threshold()[0] == STEP_GEN0_THRESHOLD
        assert gc.get_freeze_count() > 0
        raise RuntimeError("the step failed")
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0


def test_overlapping_steps_restore_what_the_first_found() -> None:
    """Two steps in one process, the first to start ending first: the second still runs
    quiet, and once both are done the process is back to its own thresholds."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[int] = []

    def second() -> None:
        a_in.wait(5)
        with quiet_collector():
            b_in.set()
            a_out.wait(5)
            seen.append(gc.get_threshold()[0])

    thread = threading.Thread(target=second)
    thread.start()
    with quiet_collector():
        a_in.set()
        assert b_in.wait(5)
    a_out.set()
    thread.join(5)
    assert seen == [STEP_GEN0_THRESHOLD]
    assert gc.get_threshold() == (700, 10, 10)


def test_a_process_with_automatic_collection_off_keeps_it_off() -> None:
    gc.set_threshold(0)
    with quiet_collector():
        assert gc.get_threshold()[0] == 0
    assert gc.get_threshold()[0] == 0


def test_a_higher_threshold_set_by_the_process_is_kept() -> None:
    gc.set_threshold(100_000, 5, 5)
    with quiet_collector():
        assert gc.get_threshold() == (100_000, 5, 5)
    assert gc.get_threshold() == (100_000, 5, 5)
