"""CSV import: a file becomes a table whole, or not at all.

The file is streamed (one read chunk and one insert batch in memory) through the stdlib `csv`
module and written by `Store.import_table` in ONE transaction, so a file that turns out bad at
row 15,001 leaves no table behind. Every problem is a `CsvImportError` naming the file, the
line (1-based, as a text editor counts it: the header is line 1) and the reason.

Why the stdlib reader and not pandas: pandas guesses where a CSV user expects strictness. With
one extra field in the first data row it silently makes the first column the index (a shifted
table); with `index_col=False` it drops the extra field with a warning; a row with fewer fields
is padded with NaN, with no option to refuse it; and its chunked reader cannot say on which
line a decoding error is. `csv.reader` hands over each record as read, so the field count is
checked per record and the line is exact, and it is as fast here (the insert dominates).

Rules a user can rely on:
- Every record has as many fields as the header: more OR fewer is an error naming the line
  (a missing trailing field is as likely a broken export as an empty cell). Blank lines are
  skipped. A header alone makes a table with no rows.
- Encodings: a BOM decides (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE); without one the file is
  UTF-8 unless `encoding` says otherwise (e.g. `cp1252`, `latin-1`). Bytes that do not decode
  are an error naming the line, never replaced.
- A NUL character is an error naming the line (Postgres cannot store it, and a CSV holding one
  is binary or mis-decoded), never stripped silently.
- Keys are slugs that keep letters and digits of any script (`名前` stays `名前`), lower-cased,
  capped at the database's key length (the label keeps the full header). Blank headers and
  headers that share a key are an error naming them, unless `rename_duplicates` numbers them,
  and every rename is returned for the caller to report.
"""

from __future__ import annotations

import codecs
import csv
import re
import unicodedata
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from glaze_pipeline.core.errors import CsvImportError
from glaze_pipeline.core.fields import UnknownFieldError, parse_field
from glaze_pipeline.core.limits import MAX_COLUMN_KEY, MAX_COLUMN_LABEL, MAX_TABLE_NAME
from glaze_pipeline.core.store import ColumnDef, Store, TableInfo

# The schema's limits: the same on both databases.
KEY_MAX = MAX_COLUMN_KEY
LABEL_MAX = MAX_COLUMN_LABEL
NAME_MAX = MAX_TABLE_NAME

READ_CHUNK = 1 << 20  # bytes decoded at a time
# A physical line longer than this is refused: a file with no line breaks (binary, or a
# wrong encoding) must not be read into memory whole. Quoted multi-line fields are split
# into lines, so this bounds a line, not a record.
MAX_LINE_CHARS = 16 << 20
FIELD_MAX = csv.field_size_limit()  # the csv module's per-field limit (131,072 characters)

# Longest first: the UTF-32 LE BOM begins with the UTF-16 LE one.
_BOMS: tuple[tuple[bytes, str, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE"),
)
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)")
_TERMINATOR = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class RenamedHeader:
    """A header given a key other than its own slug (`rename_duplicates`)."""

    column: int  # 1-based, as in a spreadsheet
    header: str
    key: str


@dataclass(frozen=True, slots=True)
class CsvImport:
    """What an import made: the table, its row count, how the file was read, what was renamed."""

    table: TableInfo
    rows: int
    encoding: str
    renamed: tuple[RenamedHeader, ...]


def column_key(header: str) -> str:
    """A header's key: letters, digits and marks of any script kept (lower-cased, NFKC), runs of
    anything else one `_`, capped at the database's key length. "" when nothing is left."""
    text = unicodedata.normalize("NFKC", header).lower()
    slug = "".join(ch if unicodedata.category(ch)[0] in "LNM" else " " for ch in text)
    return "_".join(slug.split())[:KEY_MAX].strip("_")


def import_csv(
    store: Store,
    path: Path,
    *,
    name: str | None = None,
    encoding: str | None = None,
    rename_duplicates: bool = False,
    fields: Mapping[str, str] | None = None,
    batch_rows: int = 5000,
) -> CsvImport:
    """Import a CSV (header row = columns) as a new table, all or nothing.

    `fields` sets columns' catalogue fields by key (`{"org": "company.name"}`), validated
    before anything is written; other columns keep the field inferred from their key.
    """
    source = _CsvSource(path, encoding)
    table_name = _table_name(name if name is not None else path.stem)
    with closing(source.records()) as records:
        header_line, headers = _header(source, records)
        keys, labels, renamed = _plan_keys(source, header_line, headers, rename_duplicates)
        explicit = _explicit_fields(keys, fields or {})
        columns = [
            ColumnDef(key, label, field=explicit.get(key))
            for key, label in zip(keys, labels, strict=True)
        ]
        table, count = store.import_table(
            table_name, columns, _rows(source, records, keys), batch_size=batch_rows
        )
    return CsvImport(table, count, source.description, tuple(renamed))


