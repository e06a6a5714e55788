"""What the commands print, as rich renderables built from typed records: tables and rows
(`TableInfo`, `RowRecord`), requests, estimates, providers and AI proposals. Every value a
person typed or a vendor sent is Text cut to one line (`display_text`), never rich markup."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from glaze_pipeline.core.models import RequestKind
from glaze_pipeline.core.store import RequestSummary, RowRecord, TableInfo

if TYPE_CHECKING:
    from glaze_pipeline.core.providers.registry import ProviderDescription
    from glaze_pipeline.core.schema import EnrichmentRequest

# How much of a cell `show` prints: a table is for looking at, not for reading a 50 MB cell.
DISPLAY_CHARS = 80
LINE_BREAK = "\u23ce"  # ⏎
# Bidi overrides and isolates: they would reorder what follows them on the terminal.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def display_text(value: Any, limit: int = DISPLAY_CHARS) -> str:
    """A value as one line of at most `limit` characters, for a terminal table.

    Longer values end in an ellipsis; line breaks show as ⏎ and other control characters
    (escape sequences, bidi overrides) as spaces. Only the first `limit` characters of a text
    are looked at, so a 50 MB cell costs what a short one does (laying out a huge cell on the
    terminal is what took `show` 10 minutes).
    """
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = str(value)
    head = text[: limit + 1].replace("\r\n", "\n")
    shown = "".join(_display_char(char) for char in head)
    if len(text) > limit:
        shown = shown[: limit - 1] + "\u2026"  # …
    return shown


def _display_char(char: str) -> str:
    if char in "\n\r":
        return LINE_BREAK
    if char in _BIDI_CONTROLS or unicodedata.category(char) == "Cc":
        return " "
    return char


# --- tables and rows -----------------------------------------------------------------------


def render_tables(tables: Sequence[tuple[str, str, int]]) -> Table:
    """The list of tables: (id, name, row count) each."""
    grid = Table("id", "name", "rows")
    for table_id, name, count in tables:
        grid.add_row(Text(table_id), Text(display_text(name)), str(count))
    return grid


def render_table(info: TableInfo, rows: Sequence[RowRecord], *, with_meta: bool = False) -> Table:
    """Rows as a terminal table; every value is Text (never rich markup) cut to one line of
    DISPLAY_CHARS, with each cell's `[status:source]` when `with_meta`."""
    grid = Table(title=Text(f"{display_text(info.name)} ({info.id})"), show_lines=False)
    for column in info.columns:
        grid.add_column(Text(column.key), overflow="fold", max_width=40)
    grid.add_column("status")
    grid.add_column("conf")
    for row in rows:
        cells: list[Text] = []
        for column in info.columns:
            cell = Text(display_text(row.data.get(column.key)))
            cell_meta = row.meta.get(column.key)
            if with_meta and isinstance(cell_meta, dict):
                status = display_text(cell_meta.get("status"), 20)
                source = display_text(cell_meta.get("source"), 30) or "-"
                cell.append(f" [{status}:{source}]", style="dim")
                if cell_meta.get("error"):  # why it failed, was skipped or not found
                    cell.append(f" {display_text(cell_meta.get('error'), 60)}", style="dim")
            cells.append(cell)
        grid.add_row(*cells, Text(row.status), _row_confidence(row.meta))
    return grid


def _row_confidence(meta: dict[str, Any]) -> str:
    from glaze_pipeline.core.status import aggregate_row

    _, confidence, _ = aggregate_row(meta)
    return "" if confidence is None else f"{confidence:.2f}"


def render_table_ids(info: TableInfo) -> Group:
    """A table's name and id, and each column's key, id and what it fills from."""
    grid = Table("column key", "column id", "fills from")
    for column in info.columns:
        spec = column.spec()
        if column.prompt is not None:
            source = f"AI ({spec.field.entity_type.value}): {column.prompt}" if spec.field else "-"
        else:
            source = str(spec.field) if spec.field else "-"
        grid.add_row(column.key, column.id, Text(display_text(source)))
    return Group(Text.assemble("table ", (display_text(info.name), "bold"), f": {info.id}"), grid)


# --- requests and estimates ------------------------------------------------------------------


