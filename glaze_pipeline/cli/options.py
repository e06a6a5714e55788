"""Option types and option sets the commands share, and turning a command's selection options
into the selection a request carries."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import click

from glaze_pipeline.core.errors import InvalidSelectionError
from glaze_pipeline.core.limits import check_budget
from glaze_pipeline.core.store import Store, TableInfo

Command = TypeVar("Command", bound=Callable[..., Any])


class BudgetType(click.ParamType):
    """A budget option: a finite number >= 0 (no `nan`, `inf` or negative), refused at once."""

    name = "budget"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        try:
            return check_budget(number)
        except InvalidSelectionError as error:
            self.fail(str(error), param, ctx)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses `nan` and `inf`: its range checks let `nan` through
    (every comparison with nan is false)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


BUDGET = BudgetType()
POSITIVE = click.IntRange(min=1)
# `glaze launcher` and the launcher `glaze serve` starts: how many forked runs at once.
MAX_RUNS = click.option(
    "--max-runs", type=POSITIVE, default=4, show_default=True, help="Forked runs at once."
)


def selection_options(command: Command) -> Command:
    """The options every command that selects cells shares (grid, or the whole table)."""
    for option in reversed(
        [
            click.argument("table_id"),
            click.option(
                "--columns",
                "column_keys",
                multiple=True,
                help="Column keys or ids, repeated or comma-separated.",
            ),
            click.option("--rows", "row_ids", multiple=True, help="Row ids (default: all)."),
            click.option(
                "--budget", type=BUDGET, default=None, help="Max spend for the job (>= 0)."
            ),
            click.option(
                "--overwrite",
                is_flag=True,
                help="With --columns: also replace cells that hold a value (kept otherwise).",
            ),
        ]
    ):
        command = option(command)
    return command


def selection(
    store: Store,
    table_id: str,
    column_keys: tuple[str, ...],
    row_ids: tuple[str, ...],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Grid selection from keys or ids; no columns means every empty enrichable cell.

    Checked here, before any job or request exists, as the job would check it: the table,
    each column (and that it maps to a field) and each row id must exist, so a typo is one
    line now rather than a failed run.
    """
    from glaze_pipeline.core.engine import resolve_target
    from glaze_pipeline.core.models import Selection

    info = store.get_table(table_id)
    keys = {column.key for column in info.columns} | {column.id for column in info.columns}
    # "a,b" is two columns, unless a column's key holds the comma (a CSV header may).
    listed = [
        part.strip()
        for given in column_keys
        for part in ([given] if given in keys else given.split(","))
        if part.strip()
    ]
    column_ids = [column_id(info, key) for key in listed]
    if not column_ids:
        if row_ids or overwrite:
            raise InvalidSelectionError(f"{'--rows' if row_ids else '--overwrite'} needs --columns")
        chosen: dict[str, Any] = {"whole_table": True}
    else:
        chosen = {"column_ids": column_ids, "row_ids": list(row_ids)}
        if overwrite:
            chosen["overwrite"] = True
    resolve_target(store, table_id, Selection(**chosen))
    if row_ids:
        store.check_rows(table_id, row_ids)
    return chosen


def column_id(info: TableInfo, key_or_id: str) -> str:
    """The id of the column named by its key or its id."""
    ids = {column.id for column in info.columns}
    if key_or_id in ids:
        return key_or_id
    return str(info.column_by_key(key_or_id).id)
