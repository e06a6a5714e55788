"""The request repository: the only code that writes a request's status, spend and counters.

A request (one job) moves `queued -> launched -> running -> succeeded | partial | failed |
cancelled`, and only forward (a claim that never got a run may go back to `queued`). Every
transition is one guarded UPDATE (`WHERE status IN (<the states it may leave>)`) that says
whether it applied, and is written to `request_transitions` in the same transaction: a
terminal request is history and is never written again, whoever tries (a retried step, a late
sensor, a re-executed run, the reconciler).

Spend has its own ledger (`request_spend`): a call is journalled before it leaves the machine
(refused once the request has ended or a cancel is asked, so a vendor never hears from a job
that is over) and settled when its answer arrives. Every ending folds the ledger into the
request, so what it says it spent holds whether it succeeded, was cancelled, failed or was
killed: calls sent and never settled are counted as charged, since the vendor bills on receipt.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, insert, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from glaze_pipeline.core.errors import UnknownRequestError
from glaze_pipeline.core.limits import (
    MAX_ID,
    MAX_IDEMPOTENCY_KEY,
    check_budget,
    check_priority,
    check_text,
)
from glaze_pipeline.core.models import (
    TERMINAL_REQUEST_STATUSES,
    RequestKind,
    RequestStatus,
    RowStatus,
    Selection,
)
from glaze_pipeline.core.redact import redact
from glaze_pipeline.core.schema import EnrichmentRequest, RequestSpend, RequestTransition
from glaze_pipeline.core.spend import SpendDelta
from glaze_pipeline.core.store import REQUEST_DEFAULTS, Store, lenient_json_loads, new_id, utcnow

QUEUED = RequestStatus.QUEUED
LAUNCHED = RequestStatus.LAUNCHED
RUNNING = RequestStatus.RUNNING
OPEN = (QUEUED, LAUNCHED, RUNNING)
ACTIVE = (LAUNCHED, RUNNING)
ERROR_LIMIT = 2000
# The progress counters a heartbeat returns (and a chunk adds to): see `heartbeat`.
BEAT_COUNTERS = (
    "entities_done",
    "rows_written",
    "cells_done",
    "cells_failed",
    "cells_not_found",
    "cells_skipped",
)

# Priority: higher first. Pre-enrichment runs below anything a user asked for.
PRIORITY_DEFAULT = 0
PRIORITY_PRE_ENRICH = -10


@dataclass(frozen=True)
class ClaimedRequest:
    """A request this caller moved to `launched`; `selection` is as stored (not yet validated)."""

    id: str
    table_id: str
    kind: str
    selection: Any
    budget: float | None
    priority: int


@dataclass(frozen=True)
class Beat:
    """What a heartbeat learned: is the job still wanted?"""

    status: RequestStatus
    cancel_requested: bool
    # The request's progress counters after this beat (what every chunk added so far).
    counters: Mapping[str, int] = field(default_factory=dict)


class Adoption(enum.Enum):
    ADOPTED = "adopted"  # launched (or queued) -> running under this run
    ALREADY = "already"  # running under this very run (a retried first step)
    ENDED = "ended"  # terminal: a re-execution, which needs a new request
    TAKEN = "taken"  # running under another run


@dataclass(frozen=True)
class Spend:
    """A request's spend as its ledger says: settled cost plus calls never settled."""

    calls: dict[str, int] = field(default_factory=dict)
    cost_by_provider: dict[str, float] = field(default_factory=dict)
    unsettled: int = 0

    @property
    def cost(self) -> float:
        return round(sum(self.cost_by_provider.values()), 6)


@dataclass(frozen=True)
class ActiveRequest:
    id: str
    status: str
    run_id: str | None
    cancel_requested: bool
    launched_at: datetime | None
    updated_at: datetime | None


# The pick is a MATERIALIZED CTE on Postgres, run once: as a plain `IN (subquery)` the planner
# may rescan it per row (a nested-loop semi join), each rescan skipping the rows this very
# UPDATE already changed and locking the next ones, so `limit` was not a limit at all.
_CLAIM_SQL = """
    WITH picked AS {materialized} (
        SELECT id FROM enrichment_requests
        WHERE status = 'queued' AND NOT cancel_requested
        ORDER BY priority DESC, created_at, id
        LIMIT :limit {lock}
    )
    UPDATE enrichment_requests SET status = 'launched', launched_at = :now, updated_at = :now
    WHERE id IN (SELECT id FROM picked) AND status = 'queued'
    RETURNING id, table_id, kind, selection, budget, priority
"""


