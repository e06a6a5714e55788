"""CSV import (core/importer.py, `glaze import-csv`): all or nothing, on SQLite and Postgres.

Every bad file is a CsvImportError naming the file, the line (header = line 1) and the reason,
and leaves no table behind; good files, however messy, round-trip cell for cell.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from glaze_pipeline.core import importer
from glaze_pipeline.core.errors import CsvImportError
from glaze_pipeline.core.importer import CsvImport, column_key, import_csv
from glaze_pipeline.core.schema import GlazeColumn, GlazeRow, GlazeTable
from glaze_pipeline.core.store import Store

GLAZE = Path(sys.executable).parent / "glaze"


def counts(store: Store) -> tuple[int, int, int]:
    """(tables, columns, rows) in the whole database: what a failed import must not change."""
    with store.engine.connect() as connection:
        return tuple(  # type: ignore[return-value]
            int(connection.scalar(select(func.count()).select_from(model)) or 0)
            for model in (GlazeTable, GlazeColumn, GlazeRow)
        )


def cells(store: Store, result: CsvImport) -> list[list[str]]:
    keys = [column.key for column in result.table.columns]
    return [[row.data[key] for key in keys] for row in store.rows_in_order(result.table.id)]


def write(tmp_path: Path, data: bytes, name: str = "leads.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(store: Store, path: Path, **options: object) -> str:
    """Import `path`, expect a CsvImportError, check nothing was written; its message."""
    before = counts(store)
    with pytest.raises(CsvImportError) as caught:
        import_csv(store, path, **options)  # type: ignore[arg-type]
    assert counts(store) == before
    return str(caught.value)


# -- ragged rows: an error naming the line, never a shifted table ---------------------------


def test_extra_field_in_the_first_data_row_is_an_error_not_a_shift(
    store: Store, tmp_path: Path
) -> None:
    # Before: pandas made `name` the index: name=acme.com, website=hello, the names gone.
    path = write(tmp_path, b"name,website,notes\nAcme,acme.com,hello,world\nBeta,beta.com,bye\n")
    message = refused(store, path)
    assert message == f"{path} line 2: 4 fields, the header has 3"


@pytest.mark.parametrize(
    ("data", "line", "fields"),
    [
        (b"a,b,c\n1,2,3\n4,5,6\n7,8,9,10\n", 4, 4),  # extra, later (before: a traceback)
        (b"a,b,c\n1,2,3\n4,5\n", 3, 2),  # fewer (before: padded with '' silently)
        (b'a,b,c\n1,"two\nlines",3\n4,5,6,7\n', 4, 4),  # lines count, not records
        (b"a,b,c\r\n\r\n1,2,3\r\n\r\n4,5\r\n", 5, 2),  # blank lines count too
    ],
)
def test_a_ragged_row_anywhere_is_an_error_naming_its_line(
    store: Store, tmp_path: Path, data: bytes, line: int, fields: int
) -> None:
    path = write(tmp_path, data)
    assert refused(store, path) == f"{path} line {line}: {fields} fields, the header has 3"


CORRUPTIONS: dict[str, tuple[Callable[[str], bytes], str]] = {
    "ragged": (lambda line: (line + ",extra").encode(), "4 fields, the header has 3"),
    "invalid utf-8": (lambda line: line.encode() + b"\xff\xfe", "not valid UTF-8"),
    "nul": (lambda line: line.encode() + b"\x00", "contains a NUL character"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_line_deep_in_the_file_leaves_no_table_behind(
    store: Store, tmp_path: Path, corruption: str
) -> None:
    """25,000 rows, line 15,001 bad: before, 14,999 rows were left in a half table (or NUL
    reached Postgres); now nothing is written, whatever the flaw."""
    corrupt, reason = CORRUPTIONS[corruption]
    lines = [b"name,email,notes\n"]
    for i in range(2, 25_002):
        line = f"Person {i},person{i}@example.com,some notes about lead number {i}"
        lines.append((corrupt(line) if i == 15_001 else line.encode()) + b"\n")
    path = write(tmp_path, b"".join(lines))
    message = refused(store, path, batch_rows=1000)  # 14 batches were written, then undone
    assert message.startswith(f"{path} line 15001: ") and reason in message


def test_a_quoted_field_never_closed_is_an_error_naming_where_it_starts(
    store: Store, tmp_path: Path
) -> None:
    path = write(tmp_path, b'a,b\n1,2\n3,"four\n5,6\n')
    assert "line 3: a quoted field in this record is never closed" in refused(store, path)
    path = write(tmp_path, b'a,b\n1,"x"y\n')
    assert "line 2: text after a closing quote" in refused(store, path)


# -- encodings, NUL, empty -------------------------------------------------------------------

ROWS = [["name", "city"], ["José Ñúñez", "Zürich"], ["名前", "Ελλάδα"]]
TEXT = "".join(",".join(row) + "\r\n" for row in ROWS)


@pytest.mark.parametrize(
    "data",
    [
        TEXT.encode("utf-8"),
        codecs.BOM_UTF8 + TEXT.encode("utf-8"),
        codecs.BOM_UTF16_LE + TEXT.encode("utf-16-le"),
        codecs.BOM_UTF16_BE + TEXT.encode("utf-16-be"),
        codecs.BOM_UTF32_LE + TEXT.encode("utf-32-le"),
    ],
    ids=["utf-8", "utf-8-bom", "utf-16-le-bom", "utf-16-be-bom", "utf-32-le-bom"],
)
def test_unicode_files_with_or_without_a_bom_read_correctly(
    store: Store, tmp_path: Path, data: bytes
) -> None:
    result = import_csv(store, write(tmp_path, data))
    assert [c.key for c in result.table.columns] == ["name", "city"]  # no BOM in the key
    assert cells(store, result) == ROWS[1:]


def test_a_latin1_file_is_an_error_naming_the_line_unless_its_encoding_is_given(
    store: Store, tmp_path: Path
) -> None:
    path = write(tmp_path, "name,city\nAda,London\nJosé,Málaga\n".encode("cp1252"))
    message = refused(store, path)
    assert message.startswith(f"{path} line 3: not valid UTF-8 (bytes e9")
    assert "--encoding cp1252" in message
    for encoding in ("cp1252", "latin-1"):
        result = import_csv(store, path, encoding=encoding)
        assert cells(store, result) == [["Ada", "London"], ["José", "Málaga"]]
    assert "unknown encoding 'klingon'" in refused(store, path, encoding="klingon")
    # Names the codec registry refuses with another error (a NUL; found through the API), and
    # codecs that fail without naming a byte: still one error naming the problem.
    assert "unknown encoding 'utf\\x008'" in refused(store, path, encoding="utf\x008")
    assert "line 1: cannot be read as undefined" in refused(store, path, encoding="undefined")
    assert "line 3: not valid idna (bytes e9" in refused(store, path, encoding="idna")


def test_a_nul_byte_is_an_error_naming_the_line(store: Store, tmp_path: Path) -> None:
    # Before: SQLite stored it; Postgres raised UntranslatableCharacter after creating the table.
    path = write(tmp_path, b"name,notes\nAda,fine\nBob,bad\x00byte\n")
    message = refused(store, path)
    assert message.startswith(f"{path} line 3: contains a NUL character")
    # UTF-16 without a BOM looks like NULs: the message says so.
    path = write(tmp_path, "name\nAda\n".encode("utf-16-le"))
    message = refused(store, path)
    assert "line 1: contains a NUL character" in message
    assert "UTF-16 without a byte-order mark? give its encoding" in message


@pytest.mark.parametrize("data", [b"", codecs.BOM_UTF8, b"\n\r\n\n"], ids=["0", "bom", "blank"])
def test_an_empty_file_is_a_clear_error(store: Store, tmp_path: Path, data: bytes) -> None:
    # Before: pandas' EmptyDataError traceback.
    path = write(tmp_path, data)
    assert refused(store, path) == f"{path} is empty: no header row"


def test_a_header_alone_makes_a_table_with_no_rows(store: Store, tmp_path: Path) -> None:
    result = import_csv(store, write(tmp_path, b"name,email\n"))
    assert result.rows == 0 and [c.key for c in result.table.columns] == ["name", "email"]
    assert store.rows_in_order(result.table.id) == []


def test_a_missing_file_is_a_clear_error(store: Store, tmp_path: Path) -> None:
    assert refused(store, tmp_path / "nope.csv") == f"no such CSV file: {tmp_path / 'nope.csv'}"


# -- header keys -----------------------------------------------------------------------------


def test_column_key_keeps_letters_of_any_script() -> None:
    assert column_key("名前") == "名前"
    assert column_key("  Work E-mail (primary) ") == "work_e_mail_primary"
    assert column_key("नाम") == "नाम"  # a combining vowel sign is part of the word
    full_width = "\uff26\uff55\uff4c\uff4c \uff2e\uff41\uff4d\uff45"  # NFKC: "Full Name"
    assert column_key(full_width) == "full_name"
    assert column_key("Société") == column_key("Socie\u0301te\u0301") == "société"
    assert column_key("#") == "" and column_key("") == ""
    assert len(column_key("x" * 500)) == importer.KEY_MAX == 100


def test_cjk_headers_make_distinct_keys_and_keep_their_labels(store: Store, tmp_path: Path) -> None:
    # Before: both keys became `column`, and the import was refused.
    result = import_csv(store, write(tmp_path, "名前,電話\n山田,03-1234\n".encode()))
    assert [(c.key, c.label) for c in result.table.columns] == [("名前", "名前"), ("電話", "電話")]
    assert cells(store, result) == [["山田", "03-1234"]]


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("name,name", "headers 'name' (column 1) and 'name' (column 2) all make the key 'name'"),
        ("Name,e-mail,NAME ", "'Name' (column 1) and 'NAME' (column 3) all make the key 'name'"),
        ("name,,email", "column 2 has a blank header"),
        ("name,#", "header '#' (column 2) has no letter or digit to make a key"),
    ],
)
def test_duplicate_or_blank_headers_are_an_error_naming_them(
    store: Store, tmp_path: Path, header: str, problem: str
) -> None:
    # Before: `name,name` silently became name, name_1.
    width = header.count(",") + 1
    path = write(tmp_path, f"{header}\n{','.join(['x'] * width)}\n".encode())
    message = refused(store, path)
    assert message.startswith(f"{path} line 1: ") and problem in message
    assert "--rename-duplicates" in message


def test_rename_duplicates_numbers_them_and_reports_each_rename(
    store: Store, tmp_path: Path
) -> None:
    path = write(tmp_path, b"name,Name,,name_2,#\n1,2,3,4,5\n")
    result = import_csv(store, path, rename_duplicates=True)
    keys = [c.key for c in result.table.columns]
    # `name_2` is the file's own header, so the second `name` skips to name_3.
    assert keys == ["name", "name_3", "column_3", "name_2", "column_5"]
    assert [(r.column, r.header, r.key) for r in result.renamed] == [
        (2, "Name", "name_3"),
        (3, "", "column_3"),
        (5, "#", "column_5"),
    ]
    # A blank header's label is its new key (a label is never blank).
    assert [c.label for c in result.table.columns] == ["name", "Name", "column_3", "name_2", "#"]
    assert cells(store, result) == [["1", "2", "3", "4", "5"]]


def test_long_headers_and_names_behave_the_same_on_both_databases(
    store: Store, tmp_path: Path
) -> None:
    # Before: a 150-character header was accepted on SQLite and a traceback on Postgres.
    header = "What is your company's annual revenue, approximately, in US dollars " * 2
    header = header.strip()[:150]
    result = import_csv(store, write(tmp_path, f'"{header}",b\n1,2\n'.encode()))
    column = result.table.columns[0]
    assert len(column.key) <= 100 and column.key == column_key(header)  # key truncated
    assert column.label == header  # the label keeps the text
    assert cells(store, result) == [["1", "2"]]
    too_long = "h" * 201
    message = refused(store, write(tmp_path, f"{too_long},b\n1,2\n".encode()))
    assert "line 1: header 1" in message and "201 characters" in message
    message = refused(store, write(tmp_path, b"a\n1\n"), name="n" * 201)
    assert "201 characters; at most 200" in message
    long_stem = write(tmp_path, b"a\n1\n", name="s" * 201 + ".csv")
    assert "give a shorter one with --name" in refused(store, long_stem)


def test_fields_can_be_set_at_import_and_are_validated(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path, b"org,who,misc\nAcme,Ada,x\n")
    result = import_csv(store, path, fields={"org": "company.name", "who": "person.full_name"})
    by_key = {c.key: c for c in result.table.columns}
    assert by_key["org"].field == "company.name"
    assert str(by_key["who"].spec().field) == "person.full_name"
    assert by_key["misc"].field is None
    message = refused(store, path, fields={"nope": "company.name"})
    assert "no column with that key" in message and "'nope'" in message
    message = refused(store, path, fields={"org": "company.vibes"})
    assert "column 'org': unknown field 'company.vibes'" in message


# -- a realistic messy export ---------------------------------------------------------------

CRM_EXPORT = (
    "\ufeffFirst Name,Last Name,Email,Company,Notes,Annual Revenue (USD),Phone #\r\n"
    'Ada,Lovelace,ada@analytical.io,"Analytical Engines, Ltd.","Met at the expo.\r\n'
    'Wants a demo; said ""call me in Q3"".",1200000,+44 20 7946 0000\r\n'
    "\r\n"
    "José,Ñúñez,,Société Générale S.A.,,,\r\n"
    'Grace,Hopper,grace@cobol.com,"Cobol Systems, Inc.","Multi\nline\nnote, with commas",'
    '"1,500,000", \r\n'
    "\r\n"
)


def test_a_messy_crm_export_imports_cell_for_cell(store: Store, tmp_path: Path) -> None:
    """BOM, CRLF, quoted commas and newlines, doubled quotes, blank lines, unicode, empties."""
    path = write(tmp_path, CRM_EXPORT.encode("utf-8"), name="HubSpot export.csv")
    result = import_csv(store, path)
    assert result.table.name == "HubSpot export" and result.rows == 3
    assert [c.key for c in result.table.columns] == [
        "first_name",
        "last_name",
        "email",
        "company",
        "notes",
        "annual_revenue_usd",
        "phone",
    ]
    assert result.table.columns[6].label == "Phone #"
    assert cells(store, result) == [
        [
            "Ada",
            "Lovelace",
            "ada@analytical.io",
            "Analytical Engines, Ltd.",
            'Met at the expo.\r\nWants a demo; said "call me in Q3".',
            "1200000",
            "+44 20 7946 0000",
        ],
        ["José", "Ñúñez", "", "Société Générale S.A.", "", "", ""],
        [
            "Grace",
            "Hopper",
            "grace@cobol.com",
            "Cobol Systems, Inc.",
            "Multi\nline\nnote, with commas",
            "1,500,000",
            " ",
        ],
    ]


def test_chunk_boundaries_change_nothing(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny read chunks split CRLFs, multi-byte characters and quoted fields: same table, and
    a decoding error still names its line."""
    path = write(tmp_path, CRM_EXPORT.encode("utf-8"))
    expected = cells(store, import_csv(store, path))
    utf16 = write(tmp_path, codecs.BOM_UTF16_BE + CRM_EXPORT.encode("utf-16-be"), "be.csv")
    bad = write(tmp_path, CRM_EXPORT.encode("utf-8") + b"x,y,z,\xc3,5,6,7\r\n", "bad.csv")
    for size in (1, 2, 3, 7):
        monkeypatch.setattr(importer, "READ_CHUNK", size)
        assert cells(store, import_csv(store, path)) == expected
        assert cells(store, import_csv(store, utf16)) == expected
        assert refused(store, bad).startswith(f"{bad} line 10: not valid UTF-8")


