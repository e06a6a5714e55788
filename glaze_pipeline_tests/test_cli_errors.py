"""Errors a person can read: the real `glaze` entry point (`glaze_pipeline.cli:main`), on the
SQLite default and on Postgres, for every kind of bad input and every service that is down.

The rule: an input or environment error is ONE `error: ...` line on stderr and exit 2, with
nothing written; a bug is one `error: internal error (...)` line and exit 1; `--debug` (or
GLAZE_DEBUG=1) adds the traceback; click's own usage errors keep click's message and exit 2.

Most cases call `main([...])` in this process (the function the console script calls, exit
code and streams included); the launcher, the mock server and `--debug` run as real
subprocesses of the installed `glaze` script.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.text import Text
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from glaze_pipeline.bench.stack import free_port, fresh_postgres
from glaze_pipeline.cli import main
from glaze_pipeline.cli.errors import one_line
from glaze_pipeline.cli.rendering import display_text
from glaze_pipeline.core.errors import GlazeError
from glaze_pipeline.core.schema import EnrichmentRequest
from glaze_pipeline.core.seed import seed_leads
from glaze_pipeline.core.store import ColumnDef, Store
from glaze_pipeline.runner import run_enrich_job

BIN = Path(sys.executable).parent
GLAZE_ENV = (
    "GLAZE_DATABASE_URL",
    "GLAZE_REDIS_URL",
    "GLAZE_PROVIDERS_FILE",
    "GLAZE_DEBUG",
    "DAGSTER_HOME",
)


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.strip().splitlines()

    def one_error_line(self) -> str:
        """The only line on stderr, which must be `error: ...` (exit 2 checked by the caller)."""
        assert len(self.err_lines) == 1, self.err
        assert self.err_lines[0].startswith("error: "), self.err
        assert "Traceback" not in self.err
        return self.err_lines[0]


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh GLAZE_HOME, and none of the developer's GLAZE_/DAGSTER_ settings."""
    for name in GLAZE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLAZE_HOME", str(tmp_path / ".glaze"))
    return tmp_path / ".glaze"