# `RequestRepository.record_spend` on Postgres: whether the request still accepts calls, read
# under a share lock (a cancel or an ending waits for the ledger, never slips between), and the
# ledger's increments (calls only when accepted), in one statement. Data-modifying CTEs always
# run to completion; the query returns the verdict.
_RECORD_SPEND_SQL = """
WITH state AS MATERIALIZED (
    SELECT status = :running AND NOT cancel_requested AS ok
    FROM enrichment_requests WHERE id = :request_id FOR SHARE
), verdict AS MATERIALIZED (
    SELECT COALESCE((SELECT ok FROM state), false) AS ok
), d AS (
    SELECT d.provider,
           CASE WHEN verdict.ok THEN d.calls ELSE 0 END - d.withdrawn AS calls,
           d.settled, d.charged, d.cost, d.unit_cost
    FROM verdict, jsonb_to_recordset(CAST(:deltas AS jsonb)) AS d(
        provider text, calls integer, withdrawn integer, settled integer, charged integer,
        cost double precision, unit_cost double precision
    )
), upsert AS (
    INSERT INTO request_spend AS s (request_id, provider, calls, settled, charged, cost, unit_cost)
    SELECT :request_id, d.provider, d.calls, d.settled, d.charged, d.cost, d.unit_cost
    FROM d WHERE d.calls <> 0 OR d.settled <> 0
    ON CONFLICT (request_id, provider) DO UPDATE SET
        calls = s.calls + excluded.calls,
        settled = s.settled + excluded.settled,
        charged = s.charged + excluded.charged,
        cost = s.cost + excluded.cost,
        unit_cost = excluded.unit_cost
)
SELECT ok FROM verdict
"""


