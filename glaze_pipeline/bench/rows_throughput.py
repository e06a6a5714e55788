"""Rows through the pipeline on Postgres: detection and writing rows/s, without providers.

Seeds N rows of S5's shape (3 company columns, one company per 10 rows) into a throwaway
Postgres database, then times the engine's own stages as they are: `engine.detect_entities`
(read pages, split, detect, index, hold `running`) and `engine.apply_results` (read pages,
build each row's patch, one compare-and-set JSON merge per page) with every entity answered.
So the figures are the product's, not a model of it. Prints wall and this process's CPU per
stage, statements, and peak RSS.

    .venv/bin/python -m glaze_pipeline.bench.rows_throughput --rows 300000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from glaze_pipeline.bench.stack import fresh_postgres
from glaze_pipeline.core import checks, engine
from glaze_pipeline.core.models import CellStatus, FieldOutcome, FieldValue, Selection
from glaze_pipeline.core.seed import GENERATED_COMPANY_KEYS, seed_generated
from glaze_pipeline.core.store import Store

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Throughput:
    rows: int
    entities: int
    seed_s: float
    detect_s: float
    detect_cpu_s: float
    detect_rows_per_s: float
    detect_statements: int
    apply_s: float
    apply_cpu_s: float
    apply_rows_per_s: float
    apply_statements: int
    rows_written: int
    # The provenance check as a job runs it at its close (sampled above a size), and in full.
    check_request_s: float
    check_request_rows: int | None
    check_full_s: float
    peak_rss_mib: float


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def answers(entities: list[engine.EntityRequest], *, apart: bool = False) -> engine.Outcomes:
    """Every entity answered with a value for each field it needs (what a warm cache gives).

    All answers share one fetch time, so every done cell's `meta` is alike; `apart` gives each
    entity its own (as answers bought one by one have): no two entities' meta alike."""
    now = datetime.now(UTC)
    return {
        e.key.id: {
            name: FieldOutcome(
                CellStatus.DONE,
                FieldValue(
                    f"{name} of {e.key.value}",
                    0.9,
                    "mock",
                    now + timedelta(microseconds=i) if apart else now,
                ),
            )
            for name in e.fields
        }
        for i, e in enumerate(entities)
    }


def measure(
    rows: int,
    *,
    postgres_url: str = POSTGRES_URL,
    page_size: int = engine.JobSettings.page_size,
    companies: int | None = None,
    apart: bool = False,
) -> Throughput:
    """Seed `rows` rows of S5's shape in a throwaway database and time detection and writing."""
    with fresh_postgres(postgres_url) as url:
        store = Store(url)
        try:
            started = time.perf_counter()
            table = seed_generated(
                store, rows=rows, unique_companies=companies or max(1, rows // 10)
            )
            seed_s = time.perf_counter() - started
            columns = [table.column_by_key(key).id for key in GENERATED_COMPANY_KEYS]
            selection = Selection(column_ids=columns)
            target = engine.resolve_target(store, table.id, selection)
            request_id = engine.start_job(store, target, selection, engine.JobSettings())

            before, cpu, started = store.statements, _cpu(), time.perf_counter()
            detection = engine.detect_entities(
                store, target, page_size=page_size, request_id=request_id
            )
            detect_s, detect_cpu = time.perf_counter() - started, _cpu() - cpu
            detect_statements = store.statements - before

            outcomes = answers(detection.entities, apart=apart)
            before, cpu, started = store.statements, _cpu(), time.perf_counter()
            summary = engine.apply_results(
                store, request_id, target, outcomes, page_size=page_size, read=detection.read
            )
            apply_s, apply_cpu = time.perf_counter() - started, _cpu() - cpu
            apply_statements = store.statements - before

            started = time.perf_counter()
            own = checks.cells_without_provenance(store, table.id, request_id=request_id)
            check_request_s = time.perf_counter() - started
            started = time.perf_counter()
            full = checks.cells_without_provenance(store, table.id)
            check_full_s = time.perf_counter() - started
            if own.count or full.count:
                raise RuntimeError(f"cells without provenance: {own.sample or full.sample}")
        finally:
            store.dispose()
    return Throughput(
        rows=rows,
        entities=len(detection.entities),
        seed_s=round(seed_s, 2),
        detect_s=round(detect_s, 2),
        detect_cpu_s=round(detect_cpu, 2),
        detect_rows_per_s=round(detection.rows_read / detect_s),
        detect_statements=detect_statements,
        apply_s=round(apply_s, 2),
        apply_cpu_s=round(apply_cpu, 2),
        apply_rows_per_s=round(summary.rows_read / apply_s),
        apply_statements=apply_statements,
        rows_written=summary.rows_written,
        check_request_s=round(check_request_s, 2),
        check_request_rows=own.rows_checked,
        check_full_s=round(check_full_s, 2),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--companies", type=int, default=None, help="default: rows / 10")
    parser.add_argument("--page-size", type=int, default=engine.JobSettings.page_size)
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    parser.add_argument(
        "--apart", action="store_true", help="each entity's answers fetched at its own time"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = measure(
        args.rows,
        postgres_url=args.postgres_url,
        page_size=args.page_size,
        companies=args.companies,
        apart=args.apart,
    )
    if args.json:
        json.dump(asdict(result), sys.stdout)
        print()
        return
    print(f"rows {result.rows:,}, entities {result.entities:,} (seeded in {result.seed_s} s)")
    print(
        f"detection: {result.detect_rows_per_s:,} rows/s ({result.detect_s} s, "
        f"CPU {result.detect_cpu_s} s, {result.detect_statements} statements)"
    )
    print(
        f"writing:   {result.apply_rows_per_s:,} rows/s ({result.apply_s} s, "
        f"CPU {result.apply_cpu_s} s, {result.apply_statements} statements, "
        f"{result.rows_written:,} rows written)"
    )
    print(
        f"provenance check: the job's {result.check_request_s} s "
        f"({result.check_request_rows:,} rows read), full {result.check_full_s} s"
    )
    print(f"peak RSS {result.peak_rss_mib} MiB")


if __name__ == "__main__":
    main()