def render_request(request: EnrichmentRequest) -> Table:
    """One request: its counters (cells and entities; steps and LLM calls for an AI request)."""
    from glaze_pipeline.core.models import AI_REQUEST_KINDS

    grid = Table(title=f"request {request.id}", show_header=False)
    grid.add_column("field")
    grid.add_column("value")
    if request.kind in AI_REQUEST_KINDS:  # steps and LLM calls, not cells and entities
        for name, value in (
            ("status", request.status),
            ("table", request.table_id),
            ("kind", request.kind),
            ("run", request.run_id or "-"),
            ("progress", f"{request.entities_done}/{request.entities} steps"),
            ("LLM calls", str((request.provider_calls or {}).get("llm", 0))),
            ("cost", f"{request.cost:g}"),
            ("retry of", request.retry_of or "-"),
            ("error", request.error or "-"),
            ("proposal", f"glaze ai show {request.id}"),
        ):
            grid.add_row(name, Text(str(value)))
        return grid
    total = request.cells_total or 0
    answered = (request.cells_done or 0) + (request.cells_not_found or 0)
    for name, value in (
        ("status", request.status),
        ("table", request.table_id),
        ("kind", request.kind),
        ("run", request.run_id or "-"),
        ("progress", f"{answered}/{total} cells ({100 * answered // total if total else 100}%)"),
        ("cells done / not found", f"{request.cells_done} / {request.cells_not_found}"),
        ("cells failed / skipped", f"{request.cells_failed} / {request.cells_skipped}"),
        ("rows written", str(request.rows_written)),
        ("unique entities", str(request.entities)),
        ("cache hits", str(request.cache_hits)),
        ("provider calls", str(request.provider_calls or {})),
        ("not sent", str(request.calls_not_sent or "-")),
        ("providers unavailable", str(request.unavailable_providers or "-")),
        (
            "cost",
            f"{request.cost:g}"
            + (f" of budget {request.budget:g}" if request.budget is not None else ""),
        ),
        ("error", request.error or "-"),
    ):
        grid.add_row(name, Text(str(value)))
    return grid


def render_requests(requests: Sequence[RequestSummary]) -> Table:
    """The latest requests, one line each."""
    grid = Table("id", "table", "kind", "status", "cells", "cost", "created")
    for request in requests:
        grid.add_row(
            request.id,
            request.table_id,
            request.kind,
            request.status,
            f"{request.cells_done}/{request.cells_total}",
            f"{request.cost:g}",
            str(request.created_at)[:19],
        )
    return grid


def render_estimate(request_id: str, report: Mapping[str, Any]) -> Group:
    """The estimate as a person reads it: totals, one line per provider, then the guidance."""
    totals = Table(title=f"estimate {request_id}", show_header=False)
    for label, key in (
        ("unique entities", "unique_entities"),
        ("cells", "cells"),
        ("cells without identifier", "cells_without_identifier"),
        ("cache hits", "cache_hits"),
        ("expected cost", "expected_cost"),
        ("~95 % of runs within", "expected_cost_range"),
        ("upper bound", "max_cost"),
        ("budget", "budget"),
        ("cells expected filled", "expected_cells_filled"),
        ("cells skipped: provider unavailable", "cells_provider_unavailable"),
    ):
        value = report.get(key)
        if isinstance(value, list) and len(value) == 2:  # a range
            value = f"{value[0]:,.2f} - {value[1]:,.2f}"
        if value is not None:
            totals.add_row(Text(label), Text(display_text(value)))
    providers = Table(
        "provider",
        "status",
        "reach",
        "expected calls",
        "expected cost",
        "max calls",
        "max cost",
        "basis",
    )
    for name, row in (report.get("providers") or {}).items():
        bases = row.get("by_key_kind") or {}
        basis = "; ".join(f"by {kind}: {b['basis']}" for kind, b in sorted(bases.items()))
        status = row["status"] if not row.get("reason") else f"{row['status']}: {row['reason']}"
        providers.add_row(
            Text(name),
            Text(status, style="red" if row["status"] != "ok" else ""),
            Text(f"{row.get('reach', 0):.0%}"),
            Text(f"{row['expected_calls']:,.1f}"),
            Text(f"{row['expected_cost']:,.2f}"),
            Text(f"{row['max_calls']:,}"),
            Text(f"{row['max_cost']:,.6g}"),
            Text(basis),
        )
    parts: list[Any] = [totals, providers]
    if report.get("guidance"):
        parts.append(Text(str(report["guidance"])))
    at_budget = (report.get("budget_guidance") or {}).get("at_budget")
    if at_budget:
        parts.append(
            Text(
                f"with budget {at_budget['budget']:,.6g}: ~{at_budget['cells_filled']:,} cells "
                f"(~{at_budget['share_of_fillable']:.0%} of what the job can fill), "
                f"expected cost {at_budget['expected_cost']:,.2f}"
            )
        )
    return Group(*parts)


