"""The request repository: guarded transitions, history, the spend ledger, budget leases."""

import threading
from collections.abc import Mapping

import pytest

from glaze_pipeline.core import queue
from glaze_pipeline.core.errors import UnknownRequestError
from glaze_pipeline.core.models import RequestStatus
from glaze_pipeline.core.requests import Adoption, RequestRepository, SpendDelta
from glaze_pipeline.core.store import Store


def running(store: Store, *, budget: float | None = None) -> tuple[RequestRepository, str]:
    requests = RequestRepository(store)
    request_id = queue.enqueue(store, "tbl_x", {"whole_table": True}, budget=budget)
    [claimed] = requests.claim()
    assert claimed.id == request_id
    assert requests.adopt(request_id, "run-1") is Adoption.ADOPTED
    return requests, request_id


def test_a_request_moves_forward_only_and_its_history_is_kept(store: Store) -> None:
    requests, request_id = running(store)
    assert requests.adopt(request_id, "run-1") is Adoption.ALREADY  # a retried first step
    assert requests.adopt(request_id, "run-2") is Adoption.TAKEN
    assert requests.requeue(request_id, "no") is False  # running never goes back to the queue
    assert requests.finish(request_id, RequestStatus.PARTIAL, error="1 cell failed") is True
    # Whoever comes late (a retried step, a sensor, the reconciler) changes nothing.
    assert requests.finish(request_id, RequestStatus.SUCCEEDED) is False
    assert requests.fail(request_id, "late failure") is False
    assert requests.cancel(request_id, "late cancel") is False
    assert requests.reject(request_id, "late reject") is False
    assert requests.adopt(request_id, "run-3") is Adoption.ENDED
    assert requests.heartbeat(request_id).status is RequestStatus.PARTIAL  # beats stamp nothing
    assert requests.request_cancel(request_id) is RequestStatus.PARTIAL
    request = requests.get(request_id)
    assert (request.status, request.error, request.cancel_requested) == (
        "partial",
        "1 cell failed",
        False,
    )
    assert requests.transitions(request_id) == [
        (None, "queued"),
        ("queued", "launched"),
        ("launched", "running"),
        ("running", "partial"),
    ]
    with pytest.raises(UnknownRequestError, match="req_nope"):
        requests.fail("req_nope", "x")


def test_a_cancel_flag_stops_new_spend_but_settles_what_is_in_flight(store: Store) -> None:
    requests, request_id = running(store, budget=100)
    paid = {"paid": SpendDelta(calls=3, unit_cost=2.0)}
    assert requests.record_spend(request_id, paid) is True
    assert requests.lease_budget(request_id, 10, 2) == 10
    assert requests.request_cancel(request_id) is RequestStatus.RUNNING  # it stops on its watch
    beat = requests.heartbeat(request_id)
    assert (beat.status, beat.cancel_requested) == (RequestStatus.RUNNING, True)
    # No new call is accepted once a cancel is asked, and no more budget is granted...
    assert requests.record_spend(request_id, {"paid": SpendDelta(calls=1, unit_cost=2.0)}) is False
    assert requests.lease_budget(request_id, 10, 2) == 0.0
    # ...but the answers of calls already sent are settled: two charged, one free miss.
    settled = {"paid": SpendDelta(settled=3, charged=2, cost=4.0, unit_cost=2.0)}
    requests.record_spend(request_id, settled)
    assert requests.cancel(request_id, "cancelled by the user") is True
    request = requests.get(request_id)
    assert (request.status, request.cost) == ("cancelled", 4.0)
    assert (request.provider_calls, request.cost_by_provider) == ({"paid": 3}, {"paid": 4.0})


