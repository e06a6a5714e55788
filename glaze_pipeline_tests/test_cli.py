"""The README's commands, run for real in a fresh folder: `glaze demo`, `dagster job execute`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dagster import DagsterInstance

from glaze_pipeline.core.store import Store
from glaze_pipeline.defs.assets import ENRICHED_TABLE

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    env["GLAZE_HOME"] = str(tmp_path / ".glaze")
    return env


def glaze(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "glaze"), *args],
        cwd=tmp_path,
        env=env or clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_fills_the_leads_table(tmp_path: Path) -> None:
    result = glaze(tmp_path, "demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "before" in out and "after" in out
    assert "linkedin.com/in/fake-user-ada" in out  # an enriched LinkedIn URL
    assert "partial" in out  # one row has no identifier: honest status
    assert (tmp_path / ".glaze" / "glaze.db").exists()
    store = Store(f"sqlite:///{tmp_path / '.glaze' / 'glaze.db'}")
    rows = store.rows_in_order("tbl_leads")
    assert sum(r.status == "done" for r in rows) == 9
    store.dispose()


def test_dagster_job_execute_with_a_seed_config(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    env["DAGSTER_HOME"] = str(tmp_path)
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    assert glaze(tmp_path, "seed", env=env).returncode == 0
    result = subprocess.run(
        [
            str(BIN / "dagster"),
            "job",
            "execute",
            "-m",
            "glaze_pipeline.definitions",
            "-j",
            "enrich_table",
            "-c",
            str(REPO / "seed" / "leads.yaml"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        event = instance.get_latest_materialization_event(ENRICHED_TABLE)
        assert event is not None
        materialization = event.asset_materialization
        assert materialization is not None and materialization.partition == "tbl_leads"
        assert materialization.metadata["rows_written"].value == 10


def test_import_csv_then_enrich(tmp_path: Path) -> None:
    csv = tmp_path / "leads.csv"
    csv.write_text(
        "Full Name,Work Email,Website,Industry\nAda,ada@acme.com,acme.com,\nBob,bob@acme.com,,\n"
    )
    imported = glaze(tmp_path, "import-csv", str(csv))
    assert imported.returncode == 0, imported.stderr
    table_id = next(w for w in imported.stdout.split() if w.startswith("tbl_"))
    enriched = glaze(tmp_path, "enrich", table_id, "--columns", "industry")
    assert enriched.returncode == 0, enriched.stderr
    assert "succeeded" in enriched.stdout
    assert "fake_company': 1" in enriched.stdout  # two rows, one company


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    assert glaze(tmp_path, "seed").returncode == 0
    result = glaze(tmp_path, "enrich", "tbl_leads", "--columns", "nope")
    assert result.returncode == 2
    assert "no column with key 'nope'" in result.stderr
    result = glaze(tmp_path, "show", "tbl_missing")
    assert result.returncode == 2 and "unknown table 'tbl_missing'" in result.stderr


def test_estimate_prints_the_expectation_the_bound_and_the_guidance(tmp_path: Path) -> None:
    import json

    assert glaze(tmp_path, "seed").returncode == 0
    grid = ("estimate", "tbl_leads", "--columns", "industry,employee_count", "--budget", "2")
    result = glaze(tmp_path, *grid, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    assert report["request_id"].startswith("req_")
    assert 0 < report["expected_cost"] <= report["max_cost"]
    company = report["providers"]["fake_company"]
    assert {"status", "reason", "expected_calls", "expected_cost", "max_cost"} <= company.keys()
    assert company["status"] == "ok" and company["reason"] is None
    assert report["budget_guidance"]["at_budget"]["budget"] == 2

    text = glaze(tmp_path, *grid)
    assert text.returncode == 0, text.stderr
    assert "upper bound" in text.stdout and "fake_company" in text.stdout
    assert "cells this job is expected to fill" in text.stdout
    assert "with budget 2:" in text.stdout