class _CsvSource:
    """One file, decoded in chunks and split into physical lines, each checked as it passes."""

    def __init__(self, path: Path, encoding: str | None) -> None:
        self.path = path
        try:
            with path.open("rb") as file:
                head = file.read(4)
        except FileNotFoundError:
            raise CsvImportError(f"no such CSV file: {path}") from None
        except OSError as error:
            raise CsvImportError(f"cannot read {path}: {error.strerror or error}") from None
        for bom, codec, label in _BOMS:
            if head.startswith(bom):
                # The BOM wins over a given encoding: it is the file saying what it is.
                self.codec, self.skip, self.description = codec, len(bom), f"{label} (BOM)"
                return
        self.skip = 0
        if encoding is None:
            self.codec, self.description = "utf-8", "UTF-8"
            return
        try:
            info = codecs.lookup(encoding)
        except (LookupError, ValueError, UnicodeError):  # ValueError: a NUL in the name
            raise CsvImportError(f"unknown encoding {encoding!r}") from None
        if not getattr(info, "_is_text_encoding", True):  # base64, rot13, zlib...
            raise CsvImportError(f"{encoding!r} is not a text encoding")
        self.codec, self.description = info.name, info.name

    def error(self, line: int, reason: str) -> CsvImportError:
        return CsvImportError(f"{self.path} line {line}: {reason}")

    def lines(self) -> Iterator[str]:
        """Physical lines with their endings (\\r\\n, \\n or \\r) kept, as `csv` wants them."""
        decoder = codecs.getincrementaldecoder(self.codec)("strict")
        number = 0  # lines handed out
        pending = ""  # the start of a line whose end is in the next chunk
        with self.path.open("rb") as file:
            file.seek(self.skip)
            while True:
                chunk = file.read(READ_CHUNK)
                final = not chunk
                try:
                    text = decoder.decode(chunk, final)
                except UnicodeDecodeError as error:
                    raise self._decode_error(error, number, pending) from None
                except UnicodeError as error:  # a codec that names no bytes (idna, undefined)
                    raise self.error(
                        number + 1, f"cannot be read as {self.description}: {error}"
                    ) from None
                if pending:
                    text = pending + text
                end = 0
                for match in _LINE.finditer(text):
                    line = match.group()
                    if not final and match.end() == len(text) and line.endswith("\r"):
                        break  # a "\r\n" may be split across chunks
                    number += 1
                    if "\x00" in line:
                        raise self._nul_error(number)
                    yield line
                    end = match.end()
                pending = text[end:]
                if final:
                    if pending:
                        number += 1
                        if "\x00" in pending:
                            raise self._nul_error(number)
                        yield pending
                    return
                if len(pending) > MAX_LINE_CHARS:
                    raise self.error(
                        number + 1,
                        f"longer than {MAX_LINE_CHARS:,} characters with no line break "
                        "(not a CSV, or not in this encoding?)",
                    )

    def records(self) -> Generator[tuple[int, list[str]], None, None]:
        """(line the record starts on, its fields), blank lines included as []."""
        reader = csv.reader(self.lines(), strict=True)
        start = 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                raise self._csv_error(error, start, reader.line_num) from None
            yield start, record
            start = reader.line_num + 1

    def _decode_error(self, error: UnicodeDecodeError, number: int, pending: str) -> CsvImportError:
        # The bytes before the bad ones decode (the decoder stopped there): count their lines.
        before = bytes(error.object[: error.start])
        try:
            seen = pending + before.decode(self.codec, "replace")
            line = number + len(_TERMINATOR.findall(seen)) + 1
        except UnicodeError:  # a codec with no "replace" (idna): count the newline bytes
            line = number + pending.count("\n") + before.count(b"\n") + 1
        bad = bytes(error.object[error.start : min(error.end, error.start + 4)]).hex(" ")
        reason = f"not valid {self.description} (bytes {bad}: {error.reason})"
        if self.codec == "utf-8" and self.skip == 0:
            reason += "; if the file was saved as Windows-1252 or Latin-1, give that encoding"
            reason += " (--encoding cp1252)"
        return self.error(line, reason)

    def _nul_error(self, line: int) -> CsvImportError:
        hint = (
            " (UTF-16 without a byte-order mark? give its encoding, e.g. --encoding utf-16-le)"
            if self.codec == "utf-8" and self.skip == 0
            else ""
        )
        return self.error(line, f"contains a NUL character, which a table cannot hold{hint}")

    def _csv_error(self, error: csv.Error, start: int, current: int) -> CsvImportError:
        message = str(error)
        if "field larger than field limit" in message:
            return self.error(current, f"a field is longer than {FIELD_MAX:,} characters")
        if "unexpected end of data" in message:
            return self.error(start, "a quoted field in this record is never closed")
        if "expected after" in message:
            return self.error(
                current,
                'text after a closing quote (a " inside a quoted field must be doubled: "")',
            )
        return self.error(current, f"malformed CSV ({message})")


