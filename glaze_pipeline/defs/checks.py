"""Asset checks on `enriched_table`: what must hold of the data whatever the jobs did.

Two ways in. `enrich_table`'s last op reports each check for what its own request wrote (a
failing check shows on the run and on the asset, beside the materialization). And each is an
`@asset_check` over all the data, to run from the UI's asset page ("Checks" → Execute) or as the
`data_checks` job: `dagster job execute -m glaze_pipeline.definitions -j data_checks`.
The work is in `core/checks.py`; here are only their names, descriptions and metadata.
"""

from collections.abc import Iterator

from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetSelection,
    MetadataValue,
    asset_check,
    define_asset_job,
)

from glaze_pipeline.core import checks
from glaze_pipeline.core.store import Store
from glaze_pipeline.defs.assets import ENRICHED_TABLE
from glaze_pipeline.defs.resources import GlazeDatabase

BUDGET = AssetCheckSpec(
    "budget_never_exceeded",
    asset=ENRICHED_TABLE,
    description="No request spent more than its budget (its ledger's settled cost).",
)
ROWS_SETTLED = AssetCheckSpec(
    "no_row_left_in_flight",
    asset=ENRICHED_TABLE,
    description="No row stays `queued` or `running` once the request holding it has ended.",
)
PROVENANCE = AssetCheckSpec(
    "every_cell_has_provenance",
    asset=ENRICHED_TABLE,
    description="Every filled cell records its source, confidence, fetch time and request.",
)


def budget_result(store: Store, request_id: str | None = None) -> tuple[bool, dict]:
    overruns = checks.budget_overruns(store, request_id)
    return not overruns, {
        "requests_over_budget": len(overruns),
        "sample": MetadataValue.json(
            [
                {"request_id": o.request_id, "budget": o.budget, "cost": o.cost}
                for o in overruns[: checks.SAMPLE]
            ]
        ),
    }


def rows_result(store: Store, table_id: str | None = None) -> tuple[bool, dict]:
    left = checks.rows_in_flight(store, table_id)
    return left.count == 0, {
        "rows_in_flight": left.count,
        "sample_row_ids": MetadataValue.json(left.sample),
    }


def provenance_result(
    store: Store, table_ids: list[str], request_id: str | None = None
) -> tuple[bool, dict]:
    checked = missing = rows = 0
    sampled = False
    sample: list[str] = []
    for table_id in table_ids:
        found = checks.cells_without_provenance(store, table_id, request_id=request_id)
        checked += found.cells_checked
        missing += found.count
        rows += found.rows_checked or 0
        sampled = sampled or found.sampled
        sample.extend(found.sample[: checks.SAMPLE - len(sample)])
    metadata: dict = {
        "cells_checked": checked,
        "cells_without_provenance": missing,
        "sample": MetadataValue.json(sample),
    }
    if sampled:  # a run of checks.PROVENANCE_SAMPLE_ROWS rows per table, from a random id
        metadata.update(sampled=True, rows_checked=rows)
    return missing == 0, metadata


def evaluations_for_request(store: Store, request_id: str, table_id: str) -> Iterator:
    """The three checks for what one request wrote: `enrich_table` logs them as it closes."""
    for spec, (passed, metadata) in (
        (BUDGET, budget_result(store, request_id)),
        (ROWS_SETTLED, rows_result(store, table_id)),
        (PROVENANCE, provenance_result(store, [table_id], request_id)),
    ):
        yield AssetCheckEvaluation(
            asset_key=ENRICHED_TABLE,
            check_name=spec.name,
            passed=passed,
            metadata={"request_id": request_id, "table_id": table_id, **metadata},
            severity=AssetCheckSeverity.ERROR,
        )


@asset_check(asset=ENRICHED_TABLE, name=BUDGET.name, description=BUDGET.description)
def budget_never_exceeded(glaze_db: GlazeDatabase) -> AssetCheckResult:
    with glaze_db.open_store() as store:
        passed, metadata = budget_result(store)
    return AssetCheckResult(passed=passed, metadata=metadata)


@asset_check(asset=ENRICHED_TABLE, name=ROWS_SETTLED.name, description=ROWS_SETTLED.description)
def no_row_left_in_flight(glaze_db: GlazeDatabase) -> AssetCheckResult:
    with glaze_db.open_store() as store:
        passed, metadata = rows_result(store)
    return AssetCheckResult(passed=passed, metadata=metadata)


@asset_check(asset=ENRICHED_TABLE, name=PROVENANCE.name, description=PROVENANCE.description)
def every_cell_has_provenance(glaze_db: GlazeDatabase) -> AssetCheckResult:
    with glaze_db.open_store() as store:
        tables = [table_id for table_id, _, _ in store.list_tables()]
        passed, metadata = provenance_result(store, tables)
    return AssetCheckResult(passed=passed, metadata={"tables": len(tables), **metadata})


GLAZE_ASSET_CHECKS = [budget_never_exceeded, no_row_left_in_flight, every_cell_has_provenance]

data_checks = define_asset_job(
    "data_checks",
    selection=AssetSelection.checks(*GLAZE_ASSET_CHECKS),
    description="Run the asset checks over all the data (budgets, rows in flight, provenance).",
)