def test_calls_never_settled_are_counted_charged_when_the_request_ends(store: Store) -> None:
    """A killed worker's calls in flight: the vendor billed them, so the record does too."""
    requests, request_id = running(store)
    requests.record_spend(request_id, {"paid": SpendDelta(calls=5, unit_cost=3.0)})
    requests.record_spend(
        request_id, {"paid": SpendDelta(settled=2, charged=2, cost=6.0, unit_cost=3.0)}
    )
    spend = requests.spend(request_id)
    assert (spend.unsettled, spend.cost) == (3, 15.0)
    assert requests.fail(request_id, "its worker died") is True
    request = requests.get(request_id)
    assert (request.status, request.cost, request.provider_calls) == ("failed", 15.0, {"paid": 5})
    # An ended request accepts no new call.
    assert requests.record_spend(request_id, {"paid": SpendDelta(calls=1)}) is False
    assert requests.spend(request_id).calls == {"paid": 5}


def test_a_withdrawn_call_leaves_the_ledger_even_after_a_cancel(store: Store) -> None:
    """Journalled, then refused before it left (an open circuit, a key gone missing): it is no
    call and costs nothing, and taking it back is recorded even when new calls are refused."""
    requests, request_id = running(store)
    requests.record_spend(request_id, {"vendor": SpendDelta(calls=3, unit_cost=5.0)})
    assert requests.request_cancel(request_id) is RequestStatus.RUNNING
    requests.record_spend(
        request_id,
        {"vendor": SpendDelta(calls=1, withdrawn=1, settled=2, charged=2, cost=10, unit_cost=5)},
    )
    spend = requests.spend(request_id)
    assert (spend.calls, spend.unsettled, spend.cost) == ({"vendor": 2}, 0, 10.0)
    requests.record_unavailable(request_id, {"premium": "API key missing"})
    assert requests.cancel(request_id, "cancelled by the user", counters={}) is True
    request = requests.get(request_id)
    assert (request.provider_calls, request.cost) == ({"vendor": 2}, 10.0)
    assert request.unavailable_providers == {"premium": "API key missing"}


def test_a_journal_write_is_one_statement_on_postgres(store: Store) -> None:
    """The check that the request accepts calls and the ledger's upsert go together (one
    round trip per block of calls); on SQLite they stay two statements of one transaction."""
    requests, request_id = running(store)
    before = store.statements
    deltas = {
        "a": SpendDelta(calls=4, unit_cost=1.5),
        "b": SpendDelta(calls=2, settled=1, charged=1, cost=0.5, unit_cost=0.5),
        "c": SpendDelta(),  # nothing to write: no ledger row
    }
    assert requests.record_spend(request_id, deltas) is True
    assert store.statements - before == (1 if store.dialect == "postgresql" else 2)
    spend = requests.spend(request_id)
    assert (spend.calls, spend.unsettled) == ({"a": 4, "b": 2}, 5)
    # Refused calls are not journalled; the settlement and the withdrawal that rode along are.
    assert requests.request_cancel(request_id) is RequestStatus.RUNNING
    refused = {"a": SpendDelta(calls=3, withdrawn=1, settled=2, charged=2, cost=3.0)}
    assert requests.record_spend(request_id, refused) is False
    assert requests.spend(request_id).calls == {"a": 3, "b": 2}
    assert requests.record_spend("req_nope", {"a": SpendDelta(calls=1)}) is False