def _is_blank(record: Sequence[str], width: int) -> bool:
    """An empty line, or one holding only spaces where the table has several columns (in a
    one-column table it is a value)."""
    return not record or (width > 1 and len(record) == 1 and not record[0].strip())


def _header(source: _CsvSource, records: Iterator[tuple[int, list[str]]]) -> tuple[int, list[str]]:
    """The first non-empty record (a line of spaces there is a one-column header)."""
    for line, record in records:
        if record:
            return line, record
    raise CsvImportError(f"{source.path} is empty: no header row")


def _plan_keys(
    source: _CsvSource, line: int, headers: Sequence[str], rename: bool
) -> tuple[list[str], list[str], list[RenamedHeader]]:
    """Keys and labels for the headers; blank or shared keys refused, or numbered if asked."""
    labels = [header.strip() for header in headers]
    for column, label in enumerate(labels, 1):
        if len(label) > LABEL_MAX:
            raise source.error(
                line,
                f"header {column} ({label[:40]!r}...) is {len(label)} characters; a column "
                f"header can be at most {LABEL_MAX}",
            )
    keys = [column_key(label) for label in labels]
    problems: list[str] = []
    for column, (label, key) in enumerate(zip(labels, keys, strict=True), 1):
        if not key:
            problems.append(
                f"column {column} has a blank header"
                if not label
                else f"header {label!r} (column {column}) has no letter or digit to make a key"
            )
    by_key: dict[str, list[int]] = {}
    for column, key in enumerate(keys, 1):
        if key:
            by_key.setdefault(key, []).append(column)
    for key, columns in by_key.items():
        if len(columns) > 1:
            named = " and ".join(f"{labels[c - 1]!r} (column {c})" for c in columns)
            problems.append(f"headers {named} all make the key {key!r}")
    if problems and not rename:
        raise source.error(
            line,
            "; ".join(problems)
            + ". Fix the header row, or import with --rename-duplicates to number them",
        )
    taken = set(by_key)
    renamed: list[RenamedHeader] = []
    final: list[str] = []
    seen: set[str] = set()
    for column, (label, key) in enumerate(zip(labels, keys, strict=True), 1):
        if key and key not in seen:
            seen.add(key)
            final.append(key)
            continue
        # A duplicate becomes key_2, key_3...; a blank header column_<n>; never a taken key.
        stem, number = (key, 2) if key else (f"column_{column}", 1)
        candidate = _numbered(stem, number)
        while candidate in taken or candidate in seen:
            number += 1
            candidate = _numbered(stem, number)
        seen.add(candidate)
        final.append(candidate)
        renamed.append(RenamedHeader(column, label, candidate))
    return final, labels, renamed


def _numbered(stem: str, number: int) -> str:
    if number == 1:
        return stem
    suffix = f"_{number}"
    return stem[: KEY_MAX - len(suffix)] + suffix


def _explicit_fields(keys: Sequence[str], fields: Mapping[str, str]) -> dict[str, str]:
    """Fields set by key, each checked against the file's keys and the catalogue."""
    explicit: dict[str, str] = {}
    for key, field in fields.items():
        if key not in keys:
            raise CsvImportError(
                f"cannot set the field of {key!r}: the file has no column with that key "
                f"(its keys: {', '.join(keys)})"
            )
        try:
            explicit[key] = str(parse_field(field))
        except UnknownFieldError as error:
            raise CsvImportError(f"column {key!r}: {error}") from None
    return explicit


def _table_name(name: str) -> str:
    text = name.strip()
    if not text:
        raise CsvImportError("the table name is blank")
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise CsvImportError(f"the table name {text[:40]!r} contains a control character")
    if len(text) > NAME_MAX:
        raise CsvImportError(
            f"the table name {text[:40]!r}... is {len(text)} characters; at most {NAME_MAX}"
            " (give a shorter one with --name)"
        )
    return text


def _rows(
    source: _CsvSource, records: Iterator[tuple[int, list[str]]], keys: Sequence[str]
) -> Iterator[dict[str, str]]:
    width = len(keys)
    for line, record in records:
        if _is_blank(record, width):
            continue
        if len(record) != width:
            raise source.error(line, f"{len(record)} fields, the header has {width}")
        yield dict(zip(keys, record, strict=True))