def test_memory_stays_bounded_by_the_batch_not_the_file(store: Store, tmp_path: Path) -> None:
    notes = "n" * 900
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8") as file:
        file.write("name,notes\n")
        for i in range(20_000):
            file.write(f"Person {i},{notes}\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        result = import_csv(store, path, batch_rows=500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.rows == 20_000
    assert peak < size / 2, f"peak {peak:,} bytes for a {size:,}-byte file"


# -- the CLI -----------------------------------------------------------------------------------


def glaze(store: Store, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GLAZE), "--database-url", store.url, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_keys_ids_and_fields_and_takes_field_and_encoding(
    store: Store, tmp_path: Path
) -> None:
    path = write(tmp_path, "Org,Contact,Ville\nAcme,Ada,Montréal\n".encode("cp1252"))
    result = glaze(
        store,
        tmp_path,
        "import-csv",
        str(path),
        "--encoding",
        "cp1252",
        "--field",
        "org=company.name",
        "--field",
        "ville=company.location",
    )
    assert result.returncode == 0, result.stderr
    table_id = next(word for word in result.stdout.split() if word.startswith("tbl_"))
    info = store.get_table(table_id)
    for column in info.columns:
        assert column.key in result.stdout and column.id in result.stdout
    assert {c.key: c.field for c in info.columns} == {
        "org": "company.name",
        "contact": None,
        "ville": "company.location",
    }
    assert "company.location" in result.stdout and "imported 1 rows" in result.stdout
    assert store.rows_in_order(table_id)[0].data["ville"] == "Montréal"


def test_cli_reports_renames(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path, b"name,name\n1,2\n")
    result = glaze(store, tmp_path, "import-csv", str(path), "--rename-duplicates")
    assert result.returncode == 0, result.stderr
    assert "renamed header 'name' (column 2) to key 'name_2'" in result.stdout


@pytest.mark.parametrize(
    ("data", "args", "expected"),
    [
        (b"a,b\n1,2,3\n", (), "line 2: 3 fields, the header has 2"),
        (b"a,b\n1,2\n", ("--field", "c=company.name"), "cannot set the field of 'c'"),
        (b"a,b\n1,2\n", ("--field", "a=company.vibes"), "unknown field 'company.vibes'"),
        (b"", (), "is empty: no header row"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    store: Store, tmp_path: Path, data: bytes, args: tuple[str, ...], expected: str
) -> None:
    before = counts(store)
    result = glaze(store, tmp_path, "import-csv", str(write(tmp_path, data)), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert counts(store) == before


# -- fuzz --------------------------------------------------------------------------------------

BOMS = [b"", codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE]
CSV_CHARS = st.sampled_from(list(',"\n\r ab\x00é名\ufeff\t;\u2028\x85')) | st.characters()
ENCODINGS = ["utf-8", "utf-16-le", "utf-16-be", "latin-1", "cp1252"]

# Any bytes: random, a BOM then random, or CSV-ish text in one or two encodings glued together.
ANY_BYTES = (
    st.binary(max_size=600)
    | st.builds(lambda bom, rest: bom + rest, st.sampled_from(BOMS), st.binary(max_size=600))
    | st.lists(
        st.tuples(st.text(CSV_CHARS, max_size=200), st.sampled_from(ENCODINGS)),
        min_size=1,
        max_size=2,
    ).map(lambda parts: b"".join(text.encode(enc, "replace") for text, enc in parts))
)

CELL = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufeff"), max_size=15
)


@st.composite
def well_formed(draw: st.DrawFn) -> tuple[bytes, list[list[str]]]:
    """A CSV as a spreadsheet would write it: (its bytes, header + rows)."""
    width = draw(st.integers(1, 4))
    rows = draw(st.lists(st.lists(CELL, min_size=width, max_size=width), min_size=1, max_size=8))
    # Python's writer leaves a lone \r unquoted when lines end in \n (a file every reader splits
    # there): such files are written with every field quoted.
    terminator, quoting = draw(
        st.sampled_from(
            [("\r\n", csv.QUOTE_MINIMAL), ("\r\n", csv.QUOTE_ALL), ("\n", csv.QUOTE_ALL)]
        )
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=terminator, quoting=quoting)
    writer.writerows(rows)
    bom, encoding = draw(
        st.sampled_from(
            [
                (b"", "utf-8"),
                (codecs.BOM_UTF8, "utf-8"),
                (codecs.BOM_UTF16_LE, "utf-16-le"),
                (codecs.BOM_UTF16_BE, "utf-16-be"),
            ]
        )
    )
    return bom + buffer.getvalue().encode(encoding), rows


PER_INPUT_SECONDS = 2.0
# 150 per test keeps the suite fast; GLAZE_FUZZ_EXAMPLES=5000 for a deep run.
FUZZ_EXAMPLES = int(os.environ.get("GLAZE_FUZZ_EXAMPLES", "150"))
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # bounded by our own per-input assertion, which is clearer
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


def test_fuzz_any_bytes_import_whole_or_raise_csv_import_error(
    store: Store, tmp_path: Path
) -> None:
    tried = imported = 0
    path = tmp_path / "fuzz.csv"

    @FUZZ_SETTINGS
    @given(data=ANY_BYTES)
    def check(data: bytes) -> None:
        nonlocal tried, imported
        tried += 1
        path.write_bytes(data)
        before = counts(store)
        started = time.perf_counter()
        try:
            result = import_csv(store, path, rename_duplicates=tried % 2 == 0)
        except CsvImportError:
            assert counts(store) == before  # never a partial table
        else:
            imported += 1
            tables, columns, rows = counts(store)
            assert (tables, columns, rows) == (
                before[0] + 1,
                before[1] + len(result.table.columns),
                before[2] + result.rows,
            )
        assert time.perf_counter() - started < PER_INPUT_SECONDS

    check()
    print(
        f"\nfuzz CSV import, any bytes ({store.dialect}): {tried} inputs tried,"
        f" {imported} imported, {tried - imported} refused with CsvImportError"
    )
    assert tried >= min(FUZZ_EXAMPLES, 100)


def test_fuzz_well_formed_csv_round_trips(store: Store, tmp_path: Path) -> None:
    tried = 0
    path = tmp_path / "fuzz.csv"

    @FUZZ_SETTINGS
    @given(case=well_formed())
    def check(case: tuple[bytes, list[list[str]]]) -> None:
        nonlocal tried
        tried += 1
        data, rows = case
        path.write_bytes(data)
        started = time.perf_counter()
        result = import_csv(store, path, rename_duplicates=True)
        assert time.perf_counter() - started < PER_INPUT_SECONDS
        header, body = rows[0], rows[1:]
        assert [c.label for c in result.table.columns] == [
            h.strip() or c.key for h, c in zip(header, result.table.columns, strict=True)
        ]
        assert result.rows == len(body)
        assert cells(store, result) == body

    check()
    print(f"\nfuzz CSV import, well-formed ({store.dialect}): {tried} inputs tried")
    assert tried >= min(FUZZ_EXAMPLES, 100)
