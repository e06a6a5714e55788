"""The benchmark's outputs: results.json, a markdown table (results.md) and a chart (chart.png).

matplotlib is optional (the `bench` extra): without it the chart is skipped, with a note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIGURE_COLUMNS = (
    "scenario",
    "path",
    "provider calls (mock /_stats)",
    "needed calls",
    "DB statements",
    "wall s",
    "bound s",
    "wall / bound",
    "peak RSS MiB (worker / mock)",
    "cells with a value",
    "CPU ms / call",
    "first row s (lookups done)",
    "max progress gap s (Redis / request row)",
)
EXTRA_COLUMNS = 3  # the streaming and CPU columns, after the original ones
VARIANT_LABELS = {
    "batched": "entity-first, vendor batch endpoints",
    "multiprocess": "entity-first, multiprocess executor",
    "celery": "entity-first, Celery executor",
}


def figure_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per scenario and path: the figures the issue asks for, as text."""
    rows: list[list[str]] = []
    for name, scenario in results["scenarios"].items():
        if "launch" in scenario:
            for path, figures in scenario["launch"]["paths"].items():
                summary = figures["summary"]
                rows.append(
                    [
                        name,
                        path,
                        "-",
                        "-",
                        "-",
                        "STARTED {:.2f} / first write {:.2f} / finished {:.2f} (median)".format(
                            summary["started_s"]["median"],
                            summary["first_write_s"]["median"],
                            summary["finished_s"]["median"],
                        ),
                        "-",
                        "-",
                        "-",
                        "-",
                        *["-"] * EXTRA_COLUMNS,
                    ]
                )
            continue
        bound = scenario["bound_s"]
        variants = [("entity-first", scenario["entity_first"])]
        if "entity_first_copy" in scenario:
            variants = [
                ("entity-first, same table again", scenario["entity_first"]),
                ("entity-first, fresh copy of the rows", scenario["entity_first_copy"]),
            ]
        if "leads" in scenario:
            runs = len(scenario["leads"]["runs"])
            variants = [(f"entity-first (median of {runs} runs)", scenario["entity_first"])]
        for label, entity in variants:
            rows.append(_entity_row(name, label, entity, scenario, bound))
        for key, variant in scenario.get("variants", {}).items():
            label = variant_label(key, variant)
            if "wall_s" not in variant:
                skipped = variant.get("skipped", "-")
                rows.append([name, label, skipped] + ["-"] * (len(FIGURE_COLUMNS) - 3))
                continue
            rows.append(_entity_row(name, label, variant, scenario, bound))
        if "leads" in scenario:
            continue
        entity = scenario["entity_first"]
        baseline = scenario.get("baseline", {})
        if "wall_s" not in baseline:
            skipped = baseline.get("skipped", "-")
            rows.append([name, "cell-level baseline", skipped] + ["-"] * (len(FIGURE_COLUMNS) - 3))
            continue
        label = "cell-level baseline"
        if baseline.get("extrapolated"):
            label += f" (extrapolated from {baseline['measured']['rows']:,} rows)"
        if baseline.get("note"):
            label += " (not re-run: no cache)"
        speedup = baseline["wall_s"] / entity["wall_s"] if entity["wall_s"] else 0.0
        rows.append(
            [
                name,
                label,
                _calls(baseline["provider_calls"]),
                f"{scenario['cells']:,} (one per cell)",
                f"{baseline['statements']:,}",
                f"{baseline['wall_s']:.2f} ({speedup:.1f}x entity-first)",
                f"{baseline['bound_s']:.2f}",
                f"{baseline['wall_s'] / baseline['bound_s']:.2f}" if baseline["bound_s"] else "-",
                f"{baseline['peak_rss_mib']:.0f} / {baseline.get('mock_peak_rss_mib') or 0:.0f}",
                _baseline_values(baseline, scenario),
                _per_call(baseline),
                "-",
                "-",
            ]
        )
    return rows


def variant_label(key: str, variant: dict[str, Any]) -> str:
    """A second row's path: the variant's own label (e.g. "entity-first, celery, 2 workers"),
    with the steps each Celery worker ran, else the generic one."""
    label = str(variant.get("label") or VARIANT_LABELS.get(key, f"entity-first, {key}"))
    by_worker = variant.get("steps_by_celery_worker") or {}
    if by_worker:
        label += " (steps per worker: " + " / ".join(str(n) for n in by_worker.values()) + ")"
    return label