# --- providers ---------------------------------------------------------------------------------


def render_providers(described: Sequence[ProviderDescription]) -> Table:
    """The providers of the waterfall, one line each, with why one cannot be used now."""
    grid = Table(
        "provider",
        "entity",
        "kind",
        "cost/call",
        "charges misses",
        "confidence",
        "status",
        "health",
        "fields",
    )
    for description in described:
        row = description.as_dict()
        status = str(row["status"])
        if row["reason"]:
            status = f"{status}: {row['reason']}"
        grid.add_row(
            row["name"],
            row["entity_type"],
            row["kind"],
            f"{row['cost_per_call']:g}",
            "yes" if row["charges_misses"] else "no",
            f"{row['confidence']:g}",
            status,
            str(row["health"]),
            ", ".join(row["fields"]),
        )
    return grid


# --- AI requests -------------------------------------------------------------------------------


def render_ai_status(request_id: str, view: Mapping[str, Any]) -> Table:
    """An AI request's status as seed 003 shows it (`ai_status`)."""
    grid = Table(title=f"AI request {request_id}", show_header=False)
    grid.add_column("field")
    grid.add_column("value")
    for name in ("kind", "status", "state", "progress", "tableId", "cost", "error"):
        grid.add_row(name, Text(str(view.get(name, "-") if view.get(name) is not None else "-")))
    return grid


def render_proposal(request_id: str, kind: RequestKind, result: Mapping[str, Any]) -> Group:
    """A proposal as a person reads it: the table, its columns, its rows, what was dropped."""
    parts: list[Any] = []
    table = result.get("table")
    if isinstance(table, Mapping):
        grid = Table(title=f"proposed table ({request_id})", show_header=False)
        grid.add_column("field")
        grid.add_column("value")
        for name in ("name", "description", "entityType"):
            value = table.get(name, table.get("entity_type") if name == "entityType" else None)
            grid.add_row(name, Text(str(value if value is not None else "-")))
        parts.append(grid)
    columns = result.get("columns")
    if isinstance(columns, Sequence) and columns:
        grid = Table("key", "label", "role", "fills from", title="proposed columns")
        for column in columns:
            if not isinstance(column, Mapping):
                continue
            source = column.get("field") or (
                f"AI: {column['prompt']}" if column.get("prompt") else "-"
            )
            grid.add_row(
                Text(str(column.get("key"))),
                Text(str(column.get("label"))),
                Text(str(column.get("role"))),
                Text(str(source)),
            )
        parts.append(grid)
    rows = result.get("rows")
    if isinstance(rows, Sequence) and rows:
        keys: list[str] = []
        for row in rows:
            values = row.get("values", row) if isinstance(row, Mapping) else {}
            keys.extend(k for k in values if k not in keys)
        grid = Table(*keys, title=f"proposed rows ({len(rows)})")
        for row in rows:
            values = row.get("values", row) if isinstance(row, Mapping) else {}
            grid.add_row(*(Text(str(values.get(key, ""))) for key in keys))
        parts.append(grid)
    notes = result.get("notes")
    if isinstance(notes, Sequence) and notes:
        parts.append(Text("notes:\n" + "\n".join(f"  - {note}" for note in notes)))
    usage = result.get("usage")
    if isinstance(usage, Mapping):
        versions = result.get("promptVersions") or {}
        parts.append(
            Text(
                f"model {result.get('model', '-')}, prompts "
                f"{', '.join(str(v) for v in (versions.values() if isinstance(versions, Mapping) else versions)) or '-'}; "
                f"{usage.get('calls', 0)} LLM calls, {usage.get('promptTokens', 0)} + "
                f"{usage.get('completionTokens', 0)} tokens, cost {usage.get('cost', 0)}"
            )
        )
    if not parts:
        parts.append(Text(f"{kind.value}: no proposal"))
    return Group(*parts)