class RequestRepository:
    """Every write to `enrichment_requests` (and its ledger and history) goes through here."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- creating -------------------------------------------------------------------------

    def enqueue(
        self,
        table_id: str,
        selection: Selection | Mapping[str, Any],
        *,
        kind: RequestKind | str = RequestKind.ENRICH,
        budget: float | None = None,
        priority: int = PRIORITY_DEFAULT,
        idempotency_key: str | None = None,
        cells_total: int = 0,
        retry_of: str | None = None,
    ) -> str:
        """Queue a request as the app would; the same idempotency key yields the same request.

        `cells_total` is how many cells were asked for, when the caller counted them (the API
        answers it as `totalTasks` at once); detection records its own count when the job runs.

        An `enrich` request naming its rows (a grid with `row_ids`, or cells) holds them
        `queued` in the same transaction: one statement, whatever the number of rows. A
        selection of every row is held when it is claimed (see `queue.claim_launchable`).
        """
        if isinstance(selection, Selection):
            selection = selection.model_dump(mode="json")
        budget = check_budget(budget)
        priority = check_priority(priority)
        check_text("idempotency key", idempotency_key, MAX_IDEMPOTENCY_KEY, required=False)
        check_text("table id", table_id, MAX_ID)
        now = utcnow()
        values = {
            **REQUEST_DEFAULTS,
            "id": new_id("req"),
            "table_id": table_id,
            "kind": RequestKind(kind).value,
            "selection": dict(selection),
            "budget": budget,
            "priority": priority,
            "idempotency_key": idempotency_key,
            "status": QUEUED.value,
            "cells_total": max(0, int(cells_total)),
            "retry_of": retry_of,
            "created_at": now,
            "updated_at": now,
        }
        statement = self._insert(EnrichmentRequest).values(values)
        if idempotency_key is not None:
            statement = statement.on_conflict_do_nothing(
                index_elements=["table_id", "idempotency_key"]
            )
        with self.store.engine.begin() as connection:
            inserted = connection.execute(statement).rowcount
            if inserted:
                self._log(connection, [(str(values["id"]), None, QUEUED, None, None)])
                row_ids = _named_rows(values["selection"])
                if row_ids and values["kind"] == RequestKind.ENRICH.value:
                    self.store.hold_rows(
                        table_id,
                        str(values["id"]),
                        RowStatus.QUEUED,
                        row_ids=row_ids,
                        connection=connection,
                    )
            if idempotency_key is None:
                return str(values["id"])
            return str(
                connection.scalar(
                    select(EnrichmentRequest.id).where(
                        EnrichmentRequest.table_id == table_id,
                        EnrichmentRequest.idempotency_key == idempotency_key,
                    )
                )
            )

    def create_running(
        self,
        *,
        table_id: str,
        kind: RequestKind,
        selection: Mapping[str, Any],
        budget: float | None,
        run_id: str | None,
        retry_of: str | None = None,
    ) -> str:
        """Record a run that was launched without the queue (Launchpad, CLI, a re-execution)."""
        request_id = new_id("req")
        now = utcnow()
        values = {
            **REQUEST_DEFAULTS,
            "id": request_id,
            "table_id": table_id,
            "kind": kind.value,
            "selection": dict(selection),
            "budget": budget,
            "status": RUNNING.value,
            "run_id": run_id,
            "retry_of": retry_of,
            "created_at": now,
            "updated_at": now,
            "launched_at": now,
            "started_at": now,
        }
        reason = f"re-executes {retry_of}" if retry_of else "launched outside the queue"
        with self.store.engine.begin() as connection:
            connection.execute(insert(EnrichmentRequest).values(values))
            self._log(connection, [(request_id, None, RUNNING, reason, run_id)])
        return request_id

    # -- the queue ------------------------------------------------------------------------

    def claim(self, *, limit: int = 10) -> list[ClaimedRequest]:
        """Atomically move up to `limit` queued requests to `launched`, highest priority first."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        postgres = self.store.dialect == "postgresql"
        claim_sql = _CLAIM_SQL.format(
            materialized="MATERIALIZED" if postgres else "",
            lock="FOR UPDATE SKIP LOCKED" if postgres else "",
        )
        with self.store.engine.begin() as connection:
            rows = connection.execute(text(claim_sql), {"now": utcnow(), "limit": limit}).all()
            self._log(connection, [(row.id, QUEUED, LAUNCHED, None, None) for row in rows])
        claimed = [
            ClaimedRequest(
                id=row.id,
                table_id=row.table_id,
                kind=row.kind,
                # text() hands SQLite's JSON back as text; what is not JSON stays as it is,
                # for the launcher to refuse with its reason.
                selection=(
                    lenient_json_loads(row.selection)
                    if isinstance(row.selection, str)
                    else row.selection
                ),
                budget=row.budget,
                priority=row.priority,
            )
            for row in rows
        ]
        return sorted(claimed, key=lambda r: (-r.priority, r.id))

    def claim_one(self, request_id: str) -> ClaimedRequest | None:
        """Claim this very request (queued -> launched) for a caller that runs it itself (the
        CLI's in-process run); None when it is not queued (a sensor or launcher got it first,
        a cancel, an ending), so it is never run twice."""
        with self.store.engine.begin() as connection:
            moved = self._move_locked(
                connection,
                request_id,
                QUEUED,
                LAUNCHED,
                values={"launched_at": utcnow()},
                reason="claimed to run in process",
                run_id=None,
            )
        if not moved:
            return None
        request = self.get(request_id)
        return ClaimedRequest(
            id=request.id,
            table_id=request.table_id,
            kind=request.kind,
            selection=request.selection,
            budget=request.budget,
            priority=request.priority,
        )

    def attach_run(self, request_id: str, run_id: str) -> bool:
        """Note the run launched for a claimed request (status unchanged)."""
        with self.store.engine.begin() as connection:
            result = connection.execute(
                update(EnrichmentRequest)
                .where(EnrichmentRequest.id == request_id, _status_in(ACTIVE))
                .values(run_id=run_id, updated_at=utcnow())
            )
        return bool(result.rowcount)

    def requeue(self, request_id: str, reason: str) -> bool:
        """A claim that got no run goes back to the queue (launched -> queued)."""
        return self._move(request_id, (LAUNCHED,), QUEUED, reason=reason)

    def reject(self, request_id: str, reason: str) -> bool:
        """End a request that cannot run (invalid, refused) `failed`, before any run."""
        return self._move(
            request_id,
            (QUEUED, LAUNCHED),
            RequestStatus.FAILED,
            reason=reason,
            values={"error": _clip(reason)},
            close=True,
        )

    def request_cancel(self, request_id: str) -> RequestStatus:
        """Ask for a cancel (what the app does): a queued request ends at once, a running one at
        its next watch (within a second or two). A request that already ended is left alone."""
        with self.store.engine.begin() as connection:
            connection.execute(
                update(EnrichmentRequest)
                .where(EnrichmentRequest.id == request_id, _status_in(OPEN))
                .values(cancel_requested=True, updated_at=utcnow())
            )
        self._move(
            request_id,
            (QUEUED,),
            RequestStatus.CANCELLED,
            reason="cancelled before launch",
            values={"error": "cancelled before launch"},
            close=True,
        )
        return RequestStatus(self.get(request_id).status)

    # -- a run's life ---------------------------------------------------------------------

    def adopt(self, request_id: str, run_id: str) -> Adoption:
        """The run serving a request starts: launched (or queued) -> running, under `run_id`."""
        with self.store.engine.begin() as connection:
            current = self._lock_row(connection, request_id)
            status = RequestStatus(current.status)
            if status in TERMINAL_REQUEST_STATUSES:
                return Adoption.ENDED
            if status is RUNNING:
                return Adoption.ALREADY if current.run_id == run_id else Adoption.TAKEN
            moved = self._move_locked(
                connection,
                request_id,
                status,
                RUNNING,
                values={"run_id": run_id, "started_at": utcnow()},
                reason=None,
                run_id=run_id,
            )
        return Adoption.ADOPTED if moved else Adoption.TAKEN

    def heartbeat(
        self, request_id: str, *, add: Mapping[str, int] | None = None, **progress: int
    ) -> Beat:
        """Stamp a running request (and its progress counters); says whether to go on.

        `progress` sets counters; `add` adds to them (the chunks of one job, in one process or
        many, each add what they did since their last beat). The beat returns the counters.
        One statement a beat while the request runs; a second read only once it has not."""
        state = (EnrichmentRequest.status, EnrichmentRequest.cancel_requested)
        counted = [getattr(EnrichmentRequest, name) for name in BEAT_COUNTERS]
        values: dict[str, Any] = dict(progress)
        for name, amount in (add or {}).items():
            if amount:
                values[name] = getattr(EnrichmentRequest, name) + amount
        with self.store.engine.begin() as connection:
            row = connection.execute(
                update(EnrichmentRequest)
                .where(EnrichmentRequest.id == request_id, _status_in((RUNNING,)))
                .values(updated_at=utcnow(), **values)
                .returning(*state, *counted)
            ).first()
            if row is None:
                row = connection.execute(
                    select(*state, *counted).where(EnrichmentRequest.id == request_id)
                ).first()
        if row is None:
            raise UnknownRequestError(f"unknown request {request_id!r}")
        counters = {name: int(getattr(row, name) or 0) for name in BEAT_COUNTERS}
        return Beat(RequestStatus(row.status), bool(row.cancel_requested), counters)

    def lease_budget(self, request_id: str, preferred: float, minimum: float) -> float:
        """Take up to `preferred` (at least `minimum`) of a running request's budget; 0.0 if
        not left. One conditional UPDATE per try, so concurrent chunks or processes can never
        reserve more than the budget together, and an ended request grants nothing."""
        for amount in dict.fromkeys((preferred, minimum)):
            if amount <= 0:
                continue
            with self.store.engine.begin() as connection:
                result = connection.execute(
                    update(EnrichmentRequest)
                    .where(
                        EnrichmentRequest.id == request_id,
                        _status_in((RUNNING,)),
                        ~EnrichmentRequest.cancel_requested,
                        EnrichmentRequest.budget_reserved + amount
                        <= EnrichmentRequest.budget + 1e-9,
                    )
                    .values(budget_reserved=EnrichmentRequest.budget_reserved + amount)
                )
            if result.rowcount:
                return amount
        return 0.0

    def return_budget(self, request_id: str, unused: float) -> None:
        if unused <= 0:
            return
        with self.store.engine.begin() as connection:
            connection.execute(
                update(EnrichmentRequest)
                .where(EnrichmentRequest.id == request_id, _status_in((RUNNING,)))
                .values(budget_reserved=EnrichmentRequest.budget_reserved - unused)
            )

    def record_spend(self, request_id: str, deltas: Mapping[str, SpendDelta]) -> bool:
        """Journal calls about to be sent and settle calls answered, in one transaction.

        Returns False, recording only the settlements, when the request no longer accepts new
        calls (it ended, or a cancel was asked): the caller must then not send them. On
        Postgres the check (under a share lock on the request) and the ledger's upsert are one
        statement; on SQLite, whose writers are serialized anyway, two.
        """
        wanted = any(delta.calls > 0 for delta in deltas.values())
        if self.store.dialect == "postgresql":
            payload = json.dumps(
                [
                    {"provider": provider, **dataclasses.asdict(delta)}
                    for provider, delta in deltas.items()
                ]
            )
            with self.store.engine.begin() as connection:
                accepted = connection.execute(
                    text(_RECORD_SPEND_SQL),
                    {"request_id": request_id, "running": RUNNING.value, "deltas": payload},
                ).scalar_one()
            return bool(accepted) or not wanted
        with self.store.engine.begin() as connection:
            accepted = True
            if wanted:
                state = connection.execute(
                    select(EnrichmentRequest.status, EnrichmentRequest.cancel_requested)
                    .where(EnrichmentRequest.id == request_id)
                    .with_for_update(read=True)
                ).first()
                accepted = (
                    state is not None and state.status == RUNNING and not state.cancel_requested
                )
            rows = [
                {
                    "request_id": request_id,
                    "provider": provider,
                    "calls": (delta.calls if accepted else 0) - delta.withdrawn,
                    "settled": delta.settled,
                    "charged": delta.charged,
                    "cost": delta.cost,
                    "unit_cost": delta.unit_cost,
                }
                for provider, delta in deltas.items()
            ]
            rows = [r for r in rows if r["calls"] or r["settled"]]
            if rows:
                statement = self._insert(RequestSpend)
                statement = statement.on_conflict_do_update(
                    index_elements=["request_id", "provider"],
                    set_={
                        "calls": RequestSpend.calls + statement.excluded.calls,
                        "settled": RequestSpend.settled + statement.excluded.settled,
                        "charged": RequestSpend.charged + statement.excluded.charged,
                        "cost": RequestSpend.cost + statement.excluded.cost,
                        "unit_cost": statement.excluded.unit_cost,
                    },
                )
                connection.execute(statement, rows)
        return accepted

    def spend(self, request_id: str) -> Spend:
        with self.store.engine.connect() as connection:
            return _spend(connection, request_id)

    def record_counters(self, request_id: str, **counters: int) -> bool:
        """Progress figures of a running request (entities found, cells, rows)."""
        with self.store.engine.begin() as connection:
            result = connection.execute(
                update(EnrichmentRequest)
                .where(EnrichmentRequest.id == request_id, _status_in((RUNNING,)))
                .values(updated_at=utcnow(), **counters)
            )
        return bool(result.rowcount)

    def record_result(self, request_id: str, result: Mapping[str, Any]) -> bool:
        """An AI request's proposal so far (each step adds to it), while it runs."""
        with self.store.engine.begin() as connection:
            updated = connection.execute(
                update(EnrichmentRequest)
                .where(EnrichmentRequest.id == request_id, _status_in((RUNNING,)))
                .values(updated_at=utcnow(), result=dict(result))
            )
        return bool(updated.rowcount)

    def record_unavailable(self, request_id: str, unavailable: Mapping[str, str]) -> bool:
        """The providers the preflight found unusable, with their reasons (once per job)."""
        with self.store.engine.begin() as connection:
            result = connection.execute(
                update(EnrichmentRequest)
                .where(EnrichmentRequest.id == request_id, _status_in((RUNNING,)))
                .values(updated_at=utcnow(), unavailable_providers=dict(unavailable))
            )
        return bool(result.rowcount)

    def advance(self, request_id: str, *, entities_done: int) -> int:
        """Add to a running request's enrichment progress; returns the total so far."""
        with self.store.engine.begin() as connection:
            total = connection.execute(
                update(EnrichmentRequest)
                .where(EnrichmentRequest.id == request_id, _status_in((RUNNING,)))
                .values(
                    entities_done=EnrichmentRequest.entities_done + entities_done,
                    updated_at=utcnow(),
                )
                .returning(EnrichmentRequest.entities_done)
            ).scalar()
        return int(total or 0)

    def finish(
        self,
        request_id: str,
        status: RequestStatus,
        *,
        error: str | None = None,
        counters: Mapping[str, Any] | None = None,
    ) -> bool:
        """A running request ends with the job's verdict, its counters and its ledger's spend."""
        if status not in TERMINAL_REQUEST_STATUSES:
            raise ValueError(f"{status} is not a terminal status")
        return self._move(
            request_id,
            (RUNNING,),
            status,
            reason=error,
            values={"error": _clip(error), **(counters or {})},
            close=True,
        )

    def fail(self, request_id: str, reason: str) -> bool:
        """End an open request `failed` with the reason; False when it had already ended."""
        return self._move(
            request_id,
            OPEN,
            RequestStatus.FAILED,
            reason=reason,
            values={"error": _clip(reason)},
            close=True,
        )

    def cancel(
        self, request_id: str, reason: str, *, counters: Mapping[str, Any] | None = None
    ) -> bool:
        """End an open request `cancelled`; False when it had already ended."""
        return self._move(
            request_id,
            OPEN,
            RequestStatus.CANCELLED,
            reason=reason,
            values={"error": _clip(reason), **(counters or {})},
            close=True,
        )

    # -- reads ------------------------------------------------------------------------------

    def get(self, request_id: str) -> EnrichmentRequest:
        return self.store.get_request(request_id)

    def for_table(
        self, table_id: str, *, offset: int = 0, limit: int = 20
    ) -> tuple[list[EnrichmentRequest], int]:
        """A page of a table's requests, newest first, and how many it has."""
        query = (
            select(EnrichmentRequest)
            .where(EnrichmentRequest.table_id == table_id)
            .order_by(EnrichmentRequest.created_at.desc(), EnrichmentRequest.id.desc())
            .offset(offset)
            .limit(limit)
        )
        count = select(func.count()).where(EnrichmentRequest.table_id == table_id)
        with self.store.session() as session:
            requests = list(session.scalars(query))
            total = int(session.scalar(count) or 0)
            session.expunge_all()
        return requests, total

    def transitions(self, request_id: str) -> list[tuple[str | None, str]]:
        """(from, to) of every status change of a request, oldest first."""
        with self.store.engine.connect() as connection:
            rows = connection.execute(
                select(RequestTransition.from_status, RequestTransition.to_status)
                .where(RequestTransition.request_id == request_id)
                .order_by(RequestTransition.id)
            ).all()
        return [(row.from_status, row.to_status) for row in rows]

    def active(self) -> list[ActiveRequest]:
        """Launched or running requests, and queued ones with a cancel flag: what reconciling
        checks."""
        with self.store.engine.connect() as connection:
            rows = connection.execute(
                select(
                    EnrichmentRequest.id,
                    EnrichmentRequest.status,
                    EnrichmentRequest.run_id,
                    EnrichmentRequest.cancel_requested,
                    EnrichmentRequest.launched_at,
                    EnrichmentRequest.updated_at,
                ).where(
                    or_(
                        _status_in(ACTIVE),
                        and_(_status_in((QUEUED,)), EnrichmentRequest.cancel_requested),
                    )
                )
            ).all()
        return [ActiveRequest(*row) for row in rows]

    # -- the one way a status changes -------------------------------------------------------

    def _move(
        self,
        request_id: str,
        sources: Sequence[RequestStatus],
        target: RequestStatus,
        *,
        reason: str | None,
        values: Mapping[str, Any] | None = None,
        close: bool = False,
    ) -> bool:
        with self.store.engine.begin() as connection:
            current = self._lock_row(connection, request_id)
            status = RequestStatus(current.status)
            if status not in sources:
                return False
            updates = dict(values or {})
            if close:
                updates.update(_closing_values(connection, request_id))
            return self._move_locked(
                connection,
                request_id,
                status,
                target,
                values=updates,
                reason=reason,
                run_id=current.run_id,
            )

    def _move_locked(
        self,
        connection: Connection,
        request_id: str,
        source: RequestStatus,
        target: RequestStatus,
        *,
        values: Mapping[str, Any],
        reason: str | None,
        run_id: str | None,
    ) -> bool:
        result = connection.execute(
            update(EnrichmentRequest)
            .where(EnrichmentRequest.id == request_id, EnrichmentRequest.status == source.value)
            .values(status=target.value, updated_at=utcnow(), **values)
        )
        if not result.rowcount:
            return False
        self._log(connection, [(request_id, source, target, reason, run_id)])
        return True

    def _lock_row(self, connection: Connection, request_id: str) -> Any:
        row = connection.execute(
            select(EnrichmentRequest.status, EnrichmentRequest.run_id)
            .where(EnrichmentRequest.id == request_id)
            .with_for_update()
        ).first()
        if row is None:
            raise UnknownRequestError(f"unknown request {request_id!r}")
        return row

    @staticmethod
    def _log(
        connection: Connection,
        moves: Iterable[tuple[str, RequestStatus | None, RequestStatus, str | None, str | None]],
    ) -> None:
        now = utcnow()
        rows = [
            {
                "request_id": request_id,
                "from_status": source.value if source is not None else None,
                "to_status": target.value,
                "reason": _clip(reason),
                "run_id": run_id,
                "at": now,
            }
            for request_id, source, target, reason, run_id in moves
        ]
        if rows:
            connection.execute(insert(RequestTransition), rows)

    def _insert(self, table: Any) -> Any:
        return (pg_insert if self.store.dialect == "postgresql" else sqlite_insert)(table)