def glaze(capsys: pytest.CaptureFixture[str], *args: str) -> Ran:
    """`glaze ARGS` through the real entry point, in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    captured = capsys.readouterr()
    code = exited.value.code
    return Ran(code if isinstance(code, int) else (0 if code is None else 1), *captured)


def glaze_process(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> Ran:
    """`glaze ARGS` as a subprocess of the installed script (a hang fails the test)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    base["GLAZE_HOME"] = str(cwd / ".glaze")
    done = subprocess.run(
        [str(BIN / "glaze"), *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def requests_count(store: Store) -> int:
    with store.session() as session:
        return int(session.scalar(select(func.count()).select_from(EnrichmentRequest)) or 0)


def down_postgres_url() -> str:
    """A Postgres URL (with a password, to check it is hidden) where nothing listens."""
    return f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{free_port()}/x"


@pytest.fixture
def empty_postgres(postgres_url: str) -> Iterator[str]:
    """A Postgres database that exists but was never migrated."""
    with fresh_postgres(postgres_url, migrate=False) as url:
        yield url


# --- ids that name nothing ---------------------------------------------------------------------


def test_unknown_table_column_row_and_request_are_one_line(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_leads(store)
    notes = store.create_table("Notes", [ColumnDef("website"), ColumnDef("notes")])
    notes_column = notes.column_by_key("notes").id
    db = ("--database-url", store.url)
    cases = [
        (("enrich", "tbl_nope"), "error: unknown table 'tbl_nope'"),
        (("show", "tbl_nope"), "error: unknown table 'tbl_nope'"),
        (
            ("enrich", "tbl_leads", "--columns", "nope"),
            "error: table tbl_leads has no column with key 'nope'",
        ),
        (
            ("estimate", "tbl_leads", "--columns", "nope"),
            "error: table tbl_leads has no column with key 'nope'",
        ),
        # Before: a Dagster run started, failed, and printed 56 lines of stack first.
        (
            ("enrich", "tbl_leads", "--columns", "industry", "--rows", "row_nope"),
            "error: unknown row ids in table tbl_leads: row_nope",
        ),
        (
            ("enqueue", "tbl_leads", "--columns", "industry", "--rows", "row_nope"),
            "error: unknown row ids in table tbl_leads: row_nope",
        ),
        (("enrich", "tbl_leads", "--rows", "row_leads_01"), "error: --rows needs --columns"),
        (
            ("enrich", notes.id, "--columns", "notes"),
            f"error: columns map to no enrichment field: 'notes' ({notes_column}); give them a "
            "field such as 'company.industry', or an AI prompt such as 'Does {company} sell to "
            "enterprises? Answer yes or no.'",
        ),
        (("status", "req_nope"), "error: unknown request 'req_nope'"),
        (("cancel", "req_nope"), "error: unknown request 'req_nope'"),
    ]
    for args, expected in cases:
        ran = glaze(capsys, *db, *args)
        assert ran.code == 2, (args, ran)
        assert ran.one_error_line() == expected, args
    assert requests_count(store) == 0  # refused before any request or run existed


# --- numbers out of range, refused at the edge ------------------------------------------------


def test_bad_numbers_are_refused_at_the_edge_and_write_nothing(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_leads(store)
    tables_before = store.list_tables()
    db = ("--database-url", store.url)
    grid = ("tbl_leads", "--columns", "industry")
    cases = [
        (("enrich", *grid, "--chunk-size", "0"), "'--chunk-size': 0 is not in the range x>=1"),
        (("enrich", *grid, "--concurrency", "-3"), "'--concurrency': -3 is not in the range"),
        (("enrich", *grid, "--budget", "nan"), "'--budget': budget must be a number >= 0"),
        (("enrich", *grid, "--budget", "-1"), "got -1.0"),
        (("enrich", *grid, "--budget", "inf"), "got inf"),
        (("enrich", *grid, "--budget", "lots"), "'--budget': 'lots' is not a number"),
        (("estimate", *grid, "--budget", "nan"), "'--budget': budget must be a number >= 0"),
        (("enqueue", *grid, "--budget", "-1"), "'--budget': budget must be a number >= 0"),
        (("enqueue", *grid, "--budget", "NaN"), "got nan"),
        (("enqueue", *grid, "--priority", "99999999999"), "'--priority': 99999999999 is not"),
        (("show", "tbl_leads", "--limit", "0"), "'--limit': 0 is not in the range"),
        (("show", "tbl_leads", "--limit", "-5"), "'--limit': -5 is not in the range"),
        (("seed", "--rows", "-1"), "'--rows': -1 is not in the range x>=1"),
        (("seed", "--rows", "0"), "'--rows': 0 is not in the range x>=1"),
        (("seed", "--rows", "5", "--unique-companies", "0"), "'--unique-companies': 0 is not"),
        (("launcher", "--max-runs", "0"), "'--max-runs': 0 is not in the range x>=1"),
        (("launcher", "--poll", "0"), "'--poll': 0.0 is not in the range x>0"),
        (("launcher", "--poll", "nan"), "'--poll': nan is not a finite number"),
        (("launcher", "--poll", "inf"), "'--poll': inf is not a finite number"),
        (("enrich", *grid, "--budget", "1e13"), "got 10000000000000.0"),
        (("mock-providers", "--port", "99999"), "'--port': 99999 is not in the range 1<=x<=65535"),
        (("mock-providers", "--port", "0"), "'--port': 0 is not in the range"),
    ]
    for args, expected in cases:
        ran = glaze(capsys, *db, *args)
        assert ran.code == 2, (args, ran)
        assert "Error: Invalid value for '--" in ran.err and expected in ran.err, (args, ran.err)
        assert "Traceback" not in ran.err
    ran = glaze(capsys, *db, "seed", "--unique-people", "3")
    assert ran.code == 2
    assert ran.one_error_line() == "error: --unique-companies and --unique-people need --rows"
    assert requests_count(store) == 0
    assert store.list_tables() == tables_before  # `seed --rows -1` left an empty table before


# --- the run itself: a failure inside Dagster is one line ---------------------------------------


def test_a_run_that_fails_on_bad_input_raises_its_own_message(store: Store) -> None:
    """The config bypasses the CLI's options (as a script would): Dagster's Failure is unwrapped
    to the job's message; before, `dagster._core.definitions.events.Failure: ...` after 88 lines."""
    seed_leads(store)
    config = {"table_id": "tbl_leads", "column_ids": ["col_leads_industry"], "chunk_size": 0}
    with pytest.raises(GlazeError) as raised:
        run_enrich_job(store.url, config)
    message = str(raised.value)
    assert message.startswith("invalid enrich_table config: chunk_size must be >= 1, got 0 (run ")
    assert "dagster" not in message and "\n" not in message


def test_a_bug_inside_the_run_is_one_internal_error_line(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from glaze_pipeline.core import engine

    def broken_chunk(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a bug in the chunk")

    monkeypatch.setattr(engine, "enrich_span", broken_chunk)  # the enrich step's work
    seed_leads(store)
    ran = glaze(capsys, "--database-url", store.url, "enrich", "tbl_leads", "--columns", "industry")
    assert ran.code == 1, ran
    last = ran.err_lines[-1]
    assert last.startswith("error: internal error (RuntimeError: a bug in the chunk (run "), last
    assert last.endswith("); run with --debug for the traceback")
    # Dagster's own failure records (stack traces, skipped steps) are not printed: progress
    # lines (INFO/WARNING, one line each) and the one error line only.
    assert "Traceback" not in ran.err and "Stack Trace" not in ran.err, ran.err
    assert all(" - dagster - " in line for line in ran.err_lines[:-1]), ran.err
    assert not any(" - ERROR - " in line for line in ran.err_lines), ran.err


def test_an_unexpected_error_is_one_line_exit_1_and_debug_shows_the_traceback(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Store) -> list[tuple[str, str, int]]:
        raise KeyError("tables")

    monkeypatch.setattr(Store, "list_tables", broken)
    ran = glaze(capsys, "--database-url", store.url, "tables")
    assert ran.code == 1
    assert ran.one_error_line() == (
        "error: internal error (KeyError: 'tables'); run with --debug for the traceback"
    )
    for debug_args, env in ((("--debug",), None), ((), "1")):
        if env is not None:
            monkeypatch.setenv("GLAZE_DEBUG", env)
        ran = glaze(capsys, *debug_args, "--database-url", store.url, "tables")
        assert ran.code == 1
        assert ran.err.startswith("Traceback (most recent call last):"), ran.err
        assert ran.err_lines[-1] == "error: internal error (KeyError: 'tables')"


# --- files and services ------------------------------------------------------------------------


def test_a_bad_providers_file_is_one_line(
    store: Store,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    ran = glaze(capsys, "providers", "--config", "/nonexistent.yaml")
    assert ran.code == 2
    assert ran.one_error_line().startswith(
        "error: cannot read providers file /nonexistent.yaml: [Errno 2] No such file"
    )
    malformed = tmp_path / "providers.yaml"
    malformed.write_text("providers: [\n  {name: x\n")
    ran = glaze(capsys, "providers", "--config", str(malformed))
    assert ran.code == 2
    assert ran.one_error_line().startswith(f"error: providers file {malformed} is not valid YAML")
    # The same file for a run: refused before the run starts, nothing recorded.
    seed_leads(store)
    monkeypatch.setenv("GLAZE_PROVIDERS_FILE", str(malformed))
    ran = glaze(capsys, "--database-url", store.url, "enrich", "tbl_leads", "--columns", "industry")
    assert ran.code == 2
    assert "is not valid YAML" in ran.one_error_line()
    assert requests_count(store) == 0


def test_postgres_down_is_one_line_naming_the_url_without_its_password(tmp_path: Path) -> None:
    """The real script: before, 130 lines of psycopg and SQLAlchemy traceback."""
    url = down_postgres_url()
    shown = url.replace(":s3cret@", ":***@")
    ran = glaze_process(tmp_path, "--database-url", url, "tables")
    assert ran.code == 2
    assert (
        ran.one_error_line() == f"error: cannot reach the database at {shown}: connection refused"
    )
    assert "s3cret" not in ran.err
    ran = glaze_process(tmp_path, "--debug", "--database-url", url, "tables")
    assert ran.code == 2 and "Traceback (most recent call last)" in ran.err
    assert ran.err_lines[-1] == f"error: cannot reach the database at {shown}: connection refused"


def test_a_database_that_cannot_be_used_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], empty_postgres: str, postgres_url: str
) -> None:
    # Never migrated, on both databases.
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    for url in (fresh, empty_postgres):
        ran = glaze(capsys, "--database-url", url, "tables")
        assert ran.code == 2
        assert ran.one_error_line() == (
            f"error: the database at {url} has no Glaze schema: run `glaze db upgrade`"
        )
    # No such database on the server.
    missing = make_url(postgres_url).set(database="glaze_no_such_db")
    missing_url = missing.render_as_string(hide_password=False)
    ran = glaze(capsys, "--database-url", missing_url, "tables")
    assert ran.code == 2
    assert ran.one_error_line() == (
        f'error: cannot reach the database at {missing_url}: database "glaze_no_such_db" '
        "does not exist"
    )
    # A SQLite path whose folder cannot exist (a file is in the way).
    (tmp_path / "a_file").write_text("")
    blocked = f"sqlite:///{tmp_path / 'a_file' / 'glaze.db'}"
    ran = glaze(capsys, "--database-url", blocked, "tables")
    assert ran.code == 2
    assert ran.one_error_line().startswith(f"error: cannot open the database at {blocked}: ")
    # URLs that name no database Glaze can use.
    for bad, expected in (
        ("not a url", "error: the database URL cannot be parsed"),
        ("mysql://u@127.0.0.1/x", "error: the database URL needs a driver that is not installed"),
    ):
        ran = glaze(capsys, "--database-url", bad, "tables")
        assert ran.code == 2
        assert ran.one_error_line().startswith(expected)


def test_redis_down_is_one_line_before_any_run(
    store: Store,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
) -> None:
    seed_leads(store)
    args = ("--database-url", store.url, "enrich", "tbl_leads", "--columns", "industry")
    port = free_port()
    monkeypatch.setenv("GLAZE_REDIS_URL", f"redis://:pw-s3cret@127.0.0.1:{port}/0")
    ran = glaze(capsys, *args)
    assert ran.code == 2
    assert ran.one_error_line() == (
        f"error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0: connection refused"
    )
    monkeypatch.setenv("GLAZE_REDIS_URL", f"127.0.0.1:{port}")
    ran = glaze(capsys, *args)
    assert ran.code == 2
    assert ran.one_error_line().startswith(f"error: GLAZE_REDIS_URL 127.0.0.1:{port} is not usable")
    assert requests_count(store) == 0  # before: the run went ahead, warning per publisher
    # A Redis that answers is used, not refused.
    monkeypatch.setenv("GLAZE_REDIS_URL", redis_url)
    ran = glaze(capsys, *args)
    assert ran.code == 0, ran.err
    assert requests_count(store) == 1


# --- the launcher: an outage at start is one line, exit 2 (before: retried forever) -------------


WORKSPACE_WITHOUT_THE_JOB = {
    "data": {
        "workspaceOrError": {
            "__typename": "Workspace",
            "locationEntries": [
                {
                    "name": "other_project",
                    "loadStatus": "LOADED",
                    "locationOrLoadError": {
                        "__typename": "RepositoryLocation",
                        "name": "other_project",
                        "repositories": [{"name": "__repository__", "jobs": [{"name": "etl"}]}],
                    },
                }
            ],
        }
    }
}


@contextlib.contextmanager
def loopback_graphql(status: int, body: Mapping[str, object]) -> Iterator[str]:
    """A loopback HTTP server answering every POST with `status` and `body` as JSON: a Dagster
    webserver serving other code, or something that is not Dagster at all."""
    payload = json.dumps(body).encode()

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/graphql"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_the_launcher_stops_at_once_when_what_it_needs_is_missing(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if database == "sqlite":
        unmigrated = f"sqlite:///{tmp_path / 'fresh.db'}"
        migrated_store = request.getfixturevalue("sqlite_store")
    else:
        unmigrated = request.getfixturevalue("empty_postgres")
        migrated_store = request.getfixturevalue("pg_store")
    migrated = migrated_store.url
    cases = [
        (
            ("--database-url", unmigrated, "launcher"),
            f"error: the database at {unmigrated} has no Glaze schema: run `glaze db upgrade`",
        ),
        (
            ("--database-url", migrated, "launcher", "--graphql-url", "http://127.0.0.1:{p}/g"),
            "error: cannot reach Dagster's GraphQL API at http://127.0.0.1:{p}/g: "
            "[Errno 111] Connection refused",
        ),
    ]
    if database == "postgres":
        down = down_postgres_url()
        shown = down.replace(":s3cret@", ":***@")
        cases.append(
            (
                ("--database-url", down, "launcher"),
                f"error: cannot reach the database at {shown}: connection refused",
            )
        )
    for args, expected in cases:
        port = str(free_port())
        started = time.monotonic()
        ran = glaze_process(tmp_path, *(a.replace("{p}", port) for a in args), timeout=60)
        assert ran.code == 2, (args, ran)
        assert ran.one_error_line() == expected.replace("{p}", port)
        assert time.monotonic() - started < 30  # stopped, not waiting the outage out
    # A Dagster that serves other code, and a server that is not Dagster.
    with loopback_graphql(200, WORKSPACE_WITHOUT_THE_JOB) as url:
        ran = glaze_process(tmp_path, "--database-url", migrated, "launcher", "--graphql-url", url)
    assert ran.code == 2
    assert ran.one_error_line() == (
        f"error: Dagster at {url} cannot run enrich_table: "
        "no code location has job __repository__.enrich_table"
    )
    with loopback_graphql(404, {"detail": "not here"}) as url:
        ran = glaze_process(tmp_path, "--database-url", migrated, "launcher", "--graphql-url", url)
    assert ran.code == 2
    assert ran.one_error_line().startswith(
        f"error: cannot reach Dagster's GraphQL API at {url}: unexpected answer from {url}: "
        "HTTP 404"
    )
    # Redis configured and down: the forked runs would miss it.
    redis_port = free_port()
    ran = glaze_process(
        tmp_path,
        "--database-url",
        migrated,
        "launcher",
        env={"GLAZE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
    )
    assert ran.code == 2
    assert ran.one_error_line() == (
        f"error: cannot reach Redis at redis://127.0.0.1:{redis_port}/0: connection refused"
    )


# --- the mock server -----------------------------------------------------------------------------


def test_mock_providers_on_a_port_in_use_or_with_a_bad_config_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = glaze_process(tmp_path, "mock-providers", "--port", str(port), timeout=30)
    assert ran.code == 2
    assert ran.one_error_line() == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "mock providers on" not in ran.out  # it never claimed to listen
    ran = glaze_process(tmp_path, "mock-providers", "--config", "/nonexistent.yaml", timeout=30)
    assert ran.code == 2
    assert ran.one_error_line().startswith("error: cannot use mock config /nonexistent.yaml: ")


# --- show: user data printed as typed, and bounded -------------------------------------------------


MARKUP = "[bold]x[/bold] [red]y [/oops]"  # short enough for one line of its column


def test_show_prints_markup_literally_and_each_cells_status(
    store: Store, capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    table = store.create_table(
        "[bold]Leads[/bold]",
        [
            ColumnDef("name"),
            ColumnDef("website"),
            ColumnDef("industry", field="company.industry"),
            ColumnDef("notes"),
        ],
    )
    store.insert_rows(
        table.id,
        [
            {"name": "Ada", "website": "acme.com", "industry": "", "notes": MARKUP},
            {"name": "Line\nbreak\x1b[31m", "website": "", "industry": "", "notes": ""},
        ],
    )
    db = ("--database-url", store.url)
    ran = glaze(capsys, *db, "enrich", table.id, "--columns", "industry")
    assert ran.code == 0, ran.err
    # No DAGSTER_HOME: the run is recorded in .glaze/dagster, as the README says.
    request_id = next(word for word in ran.out.split() if word.startswith("req_"))
    run_id = store.get_request(request_id).run_id
    with DagsterInstance.from_config(str(home / "dagster")) as instance:
        assert run_id is not None and instance.get_run_by_id(run_id) is not None

    ran = glaze(capsys, *db, "show", table.id, "--meta")
    assert ran.code == 0, ran.err
    assert MARKUP in ran.out  # before: the tags vanished, and `[/oops]` crashed rich
    assert "[bold]Leads[/bold]" in ran.out
    assert "[done:fake_company]" in ran.out  # before: rich ate the status as a tag
    assert "[failed:-]" in ran.out  # the row with no identifier
    assert "Line\u23cebreak" in ran.out and "\x1b" not in ran.out  # one line, no escapes
    ran = glaze(capsys, *db, "tables")
    assert "[bold]Leads[/bold]" in ran.out


def test_show_truncates_a_huge_cell_quickly(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: rich laid out every character (a 50 MB cell: 10 minutes, 850 MB)."""
    table = store.create_table("Big", [ColumnDef("name"), ColumnDef("notes")])
    huge = "word " * 1_000_000 + "THE-END"  # 5 MB
    store.insert_rows(table.id, [{"name": "Ada", "notes": huge}, {"name": "Bob", "notes": "ok"}])
    started = time.monotonic()
    ran = glaze(capsys, "--database-url", store.url, "show", table.id)
    seconds = time.monotonic() - started
    assert ran.code == 0, ran.err
    assert seconds < 5, f"show took {seconds:.1f}s"
    assert len(ran.out) < 10_000, len(ran.out)
    assert "Ada" in ran.out and "Bob" in ran.out and "\u2026" in ran.out
    assert "THE-END" not in ran.out


# --- the rest of the contract ----------------------------------------------------------------------


def test_cancel_on_an_ended_request_changes_nothing(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_leads(store)
    db = ("--database-url", store.url)
    ran = glaze(capsys, *db, "enrich", "tbl_leads", "--columns", "industry")
    assert ran.code == 0, ran.err
    request_id = next(word for word in ran.out.split() if word.startswith("req_"))
    ended = store.get_request(request_id).status
    ran = glaze(capsys, *db, "cancel", request_id)
    assert ran.code == 0
    assert ran.out.strip() == f"{request_id}: already ended {ended}; nothing to cancel"
    after = store.get_request(request_id)
    assert after.status == ended and after.cancel_requested is False


def test_the_cli_closes_the_store_it_opens(
    pg_store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every store a command opens is disposed when it returns, error or not, so no Postgres
    connection of the command is left open (counting the server's connections instead was
    racy: other threads of the test process connect too)."""
    opened: list[Store] = []
    disposed: list[Store] = []
    original_init, original_dispose = Store.__init__, Store.dispose

    def tracked_init(self: Store, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        opened.append(self)

    def tracked_dispose(self: Store) -> None:
        disposed.append(self)
        original_dispose(self)

    seed_leads(pg_store)
    monkeypatch.setattr(Store, "__init__", tracked_init)
    monkeypatch.setattr(Store, "dispose", tracked_dispose)
    for args in (("tables",), ("show", "tbl_leads"), ("show", "tbl_nope")):
        opened.clear()
        disposed.clear()
        glaze(capsys, "--database-url", pg_store.url, *args)
        assert opened, args
        assert all(any(d is o for d in disposed) for o in opened), args
        assert all(o.engine.pool.checkedout() == 0 for o in opened), args


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    ran = glaze(capsys, "--help")
    assert ran.code == 0
    assert "Exit codes:" in ran.out
    assert "0  done" in ran.out
    assert "1  internal error" in ran.out
    assert "2  bad input, or a service (database, Redis, Dagster) that cannot be reached" in ran.out
    assert "--debug" in ran.out


# --- fuzz: whatever a cell or an error message holds, the display is one bounded line -----------

FUZZ_TRIED = {"display_text": 0, "one_line": 0}


@settings(max_examples=400, deadline=None, database=None)
@given(st.one_of(st.text(max_size=400), st.none(), st.integers(), st.floats(), st.lists(st.text())))
def test_display_text_is_one_bounded_line_for_any_value(value: object) -> None:
    FUZZ_TRIED["display_text"] += 1
    started = time.perf_counter()
    shown = display_text(value, limit=60)
    assert time.perf_counter() - started < 0.05
    assert len(shown) <= 60
    assert "\n" not in shown and "\r" not in shown and "\x1b" not in shown
    assert not any(unicodedata.category(char) == "Cc" for char in shown)
    printed = Console(width=200, file=io.StringIO(), markup=True)
    printed.print(Text(shown))  # Text: never parsed as markup, whatever the value holds


@settings(max_examples=400, deadline=None, database=None)
@given(st.text(max_size=3000))
def test_one_line_is_one_bounded_line_for_any_message(message: str) -> None:
    FUZZ_TRIED["one_line"] += 1
    line = one_line(message, limit=500)
    assert len(line) <= 500
    assert len(line.splitlines()) <= 1


def test_fuzz_counts() -> None:
    """Run after the two fuzz tests (file order): says how many inputs they tried."""
    print(f"fuzz inputs tried: {FUZZ_TRIED}")
    assert all(count > 0 for count in FUZZ_TRIED.values()), FUZZ_TRIED


def test_a_column_that_maps_to_no_field_can_be_given_one(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """`carrier` maps to no field (inference never guesses); `set-field` says what it means,
    `-` goes back to inference, and an unknown field or column is one line naming it."""
    table = store.create_table("Shipments", [ColumnDef("website"), ColumnDef("carrier")])
    db = ("--database-url", store.url)
    refused = glaze(capsys, *db, "enrich", table.id, "--columns", "carrier")
    assert refused.code == 2 and "map to no enrichment field: 'carrier'" in refused.one_error_line()
    given = glaze(capsys, *db, "set-field", table.id, "carrier", "company.industry")
    assert given.code == 0 and "company.industry" in given.out
    assert store.get_table(table.id).column_by_key("carrier").field == "company.industry"
    bad = glaze(capsys, *db, "set-field", table.id, "carrier", "company.nope")
    assert bad.code == 2 and "unknown field 'company.nope'" in bad.one_error_line()
    missing = glaze(capsys, *db, "set-field", table.id, "nope", "company.industry")
    assert missing.code == 2 and "no column with key 'nope'" in missing.one_error_line()
    assert glaze(capsys, *db, "set-field", table.id, "carrier", "-").code == 0
    assert store.get_table(table.id).column_by_key("carrier").field is None
