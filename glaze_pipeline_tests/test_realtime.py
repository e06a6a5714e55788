"""The realtime stream (`GET /realtime/jobs/{jobId}`, Server-Sent Events) over real HTTP.

A real `glaze serve` (api_helpers.served) on the embedded SQLite default without Redis (the
stream polls the request row) and on Postgres with Redis (pub/sub). The server runs without its
launcher, so a stream is open before its job can start: a `glaze launcher` started next runs it,
and every state from `pending` to `finished` is seen, in order. Heartbeats, a client going away
and Redis faults are tested against the app served by uvicorn in this process (a short
heartbeat; the Redis URL set per test).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from glaze_pipeline.api import auth
from glaze_pipeline.api.app import create_app
from glaze_pipeline.bench.stack import free_port, fresh_postgres, stop_process_group
from glaze_pipeline.core import queue
from glaze_pipeline.core.progress import (
    CELLS_PER_MESSAGE,
    RedisProgress,
    publish_cells,
    request_channel,
    resolve_prefix,
)
from glaze_pipeline.core.seed import leads_column_id, leads_row_id, seed_leads
from glaze_pipeline.core.settings import REDIS_URL_ENV
from glaze_pipeline.core.store import RowPatch, Store
from glaze_pipeline_tests.api_helpers import (
    GLAZE,
    LEADS,
    TEST_TOKEN_SECRET,
    Server,
    served,
)
from glaze_pipeline_tests.conftest import PG_BASE_URL, REDIS_TEST_URL

API_KEY = "realtime-test-key-0123456789"
SIX_CELLS: dict[str, Any] = {
    "columnIds": [leads_column_id("industry"), leads_column_id("title")],
    "rowIds": [leads_row_id(i) for i in range(3)],
    "overwrite": True,
}
LIFECYCLE = ["queued", "launched", "running", "succeeded", "partial", "failed", "cancelled"]


@dataclass
class Event:
    id: int
    name: str
    data: dict[str, Any]


class EventReader:
    """Reads one open SSE response: events (and heartbeat comments) as they arrive."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.iter_lines()
        self.comments: list[str] = []
        self.ended = False

    def next(self) -> Event | None:
        """The next event; None when the server ended the stream."""
        fields: dict[str, str] = {}
        for line in self.lines:
            if line.startswith(":"):
                self.comments.append(line)
            elif line == "":
                if "event" in fields:
                    assert fields.get("id", "").isdigit(), f"an event without an id: {fields}"
                    return Event(int(fields["id"]), fields["event"], json.loads(fields["data"]))
                fields = {}  # a `retry:` block
            else:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        self.ended = True
        return None

    def until(self, predicate: Any, *, timeout: float = 60.0) -> list[Event]:
        """Events up to and including the first that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        events: list[Event] = []
        while time.monotonic() < deadline:
            event = self.next()
            if event is None:
                raise AssertionError(f"the stream ended before the event looked for: {events}")
            events.append(event)
            if predicate(event):
                return events
        raise AssertionError(f"no such event within {timeout}s: {events}")

    def rest(self) -> list[Event]:
        """Every event until the server ends the stream."""
        events: list[Event] = []
        while (event := self.next()) is not None:
            events.append(event)
        return events


@contextlib.contextmanager
def stream(
    base_url: str, job_id: str, token: str | None = None, **headers: str
) -> Iterator[EventReader]:
    params = {"token": token} if token else {}
    timeout = httpx.Timeout(10.0, read=60.0)
    with (
        httpx.Client(base_url=base_url, timeout=timeout) as client,
        client.stream("GET", f"/realtime/jobs/{job_id}", params=params, headers=headers) as answer,
    ):
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        yield EventReader(answer)


def names(events: list[Event]) -> list[str]:
    return [e.name for e in events]


def enqueue(server: Server, body: dict[str, Any] | None = None) -> dict[str, Any]:
    with server.client() as client:
        answer = client.post(f"/tables/{LEADS}/enrich", json=body or SIX_CELLS)
    assert answer.status_code == 202, answer.text
    return dict(answer.json())


def cancel(server: Server, job_id: str) -> None:
    with server.client() as client:
        answer = client.post(f"/tables/{LEADS}/enrich/jobs/{job_id}/cancel")
    assert answer.status_code == 202, answer.text


@contextlib.contextmanager
def launcher(server: Server) -> Iterator[None]:
    """`glaze launcher` on the server's database, for as long as the block runs."""
    log = (server.log_path.parent / "launcher.log").open("ab")
    process = subprocess.Popen(
        [*GLAZE, "launcher"],
        env=server.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield
    finally:
        stop_process_group(process)
        log.close()


def require_redis() -> None:
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.fail(f"Redis is required for these tests ({REDIS_TEST_URL}): {error}")
    finally:
        client.close()


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`glaze serve --no-launcher` with an API key on the embedded SQLite, no Redis: polling."""
    with served(tmp_path_factory.mktemp("sqlite"), api_key=API_KEY, launcher=False) as running:
        yield running


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`glaze serve --no-launcher` with an API key on Postgres with Redis: pub/sub."""
    require_redis()
    with (
        fresh_postgres(PG_BASE_URL) as url,
        served(
            tmp_path_factory.mktemp("postgres"),
            database_url=url,
            redis_url=REDIS_TEST_URL,
            api_key=API_KEY,
            launcher=False,
        ) as running,
    ):
        yield running


@pytest.fixture(params=["sqlite_server", "postgres_server"])
def server(request: pytest.FixtureRequest) -> Server:
    """Each test on both: SQLite polling the row, Postgres with Redis pub/sub."""
    running: Server = request.getfixturevalue(request.param)
    return running


def uses_redis(server: Server) -> bool:
    return "GLAZE_REDIS_URL" in server.env


# -- from POST to finished --------------------------------------------------------------------


def test_a_stream_follows_a_job_from_post_to_finished(server: Server) -> None:
    job = enqueue(server)
    with stream(server.base_url, job["jobId"], job["publicAccessToken"]) as reader:
        first = reader.until(lambda e: e.name == "progress", timeout=10)
        assert names(first) == ["status", "progress"]
        assert first[0].data == {
            "jobId": job["jobId"],
            "status": "pending",
            "state": "queued",
            "runId": None,
        }
        assert first[1].data["phase"] == "queued" and first[1].data["progress"] == 0
        with launcher(server):
            rest = reader.rest()
    events = first + rest
    assert reader.ended and names(events)[-1] == "finished"  # last, then the stream ends
    assert names(events).count("finished") == 1
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    states = [e.data["state"] for e in events if e.name == "status"]
    assert states == sorted(states, key=LIFECYCLE.index) and len(set(states)) == len(states)
    assert states[0] == "queued" and states[-1] == "succeeded"
    if uses_redis(server):  # the job's `started` message; polling may miss a short `running`
        assert "running" in states
    progress = [e.data for e in events if e.name == "progress"]
    assert [p["progress"] for p in progress] == sorted(p["progress"] for p in progress)
    assert progress[-1]["phase"] == "done" and progress[-1]["progress"] == 100
    assert progress[-1]["doneTasks"] + progress[-1]["notFoundTasks"] == 6
    end = events[-1].data
    assert end["status"] == "completed" and end["state"] == "succeeded"
    assert end["progress"] == 100 and end["doneTasks"] + end["notFoundTasks"] == 6
    assert end["failedTasks"] == 0 and end["error"] is None

    cells = {
        (cell["rowId"], cell["columnKey"]): cell
        for event in events
        if event.name == "cells"
        for cell in event.data["cells"]
    }
    if uses_redis(server):
        # The cells as the job wrote them, before `finished`, equal to the rows now.
        with server.client() as client:
            rows = {r["id"]: r for r in client.get(f"/tables/{LEADS}/rows").json()["items"]}
        assert set(cells) == {(r, k) for r in SIX_CELLS["rowIds"] for k in ("industry", "title")}
        for (row_id, key), cell in cells.items():
            assert cell["value"] == rows[row_id]["data"].get(key)
            assert cell["status"] == rows[row_id]["meta"][key]["status"]
            assert cell["source"] == rows[row_id]["meta"][key]["source"]
        assert any(cell["value"] for cell in cells.values())  # values were filled in
        assert max(i for i, e in enumerate(events) if e.name == "cells") < len(events) - 1
    else:
        assert cells == {}  # without Redis, cells are read from the rows after `finished`

    # A reconnect after the end (EventSource sends Last-Event-ID) gets the ending at once.
    started = time.monotonic()
    with stream(
        server.base_url, job["jobId"], job["publicAccessToken"], **{"Last-Event-ID": str(ids[-1])}
    ) as again:
        replay = again.rest()
    assert time.monotonic() - started < 2.0
    assert names(replay) == ["status", "progress", "finished"]
    assert [e.id for e in replay] == [ids[-1] + 1, ids[-1] + 2, ids[-1] + 3]
    assert replay[-1].data == end


def test_an_ending_while_connected_and_a_reconnect_after_it(server: Server) -> None:
    """A cancel ends a queued job: the open stream hears it; a reconnect hears it at once."""
    job = enqueue(server)
    with stream(server.base_url, job["jobId"], job["publicAccessToken"]) as reader:
        first = reader.until(lambda e: e.name == "progress", timeout=10)
        cancel(server, job["jobId"])
        rest = reader.rest()
    assert names(rest)[-2:] == ["progress", "finished"] and reader.ended
    assert [e.data["state"] for e in rest if e.name == "status"] == ["cancelled"]
    assert rest[-1].data["status"] == "cancelled"
    last_id = rest[-1].id
    assert last_id == first[0].id + len(first) + len(rest) - 1
    for resume in ({"Last-Event-ID": str(last_id)}, {}):
        with stream(
            server.base_url, job["jobId"], **resume, Authorization=f"Bearer {API_KEY}"
        ) as again:
            replay = again.rest()
        assert names(replay) == ["status", "progress", "finished"]
        assert replay[0].data["status"] == "cancelled" and replay[-1].data == rest[-1].data
        assert replay[0].id == (last_id + 1 if resume else 1)


# -- who may read a stream ----------------------------------------------------------------------


def test_only_the_jobs_token_or_a_key_reads_its_stream(sqlite_server: Server) -> None:
    """(Auth does not depend on the database: tested on one.)"""
    server = sqlite_server
    job, other = enqueue(server), enqueue(server)
    url = f"{server.base_url}/realtime/jobs/{job['jobId']}"

    def status_of(**kwargs: Any) -> tuple[int, str]:
        answer = httpx.get(url, timeout=10, **kwargs)
        return answer.status_code, answer.json()["detail"]

    assert status_of()[0] == 401  # no token, no key
    assert status_of(params={"token": other["publicAccessToken"]}) == (
        403,
        "this token is for another job",
    )
    head, payload, signature = job["publicAccessToken"].split(".")
    tampered = f"{head}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
    assert status_of(params={"token": tampered}) == (401, "the token is not valid")
    expired, _ = auth.TokenSigner(TEST_TOKEN_SECRET, job_ttl_s=-60).issue_job_token(
        job["jobId"], LEADS
    )
    assert status_of(params={"token": expired}) == (401, "the token has expired")
    assert status_of(headers={"Authorization": f"Bearer {expired}"})[0] == 401
    forged, _ = auth.TokenSigner("not-the-servers-secret-" + "x" * 32).issue_job_token(
        job["jobId"], LEADS
    )
    assert status_of(params={"token": forged})[0] == 401
    with server.client() as client:
        unknown = client.get("/realtime/jobs/req_0000000000000000")
    assert unknown.status_code == 404 and "req_0000000000000000" in unknown.json()["detail"]

    # Allowed: the job's own token (query or bearer), and an API key. The job ends (cancelled)
    # so each stream closes after `finished`.
    cancel(server, job["jobId"])
    for how in (
        {"token": job["publicAccessToken"]},
        {"Authorization": f"Bearer {job['publicAccessToken']}"},
        {"Authorization": f"Bearer {API_KEY}"},
    ):
        token = how.pop("token", None)
        with stream(server.base_url, job["jobId"], token, **how) as reader:
            assert names(reader.rest()) == ["status", "progress", "finished"]
    cancel(server, other["jobId"])


# -- in process: heartbeats, a client going away, Redis faults -----------------------------------


@contextlib.contextmanager
def app_served(store: Store, settings: auth.ApiSettings) -> Iterator[str]:
    """The app on uvicorn in a thread of this process, on a free port; its base URL."""
    config = uvicorn.Config(
        create_app(store, settings),
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def post_job(base_url: str) -> dict[str, Any]:
    answer = httpx.post(f"{base_url}/tables/{LEADS}/enrich", json=SIX_CELLS, timeout=10)
    assert answer.status_code == 202, answer.text
    return dict(answer.json())


def subscribers(job_id: str) -> int:
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        channel = request_channel(resolve_prefix(REDIS_TEST_URL), job_id)
        return int(dict(client.pubsub_numsub(channel))[channel.encode()])
    finally:
        client.close()


def wait_until(condition: Any, *, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


@pytest.fixture
def leads_store(sqlite_store: Store) -> Store:
    seed_leads(sqlite_store)
    return sqlite_store


def test_heartbeats_keep_an_idle_stream_open(
    leads_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    settings = auth.ApiSettings(heartbeat_s=0.2)
    with app_served(leads_store, settings) as base_url:
        job = post_job(base_url)
        with stream(base_url, job["jobId"], job["publicAccessToken"]) as reader:
            reader.until(lambda e: e.name == "progress", timeout=5)
            beats: list[float] = []
            while len(beats) < 3:  # the queued job does not change: heartbeats only
                line = next(reader.lines)
                if line.startswith(":"):
                    assert line == ": heartbeat"
                    beats.append(time.monotonic())
                else:
                    assert line == "", f"an event for a job that did not change: {line}"
            gaps = [b - a for a, b in itertools.pairwise(beats)]
            assert all(0.1 < gap < 1.0 for gap in gaps), gaps
            httpx.post(
                f"{base_url}/tables/{LEADS}/enrich/jobs/{job['jobId']}/cancel", timeout=10
            ).raise_for_status()
            assert names(reader.rest()) == ["status", "progress", "finished"]


def test_redis_messages_become_events_and_a_client_leaving_closes_its_subscription(
    leads_store: Store, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REDIS_URL_ENV, redis_url)
    with app_served(leads_store, auth.ApiSettings()) as base_url:
        job = post_job(base_url)
        job_id = job["jobId"]
        publisher = RedisProgress(redis_url)
        try:
            with stream(base_url, job_id, job["publicAccessToken"]) as reader:
                reader.until(lambda e: e.name == "progress", timeout=5)
                assert subscribers(job_id) == 1
                publisher.publish(
                    "progress",
                    job_id,
                    LEADS,
                    phase="enriching",
                    entities_done=2,
                    entities=6,
                    progress=30,
                )
                running, moved = reader.until(lambda e: e.name == "progress", timeout=5)
                # A progress message comes from a running job: the state says so first.
                assert running.name == "status" and running.data["state"] == "running"
                assert moved.data["phase"] == "enriching" and moved.data["progress"] == 30
                assert moved.data["entitiesDone"] == 2 and moved.data["entities"] == 6
                cell = {
                    "row_id": leads_row_id(0),
                    "column_key": "industry",
                    "value": "Software",
                    "status": "done",
                    "confidence": 0.9,
                    "source": "fake_company",
                }
                publisher.publish("cells", job_id, LEADS, cells=[cell])
                [cells] = reader.until(lambda e: e.name == "cells", timeout=5)
                assert cells.data == {
                    "jobId": job_id,
                    "cells": [
                        {
                            "rowId": leads_row_id(0),
                            "columnKey": "industry",
                            "value": "Software",
                            "status": "done",
                            "confidence": 0.9,
                            "source": "fake_company",
                        }
                    ],
                }
                # Progress never goes back, whatever a late message says.
                publisher.publish("progress", job_id, LEADS, phase="enriching", progress=10)
                publisher.publish("progress", job_id, LEADS, phase="enriching", progress=45)
                [later] = reader.until(lambda e: e.name == "progress", timeout=5)
                assert later.data["progress"] == 45
            # The client went away: its subscription (and connection) ends with it.
            wait_until(lambda: subscribers(job_id) == 0, what="the subscription to close")
        finally:
            publisher.close()


def test_a_lost_finished_message_is_made_good_by_the_row(
    leads_store: Store, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's `finished` never reached Redis: the stream reads the row and ends anyway."""
    monkeypatch.setenv(REDIS_URL_ENV, redis_url)
    with app_served(leads_store, auth.ApiSettings()) as base_url:
        job = post_job(base_url)
        with stream(base_url, job["jobId"], job["publicAccessToken"]) as reader:
            reader.until(lambda e: e.name == "progress", timeout=5)
            started = time.monotonic()
            queue.request_cancel(leads_store, job["jobId"])  # no publisher: nothing published
            rest = reader.rest()
        assert names(rest)[-1] == "finished" and rest[-1].data["status"] == "cancelled"
        assert time.monotonic() - started < 5


def pubsub_clients() -> set[str]:
    """Ids of the Redis connections subscribed to something, on the test database."""
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        db = str(client.connection_pool.connection_kwargs.get("db", 0))
        return {str(c["id"]) for c in client.client_list(_type="pubsub") if str(c["db"]) == db}
    finally:
        client.close()


def test_a_stream_outlives_its_redis_connection(
    leads_store: Store, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its subscriber connection killed mid-stream, a stream still hears the ending."""
    monkeypatch.setenv(REDIS_URL_ENV, redis_url)
    with app_served(leads_store, auth.ApiSettings()) as base_url:
        job = post_job(base_url)
        before = pubsub_clients()
        with stream(base_url, job["jobId"], job["publicAccessToken"]) as reader:
            reader.until(lambda e: e.name == "progress", timeout=5)
            [ours] = pubsub_clients() - before
            killer = redis.Redis.from_url(redis_url)
            try:
                assert killer.client_kill_filter(_id=ours) == 1
            finally:
                killer.close()
            queue.request_cancel(leads_store, job["jobId"])  # announced to no one
            rest = reader.rest()
        assert names(rest)[-1] == "finished" and rest[-1].data["status"] == "cancelled"


def test_without_a_reachable_redis_the_stream_polls(
    leads_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REDIS_URL_ENV, f"redis://127.0.0.1:{free_port()}/11")  # nobody listens
    with app_served(leads_store, auth.ApiSettings()) as base_url:
        job = post_job(base_url)
        with stream(base_url, job["jobId"], job["publicAccessToken"]) as reader:
            reader.until(lambda e: e.name == "progress", timeout=10)
            httpx.post(
                f"{base_url}/tables/{LEADS}/enrich/jobs/{job['jobId']}/cancel", timeout=10
            ).raise_for_status()
            rest = reader.rest()
        assert names(rest)[-1] == "finished" and rest[-1].data["status"] == "cancelled"


# -- the engine's `cells` messages ---------------------------------------------------------------


class Collecting:
    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []

    def publish(self, event: str, request_id: str, table_id: str, **counters: Any) -> None:
        self.messages.append((event, counters))

    def close(self) -> None:
        return None


def test_a_page_of_cells_is_split_into_small_messages() -> None:
    patches = [
        RowPatch(
            f"row_{i}",
            {"industry": f"I{i}"},
            {
                "industry": {"status": "done", "confidence": 0.8, "source": "s"},
                "title": {"status": "not_found", "confidence": None, "source": None},
            },
            "done",
            0.8,
            None,
        )
        for i in range(CELLS_PER_MESSAGE)
    ]
    publisher = Collecting()
    publish_cells(publisher, "req_1", "tbl_1", patches)
    sizes = [len(body["cells"]) for event, body in publisher.messages if event == "cells"]
    assert sizes == [CELLS_PER_MESSAGE, CELLS_PER_MESSAGE]  # 2 cells a row
    first = publisher.messages[0][1]["cells"][:2]
    assert first == [
        {
            "row_id": "row_0",
            "column_key": "industry",
            "value": "I0",
            "status": "done",
            "confidence": 0.8,
            "source": "s",
        },
        {
            "row_id": "row_0",
            "column_key": "title",
            "value": None,
            "status": "not_found",
            "confidence": None,
            "source": None,
        },
    ]