def _closing_values(connection: Connection, request_id: str) -> dict[str, Any]:
    """What every ending records: the time, and the spend its ledger holds."""
    spend = _spend(connection, request_id)
    values: dict[str, Any] = {"finished_at": utcnow()}
    if spend.calls:
        values.update(
            provider_calls=spend.calls, cost_by_provider=spend.cost_by_provider, cost=spend.cost
        )
    return values


def _spend(connection: Connection, request_id: str) -> Spend:
    rows = connection.execute(
        select(
            RequestSpend.provider,
            RequestSpend.calls,
            RequestSpend.settled,
            RequestSpend.cost,
            RequestSpend.unit_cost,
        )
        .where(RequestSpend.request_id == request_id)
        .order_by(RequestSpend.provider)
    ).all()
    calls: dict[str, int] = {}
    cost: dict[str, float] = {}
    unsettled = 0
    for row in rows:
        if not row.calls:
            continue
        pending = max(0, row.calls - row.settled)
        unsettled += pending
        calls[row.provider] = row.calls
        spent = round(row.cost + pending * row.unit_cost, 6)
        if spent > 0:  # free misses cost nothing and are not listed, as the vendors bill them
            cost[row.provider] = spent
    return Spend(calls, cost, unsettled)


def _status_in(statuses: Iterable[RequestStatus]) -> Any:
    return EnrichmentRequest.status.in_([status.value for status in statuses])


def _clip(reason: str | None) -> str | None:
    """A reason as stored on the request and in its history: no secret, bounded length."""
    return None if reason is None else redact(reason)[:ERROR_LIMIT]


def _named_rows(selection: Mapping[str, Any]) -> list[str]:
    """The row ids a selection names, read leniently: a malformed selection holds nothing here
    and is refused, with its reason, when it is claimed."""
    named: list[Any] = []
    if isinstance(selection.get("row_ids"), list) and selection.get("column_ids"):
        named = selection["row_ids"]
    elif isinstance(selection.get("cells"), list):
        named = [c.get("row_id") for c in selection["cells"] if isinstance(c, Mapping)]
    return [row_id for row_id in dict.fromkeys(named) if isinstance(row_id, str)]