def _entity_row(
    name: str, label: str, entity: dict[str, Any], scenario: dict[str, Any], bound: float
) -> list[str]:
    request = entity.get("request", {})
    needed = entity["expected_calls"]
    return [
        name,
        label,
        _calls(entity["provider_calls"]) + _http_requests(entity),
        "-" if "leads" in scenario else _calls(needed) if any(needed.values()) else "0",
        _statements(entity),
        f"{entity['wall_s']:.2f}",
        f"{bound:.2f}",
        f"{entity['wall_s'] / bound:.2f}" if bound else "-",
        f"{entity['peak_rss_mib']:.0f} / {entity.get('mock_peak_rss_mib') or 0:.0f}"
        + (
            f" (Celery worker {entity['celery_workers_peak_rss_mib']:.0f})"
            if entity.get("celery_workers_peak_rss_mib")
            else f" (step process {entity['step_processes_peak_rss_mib']:.0f})"
            if entity.get("step_processes_peak_rss_mib")
            else ""
        ),
        f"{request.get('cells_done', 0):,} / {scenario['cells']:,}",
        _per_call(entity),
        _first_row(entity.get("stream", {})),
        _gaps(entity.get("stream", {})),
    ]


def _statements(entity: dict[str, Any]) -> str:
    """The job's statements; with steps in other processes only the run process's are
    counted (the steps' own are not), which the cell says instead of a misleading figure."""
    if entity.get("executor", "in_process") != "in_process":
        return f"not counted (steps in other processes; run process {entity['statements']:,})"
    return f"{entity['statements']:,}"


def _http_requests(entity: dict[str, Any]) -> str:
    """Where batch endpoints served several entities a request: how many requests it took."""
    requests = sum(entity.get("http_requests", {}).values())
    calls = sum(entity["provider_calls"].values())
    return f" in {requests:,} HTTP requests" if requests and requests != calls else ""


def _per_call(run: dict[str, Any]) -> str:
    """Worker CPU ms per provider call (the entity runs carry it; the baseline: computed)."""
    value = run.get("cpu_ms_per_call")
    if value is None:
        calls = sum(run.get("measured", run).get("provider_calls", {}).values())
        value = 1000 * run["cpu_s"] / calls if calls and "cpu_s" in run else None
    return "-" if value is None else f"{value:.2f}"


def _first_row(stream: dict[str, Any]) -> str:
    first = stream.get("first_row_s")
    if first is None:
        return "-"
    share = stream.get("lookups_done_at_first_row")
    if share is None:
        share = stream.get("lookups_done_at_first_row_events")
    return f"{first:.2f} ({share:.0%})" if share is not None else f"{first:.2f}"


def _gaps(stream: dict[str, Any]) -> str:
    gap, beat = stream.get("progress_gap_max_s"), stream.get("heartbeat_gap_max_s")
    if gap is None and beat is None:
        return "-"
    return " / ".join("-" if g is None else f"{g:.2f}" for g in (gap, beat))


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, scenario in results["scenarios"].items():
        for target in scenario.get("targets", []):
            met = {True: "met", False: "MISSED", None: "-"}[target["met"]]
            rows.append([name, target["target"], target["want"], target["got"], met])
    return rows


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        "# Benchmark: entity-first pipeline vs the cell-level baseline",
        "",
        f"Command: `{results.get('command', '')}`  ",
        f"Started {results['started_at']}, took {results['total_seconds']} s on "
        f"{results['machine']['cpus']} cores (Python {results['machine']['python']}).  ",
        f"Mock latency {settings['latency_ms']:g} ms (fixed), concurrency "
        f"{settings['concurrency']} (the job's `concurrency`, each vendor's `max_concurrency`, "
        f"and the baseline's limit), page size {settings['page_size']}, chunk size "
        f"{settings['chunk_size']} / max chunks {_fan_out(settings.get('max_chunks'))}, scale "
        f"{settings['scale']:g}, Redis "
        f"`{settings['redis_url']}`.",
        "",
        "Provider calls are the mock server's `/_stats` counts. The bound is needed calls x "
        "latency / concurrency (a company needing revenue costs two sequential calls, cheap "
        "then premium); the issue's entities x latency / concurrency is in results.json as "
        "`bound_entities_s`.",
        "",
        "CPU ms / call: the worker process's CPU during the run (the benchmark's watcher runs "
        "in a process of its own) / the calls the mock served; the mock's CPU is apart (last "
        "table). First "
        "row: seconds from the run's start to the first progress event saying rows were "
        "written (`cells`, or `progress` with rows_written > 0), heard on the table's Redis "
        "channel by a subscriber started before the run, and the share of the provider calls "
        "the mock had served by then (its `/_stats` polled every 0.1 s). Max progress gap: the "
        "longest silence between `started`/`progress` events from the first `started` to the "
        "last `progress` (Redis), and between the request row's `updated_at` stamps (polled). "
        "Write rows/s: rows written / the seconds Postgres spent in the row-merge statements; "
        "detect rows/s: rows / the detect_entities step. From the queue (the sensor, the "
        "GraphQL launcher) an enrich request that holds `GLAZE_MULTIPROCESS_ROWS` rows or more "
        "(50,000 unless set) runs on the multiprocess executor: the target row `as launched "
        "from the queue` reads S3's wall on the executor such a launch would pick.",
        "",
        "## Figures",
        "",
        _table(list(FIGURE_COLUMNS), figure_rows(results)),
        "",
        "## Targets",
        "",
        _table(["scenario", "target", "want", "got", ""], target_rows(results)),
        "",
        "## Where the time went (entity-first)",
        "",
        _table(
            [
                "scenario",
                "seed s",
                "run start s",
                "detect s",
                "enrich s",
                "apply s",
                "close s",
                "chunks",
                "CPU s worker / mock",
                "process wall s",
                "detect rows/s",
                "write s (statements) / rows/s",
                "progress events",
            ],
            _phase_rows(results),
        ),
        "",
    ]
    return "\n".join(lines)


