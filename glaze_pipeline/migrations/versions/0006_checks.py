"""The database refuses what no edge may write: a NaN, infinite or negative budget, a priority
out of range, and (on SQLite, which does not enforce VARCHAR lengths) names, keys and ids longer
than Postgres allows, so both databases accept and refuse the same values.

Postgres compares NaN as greater than every number, so `budget <= 1e12` refuses NaN and
infinity there (SQLite stores a NaN as NULL). Rows written before this revision must pass too:
an open request with a bad budget or priority is failed first (it could never have run), and an
ended one keeps its history but not the impossible number.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BUDGET = "budget IS NULL OR (budget >= 0 AND budget <= 1e12)"
PRIORITY = "priority BETWEEN -1000000 AND 1000000"
REQUEST_CHECKS = {
    "budget_valid": BUDGET,
    "priority_range": PRIORITY,
    "budget_reserved_valid": "budget_reserved >= 0",
    "cost_valid": "cost >= 0",
}
# SQLite only: Postgres's VARCHAR(n) already refuses longer values. Not `tables`: rebuilding
# it on SQLite drops the old one, and with foreign keys on that deletes every row it holds
# (ON DELETE CASCADE); table names are checked by `Store.create_table` on both databases.
SQLITE_LENGTHS = {
    "enrichment_requests": {
        "idempotency_key_length": "length(idempotency_key) <= 200",
        "table_id_length": "length(table_id) <= 40",
    },
    "columns": {
        "key_length": "length(key) <= 100",
        "label_length": "length(label) <= 200",
        "id_length": "length(id) <= 40",
    },
}


def upgrade() -> None:
    # Every row must pass the checks (SQLite copies the table under them; Postgres validates
    # them). A request still open with a value the engine would refuse is failed (it could
    # never run); an ended one keeps its history and loses only the impossible number.
    op.execute(
        f"""
        UPDATE enrichment_requests
        SET status = 'failed', error = 'invalid budget or priority (refused by migration 0006)',
            budget = NULL, priority = 0
        WHERE status IN ('queued', 'launched', 'running')
          AND NOT (({BUDGET}) AND {PRIORITY})
        """
    )
    op.execute(f"UPDATE enrichment_requests SET budget = NULL WHERE NOT ({BUDGET})")
    op.execute(f"UPDATE enrichment_requests SET priority = 0 WHERE NOT ({PRIORITY})")
    if op.get_bind().dialect.name == "postgresql":
        for name, condition in REQUEST_CHECKS.items():
            op.create_check_constraint(
                f"ck_enrichment_requests_{name}", "enrichment_requests", sa.text(condition)
            )
        return
    checks = {
        "enrichment_requests": {**REQUEST_CHECKS, **SQLITE_LENGTHS["enrichment_requests"]},
        "columns": SQLITE_LENGTHS["columns"],
    }
    for table, conditions in checks.items():
        with op.batch_alter_table(table) as batch:
            for name, condition in conditions.items():
                batch.create_check_constraint(f"ck_{table}_{name}", sa.text(condition))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for name in REQUEST_CHECKS:
            op.drop_constraint(f"ck_enrichment_requests_{name}", "enrichment_requests", "check")
        return
    tables = {
        "enrichment_requests": [*REQUEST_CHECKS, *SQLITE_LENGTHS["enrichment_requests"]],
        "columns": list(SQLITE_LENGTHS["columns"]),
    }
    for table, names in tables.items():
        with op.batch_alter_table(table) as batch:
            for name in names:
                batch.drop_constraint(f"ck_{table}_{name}", type_="check")