def test_budget_leases_never_exceed_the_budget_across_threads(store: Store) -> None:
    requests, request_id = running(store, budget=40.0)
    granted: list[float] = []
    lock = threading.Lock()

    def lease() -> None:
        own = RequestRepository(Store(store.url))  # its own connections, like another process
        for _ in range(10):
            amount = own.lease_budget(request_id, 3.0, 1.0)
            with lock:
                granted.append(amount)
        own.store.dispose()

    threads = [threading.Thread(target=lease) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == pytest.approx(40.0)
    requests.return_budget(request_id, 5.0)
    assert requests.get(request_id).budget_reserved == pytest.approx(35.0)
    requests.finish(request_id, RequestStatus.SUCCEEDED)
    assert requests.lease_budget(request_id, 1.0, 1.0) == 0.0  # an ended request grants nothing


def test_a_claimed_request_that_cannot_run_fails_alone_with_its_reason(store: Store) -> None:
    good_table = "tbl_missing"
    poisoned = RequestRepository(store)
    bad = queue.enqueue(store, good_table, {"whole_table": True}, kind="enrich")
    with store.engine.begin() as connection:  # what a buggy app could write
        from sqlalchemy import text

        connection.execute(
            text("UPDATE enrichment_requests SET selection = :s WHERE id = :id"),
            {"s": '"a string"', "id": bad},
        )
    launchable, rejected = queue.claim_launchable(store, limit=10)
    assert launchable == [] and [r for r, _ in rejected] == [bad]
    request = poisoned.get(bad)
    assert request.status == "failed" and "invalid selection" in (request.error or "")
    assert poisoned.transitions(bad)[-1] == ("launched", "failed")


def test_the_spend_journal_group_commits_and_never_sends_what_is_not_on_record(
    store: Store,
) -> None:
    """200 concurrent calls cost a handful of transactions; a refusal stops every call."""
    import asyncio

    from glaze_pipeline.core.spend import SpendJournal

    requests, request_id = running(store)
    writes: list[int] = []

    def write(deltas: Mapping[str, SpendDelta]) -> bool:
        writes.append(sum(d.calls + d.settled for d in deltas.values()))
        return requests.record_spend(request_id, deltas)

    async def calls(journal: SpendJournal, n: int) -> list[bool]:
        async def one() -> bool:
            sent = await journal.send("paid", 2.0)
            if sent:
                await asyncio.sleep(0.001)  # the vendor answers
                journal.settle("paid", 2.0, charged=True)
            return sent

        results = await asyncio.gather(*(one() for _ in range(n)))
        await journal.drain()
        return list(results)

    journal = SpendJournal(write)
    assert all(asyncio.run(calls(journal, 200)))
    assert len(writes) < 20  # group commits, not one transaction per call
    spend = requests.spend(request_id)
    assert (spend.calls, spend.cost, spend.unsettled) == ({"paid": 200}, 400.0, 0)

    requests.request_cancel(request_id)  # from now on the request refuses new calls
    stopped = SpendJournal(write)
    assert not any(asyncio.run(calls(stopped, 50)))
    assert stopped.refused and requests.spend(request_id).calls == {"paid": 200}


def test_a_large_chunk_s_journal_skips_the_ramp_and_a_small_one_keeps_it(store: Store) -> None:
    """A chunk of 4,000 entities reserves a quarter of them at once; a 10-entity job starts
    at FIRST_BLOCK (or the calls waiting), so its crash could over-count no more than that.
    Either way every call is journalled before it goes and the unused slots are withdrawn."""
    import asyncio

    from glaze_pipeline.core.spend import FIRST_BLOCK, SpendJournal, first_block_for

    requests, request_id = running(store)

    def commits(entities: int, calls: int) -> tuple[int, list[int]]:
        reserved: list[int] = []

        def write(deltas: Mapping[str, SpendDelta]) -> bool:
            reserved.append(sum(d.calls for d in deltas.values()))
            return requests.record_spend(request_id, deltas)

        journal = SpendJournal(write, first_block=first_block_for(entities))

        async def run() -> None:
            gate = asyncio.Semaphore(200)

            async def one() -> None:
                async with gate:
                    assert await journal.send("paid", 1.0)
                    await asyncio.sleep(0)
                    journal.settle("paid", 1.0, charged=True)

            await asyncio.gather(*(one() for _ in range(calls)))
            await journal.drain()

        asyncio.run(run())
        return journal.commits, [r for r in reserved if r]

    ramped, _ = commits(10, 4000)
    large, reservations = commits(4000, 4000)
    assert reservations[0] == 1000 and large < ramped
    _, small = commits(10, 10)
    assert small == [max(FIRST_BLOCK, 10)]  # the calls waiting at once, never a quarter of more
    spend = requests.spend(request_id)
    assert (spend.calls, spend.unsettled) == ({"paid": 8010}, 0)