def _phase_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, scenario in results["scenarios"].items():
        entity = scenario.get("entity_first")
        if entity is None:
            continue
        phases = entity.get("phases", {})
        rows.append(
            [
                name,
                str(scenario.get("seed_s", "-")),
                str(entity.get("first_step_s", "-")),
                *(str(phases.get(k, "-")) for k in ("detect", "enrich", "apply", "close")),
                str(entity.get("request", {}).get("chunks", "-")),
                f"{entity.get('cpu_s', '-')} / {entity.get('mock_cpu_s', '-')}",
                str(entity.get("process_wall_s", "-")),
                _rate(entity.get("detect_rows_per_s")),
                _writes(entity),
                str(entity.get("stream", {}).get("progress_events", "-")),
            ]
        )
    return rows


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _writes(entity: dict[str, Any]) -> str:
    seconds = entity.get("write_seconds")
    if seconds is None:
        return "-"
    statements = entity.get("write_statements")
    count = f" ({statements})" if statements is not None else ""
    return f"{seconds:.3f}{count} / {_rate(entity.get('write_rows_per_s'))}"


def _baseline_values(baseline: dict[str, Any], scenario: dict[str, Any]) -> str:
    written = baseline.get("values_written", 0)
    measured = baseline.get("measured", {}).get("cells", baseline["cells"])
    return f"{written:,} / {measured:,}" + (" (sample)" if baseline.get("extrapolated") else "")


def _calls(calls: dict[str, int]) -> str:
    total = sum(calls.values())
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(calls.items()) if v)
    return f"{total:,} ({parts})" if parts else "0"


def _fan_out(max_chunks: int | None) -> str:
    """The run's fan-out width as set, or the job's default by executor."""
    if max_chunks is not None:
        return str(max_chunks)
    from glaze_pipeline.core.engine import IN_PROCESS_CHUNKS, IN_PROCESS_SPAN_ENTITIES, MAX_CHUNKS

    return (
        f"{IN_PROCESS_CHUNKS} in process (more if a span would own over "
        f"{IN_PROCESS_SPAN_ENTITIES:,} entities), {MAX_CHUNKS} on other executors"
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_chart(results: dict[str, Any], path: Path) -> str | None:
    """Wall time, provider calls and statements per scenario, both paths, log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart"
    names = [n for n, s in results["scenarios"].items() if "entity_first" in s]
    if not names:
        return "no scenario with figures to chart"
    panels = (
        ("wall time (s)", lambda r: r.get("wall_s")),
        ("provider calls", lambda r: sum(r.get("provider_calls", {}).values()) or None),
        ("DB statements", lambda r: r.get("statements")),
    )
    settings = results["settings"]
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 5.2))
    width = 0.38
    for axis, (title, metric) in zip(axes, panels, strict=True):
        for offset, (label, key, colour) in enumerate(
            (("entity-first", "entity_first", "#2b8cbe"), ("cell-level", "baseline", "#e34a33"))
        ):
            values = [metric(results["scenarios"][n].get(key, {})) for n in names]
            positions = [i + (offset - 0.5) * width for i in range(len(names))]
            shown = [v if v else 0 for v in values]
            bars = axis.bar(positions, shown, width, label=label, color=colour)
            for bar, value in zip(bars, values, strict=True):
                text = _short(value) if value else ("0" if value == 0 else "n/a")
                height = bar.get_height() if value else 1
                axis.annotate(
                    text,
                    (bar.get_x() + bar.get_width() / 2, height),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        axis.set_yscale("log")
        axis.set_xticks(range(len(names)), names)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left")
    figure.suptitle(
        f"Entity-first vs cell-level (latency {settings['latency_ms']:g} ms, concurrency "
        f"{settings['concurrency']}, scale "
        f"{settings['scale']:g}; baseline S3/S4 extrapolated from a "
        f"{settings['baseline_sample']:.0%} sample; S5 baseline not run)",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def _short(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 100 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.2g}" if value < 10 else f"{value:.1f}"


def write_reports(results: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    note = write_chart(results, directory / "chart.png")
    if note:
        results["chart"] = note
    (directory / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (directory / "results.md").write_text(markdown(results))
