"""`glaze ai ...`, `glaze add-column --prompt` and `glaze mock-llm` as a person runs them: the
installed script in a fresh folder on the embedded SQLite default, the mock LLM on loopback."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from glaze_pipeline.core.store import Store
from glaze_pipeline.testing.mock_llm import MockLlmServer
from glaze_pipeline_tests.test_cli import BIN, clean_env

CONTEXT = "B2B payment companies in the Nordics"


@pytest.fixture(scope="module")
def llm() -> Iterator[MockLlmServer]:
    with MockLlmServer() as server:
        yield server


def run(
    tmp_path: Path, *args: str, llm: MockLlmServer | None = None
) -> subprocess.CompletedProcess[str]:
    env = clean_env(tmp_path)
    if llm is not None:
        env["GLAZE_LLM_BASE_URL"] = llm.url
    return subprocess.run(
        [str(BIN / "glaze"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def table_ids(text: str) -> list[str]:
    return re.findall(r"\btbl_[0-9a-f]{16}\b", text)


def request_ids(text: str) -> list[str]:
    return re.findall(r"\breq_[0-9a-f]{16}\b", text)


def test_generate_accept_then_enrich(tmp_path: Path, llm: MockLlmServer) -> None:
    """The issue's flow: a proposal (table, columns, rows) printed, accepted, then enriched."""
    generated = run(tmp_path, "ai", "generate", CONTEXT, "--rows", "6", "--accept", llm=llm)
    assert generated.returncode == 0, generated.stderr
    out = generated.stdout
    assert "proposed table" in out and "proposed columns" in out and "proposed rows (6)" in out
    assert "created table" in out and "6 rows added" in out
    table_id = out.split("table id: ")[1].split()[0]

    store = Store(f"sqlite:///{tmp_path / '.glaze' / 'glaze.db'}")
    try:
        info = store.get_table(table_id)
        assert len(store.rows_in_order(table_id)) == 6
        ai_keys = [c.key for c in info.columns if c.prompt]
        assert ai_keys, info.columns

        request_id = request_ids(out)[0]
        again = run(tmp_path, "ai", "accept", request_id, llm=llm)
        assert again.returncode == 0, again.stderr
        assert f"extended table {table_id}: 0 columns added, 0 rows added" in again.stdout

        llm.reset()
        enriched = run(tmp_path, "enrich", table_id, llm=llm)
        assert enriched.returncode == 0, enriched.stderr
        assert "succeeded" in enriched.stdout
        # Each AI column asked once per company: 6 rows, 6 companies.
        assert llm.stats()["by_operation"] == {"ai_column": 6 * len(ai_keys)}
        rows = store.rows_in_order(table_id)
        assert all(row.data.get(key) for row in rows for key in ai_keys)

        shown = run(tmp_path, "ai", "show", request_id)
        assert shown.returncode == 0, shown.stderr
        assert "completed" in shown.stdout and "proposed rows" in shown.stdout
        status = run(tmp_path, "status", request_id)
        assert status.returncode == 0, status.stderr
        assert "3/3 steps" in status.stdout and "LLM calls" in status.stdout
        assert "cells" not in status.stdout  # an AI request fills no cell
    finally:
        store.dispose()


def test_columns_and_rows_for_an_existing_table(tmp_path: Path, llm: MockLlmServer) -> None:
    assert run(tmp_path, "seed").returncode == 0
    columns = run(tmp_path, "ai", "columns", "tbl_leads", "--accept", llm=llm)
    assert columns.returncode == 0, columns.stderr
    assert "extended table tbl_leads" in columns.stdout
    rows = run(tmp_path, "ai", "rows", "tbl_leads", "--count", "3", "--accept", llm=llm)
    assert rows.returncode == 0, rows.stderr
    assert "3 rows added" in rows.stdout


def test_an_ai_column_from_the_command_line(tmp_path: Path, llm: MockLlmServer) -> None:
    assert run(tmp_path, "seed").returncode == 0
    question = "Does {company} sell to enterprises? Answer yes or no."
    added = run(tmp_path, "add-column", "tbl_leads", "enterprise", "--prompt", question)
    assert added.returncode == 0, added.stderr
    assert f"AI (company): {question}" in added.stdout
    refused = run(tmp_path, "add-column", "tbl_leads", "ceo", "--prompt", "Who is {ceo}?")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: AI column prompt uses unknown placeholder {ceo}")

    llm.reset()
    enriched = run(tmp_path, "enrich", "tbl_leads", "--columns", "enterprise", llm=llm)
    assert enriched.returncode == 0, enriched.stderr
    calls = llm.stats()["by_operation"]["ai_column"]
    # One question per company the Leads table names (its rows share some companies).
    assert 0 < calls < 10


def test_bad_input_is_one_line_and_queues_nothing(tmp_path: Path, llm: MockLlmServer) -> None:
    assert run(tmp_path, "seed").returncode == 0
    for args, words, with_llm in (
        (("ai", "generate", CONTEXT), "GLAZE_LLM_BASE_URL is not set", False),
        (("ai", "generate", "   "), "context", True),
        (("ai", "generate", "x" * 5000), "context", True),
        (("ai", "columns", "tbl_nope"), "unknown table 'tbl_nope'", True),
        (("ai", "generate", CONTEXT, "--table", "tbl_nope"), "unknown table 'tbl_nope'", True),
        (("ai", "accept", "req_nope"), "unknown request 'req_nope'", True),
        (("ai", "retry", "req_nope"), "unknown request 'req_nope'", True),
    ):
        result = run(tmp_path, *args, llm=llm if with_llm else None)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert words in lines[0], (args, lines[0])
    status = run(tmp_path, "status")
    assert "table_generation" not in status.stdout and "column_suggestions" not in status.stdout


def test_mock_llm_serves_until_stopped(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "mock-llm.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(BIN / "glaze"), "mock-llm", "--port", str(port)],
            cwd=tmp_path,
            env=clean_env(tmp_path),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "glaze mock-llm did not answer"
                time.sleep(0.1)
        assert models.status_code == 200
        assert models.json()["data"][0]["id"] == "glaze-mock-1"
        busy = subprocess.run(
            [str(BIN / "glaze"), "mock-llm", "--port", str(port)],
            cwd=tmp_path,
            env=clean_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    finally:
        process.terminate()
        process.wait(timeout=20)
