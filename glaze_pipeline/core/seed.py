"""Sample data: seed 001's Leads table and generated tables of any size (CSV: core/importer.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from glaze_pipeline.core.errors import GlazeError, InvalidSelectionError
from glaze_pipeline.core.store import ColumnDef, Store, TableInfo

LEADS_TABLE_ID = "tbl_leads"
LEADS_INPUT_KEYS = ("name", "email", "company", "website")
LEADS_ENRICH_KEYS = ("title", "linkedin", "industry", "employee_count")

# Seed 001's Leads table: 10 rows, 8 columns. The inputs are deliberately messy: duplicate
# companies written differently, free mail, a missing website, unicode, a row with no identifier.
LEADS_ROWS: tuple[dict[str, str], ...] = (
    {
        "name": "Ada Lovelace",
        "email": "ada@analytical.io",
        "company": "Analytical Engines Ltd",
        "website": "https://www.analytical.io/about",
    },
    {
        "name": "Grace Hopper",
        "email": "grace.hopper@gmail.com",
        "company": "Cobol Systems Inc.",
        "website": "cobolsystems.com",
    },
    {"name": "Alan Turing", "email": "alan@enigma.co.uk", "company": "Enigma", "website": ""},
    {
        "name": "Linus Torvalds",
        "email": "linus@kernel.org",
        "company": "Kernel.org",
        "website": "HTTP://Kernel.org:443/",
    },
    {"name": "José Ñúñez", "email": "", "company": "Société Générale S.A.", "website": ""},
    {
        "name": "Margaret Hamilton",
        "email": "margaret@apollo.space",
        "company": "Apollo Guidance",
        "website": "apollo.space",
    },
    {
        "name": "Charles Babbage",
        "email": "charles@analytical.io",
        "company": "Analytical Engines",
        "website": "analytical.io",
    },
    {"name": "Katherine Johnson", "email": "", "company": "", "website": ""},
    {
        "name": "Tim Berners-Lee",
        "email": "timbl@w3.org",
        "company": "W3C",
        "website": "https://w3.org",
    },
    {
        "name": "Hedy Lamarr",
        "email": "hedy@frequency-hopping.com",
        "company": "Frequency Hopping Co",
        "website": "www.frequency-hopping.com",
    },
)


def leads_column_id(key: str) -> str:
    return f"col_leads_{key}"


def leads_row_id(index: int) -> str:
    return f"row_leads_{index + 1:02d}"


def seed_leads(store: Store, *, replace: bool = True) -> TableInfo:
    """Create the Leads table with stable ids (tbl_leads, col_leads_<key>, row_leads_01..10)."""
    if replace:
        delete_table(store, LEADS_TABLE_ID)
    columns = [
        ColumnDef(key, key.replace("_", " ").title(), id=leads_column_id(key))
        for key in (*LEADS_INPUT_KEYS, *LEADS_ENRICH_KEYS)
    ]
    table = store.create_table("Leads", columns, table_id=LEADS_TABLE_ID)
    store.insert_rows(
        table.id,
        [{**row, **dict.fromkeys(LEADS_ENRICH_KEYS, "")} for row in LEADS_ROWS],
        ids=[leads_row_id(i) for i in range(len(LEADS_ROWS))],
    )
    return table


def delete_table(store: Store, table_id: str) -> None:
    from sqlalchemy import delete

    from glaze_pipeline.core.schema import GlazeColumn, GlazeRow, GlazeTable

    with store.engine.begin() as connection:
        for model in (GlazeRow, GlazeColumn):
            connection.execute(delete(model).where(model.table_id == table_id))
        connection.execute(delete(GlazeTable).where(GlazeTable.id == table_id))


GENERATED_COMPANY_KEYS = ("industry", "employee_count", "revenue")
GENERATED_PERSON_KEYS = ("title", "linkedin")


def generated_rows(
    rows: int, unique_companies: int, *, unique_people: int | None = None, first: int = 0
) -> Iterator[dict[str, Any]]:
    """Rows spread evenly over `unique_companies` companies; one person per row by default.

    `first` numbers the companies and people from there: two tables of the same shape about
    different entities."""
    if rows < 0 or unique_companies < 1:
        raise GlazeError("rows must be >= 0 and unique_companies >= 1")
    people = unique_people or rows
    for i in range(rows):
        company = first + i % unique_companies
        person = first + i % max(people, 1)
        domain = f"company{company:06d}.com"
        yield {
            "name": f"Person {person}",
            "email": f"person{person}@{domain}",
            "company": f"Company {company}",
            "website": f"https://www.{domain}/",
            **dict.fromkeys(GENERATED_COMPANY_KEYS + GENERATED_PERSON_KEYS, ""),
        }


def seed_generated(
    store: Store,
    *,
    rows: int,
    unique_companies: int,
    unique_people: int | None = None,
    name: str | None = None,
    first: int = 0,
) -> TableInfo:
    """A generated table: inputs name/email/company/website, 3 company + 2 person targets.

    Bad counts are refused before anything is written (before: `--rows -1` left an empty table).
    """
    if rows < 0 or unique_companies < 1 or (unique_people is not None and unique_people < 1):
        raise InvalidSelectionError(
            "rows must be >= 0, unique_companies and unique_people >= 1; got "
            f"rows={rows}, unique_companies={unique_companies}, unique_people={unique_people}"
        )
    keys = ("name", "email", "company", "website", *GENERATED_COMPANY_KEYS, *GENERATED_PERSON_KEYS)
    table = store.create_table(
        name or f"Generated {rows} rows / {unique_companies} companies",
        [ColumnDef(key) for key in keys],
    )
    store.insert_rows(
        table.id,
        generated_rows(rows, unique_companies, unique_people=unique_people, first=first),
    )
    return table
