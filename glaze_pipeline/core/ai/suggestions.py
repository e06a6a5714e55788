"""Table, column and row suggestions: a model's proposal, validated and bounded.

The user's context is data, never instructions: it travels inside the prompt's JSON input, and
whatever the model answers is only ever validated data (a name, column definitions, identifier
values), never SQL or code. What does not validate is dropped with a note (one line each) the
user reads next to the proposal; a proposal left with nothing usable is
`AIJobError(retryable=False)`.

Columns: keys follow the column-key pattern and never clash with the table's (or each other);
identifier and enrichment columns name a catalogue field the table's entity can have, each
field once; AI columns carry a question that names only the entity's identifiers (see
`core.ai.columns`), at most `MAX_AI_COLUMNS` of them; `MAX_COLUMNS` in all.

Rows: only identifier values (keyed by the table's identifier columns), each checked by the
detection normalisers (a domain that is a domain, an email that is an email); a row that
identifies nothing, or the same entity as an earlier row or one the table has
(`TableSpec.known_identifiers`), is dropped; at most `count` rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from glaze_pipeline.core.ai.columns import (
    COMPANY_PLACEHOLDERS,
    MAX_TEMPLATE,
    PERSON_PLACEHOLDERS,
    InvalidPromptError,
    placeholders,
)
from glaze_pipeline.core.ai.errors import AIJobError
from glaze_pipeline.core.ai.prompts import load_prompt
from glaze_pipeline.core.ai.structured import AnswerUsage, ask
from glaze_pipeline.core.detection import (
    NAME_MAX_CHARS,
    company_domain,
    linkedin_slug,
    normalize_company_name,
    normalize_email,
    normalize_person_name,
)
from glaze_pipeline.core.errors import InputError, InvalidSelectionError
from glaze_pipeline.core.fields import COMPANY_FIELDS, PERSON_FIELDS, UnknownFieldError, parse_field

if TYPE_CHECKING:  # the client is passed in; these modules never talk HTTP themselves
    from glaze_pipeline.core.ai.client import LlmClient


MAX_CONTEXT = 4000  # characters
MAX_ROWS = 200  # per row_suggestions request; count must be 1..MAX_ROWS
MAX_COLUMNS = 25
MAX_AI_COLUMNS = 3
MAX_LABEL = 120
MAX_EXCLUDE = 500  # known identifiers shown to the model (all of them are checked)
MAX_NOTES = 20
# A company's or person's name is a few words: a sentence in a name column is not a name.
MAX_NAME_WORDS = 8
MAX_NAME_CHARS = 120
KEY_PATTERN = r"^[a-z][a-z0-9_]{0,59}$"

EntityTypeName = Literal["company", "person"]
ENTITY_TYPES: tuple[str, ...] = ("company", "person")

# The identifier columns a new table gets: (key, label, field, data type).
IDENTIFIER_COLUMNS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "company": (
        ("company_name", "Company name", "company.name", "text"),
        ("domain", "Domain", "company.domain", "url"),
    ),
    "person": (
        ("full_name", "Full name", "person.full_name", "text"),
        ("company", "Company", "person.company", "text"),
        ("linkedin_url", "LinkedIn URL", "person.linkedin_url", "url"),
        ("email", "Email", "person.email", "email"),
    ),
}
# The fields detection identifies a row's entity by, per table entity type.
IDENTIFIER_FIELDS: dict[str, frozenset[str]] = {
    "company": frozenset({"company.name", "company.domain", "company.linkedin_url"}),
    "person": frozenset(
        {
            "person.full_name",
            "person.company",
            "person.linkedin_url",
            "person.email",
            "company.name",
            "company.domain",
        }
    ),
}
# Catalogue fields a table's columns may name: a person's row also identifies their company.
ALLOWED_FIELDS: dict[str, tuple[str, ...]] = {
    "company": tuple(f"company.{name}" for name in COMPANY_FIELDS),
    "person": tuple(f"person.{name}" for name in PERSON_FIELDS)
    + tuple(f"company.{name}" for name in COMPANY_FIELDS),
}
AI_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "company": COMPANY_PLACEHOLDERS,
    "person": PERSON_PLACEHOLDERS,
}

T = TypeVar("T")


# --- input checks --------------------------------------------------------------------------


def check_context(context: str) -> str:
    """The user's context, stripped; empty, too long or holding a NUL: InputError naming it."""
    if not isinstance(context, str):
        raise InputError(f"context must be text, got {type(context).__name__}")
    text = context.strip()
    if not text:
        raise InputError(
            "context is empty: describe the table you want, e.g. 'B2B payment "
            "companies in the Nordics'"
        )
    if len(text) > MAX_CONTEXT:
        raise InputError(f"context is {len(text)} characters long; the limit is {MAX_CONTEXT}")
    if "\x00" in text:
        raise InputError("context holds a NUL character")
    return text


def check_count(count: int) -> int:
    """A row count in 1..MAX_ROWS, else InvalidSelectionError."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_ROWS:
        raise InvalidSelectionError(
            f"count must be a whole number from 1 to {MAX_ROWS}, got {count!r}"
        )
    return count


def _check_entity_type(entity_type: str) -> str:
    if entity_type not in ENTITY_TYPES:
        raise InputError(f"entity type must be 'company' or 'person', got {entity_type!r}")
    return entity_type


# --- models --------------------------------------------------------------------------------


class TableProposal(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=80)
    description: str = Field(max_length=500)
    entity_type: EntityTypeName


class ColumnProposal(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    key: str = Field(pattern=KEY_PATTERN)
    label: str = Field(min_length=1, max_length=MAX_LABEL)
    data_type: Literal["text", "number", "url", "email", "boolean"] = "text"
    role: Literal["identifier", "enrichment", "ai"]
    field: str | None = None  # a catalogue field ("company.industry") for identifier/enrichment
    prompt: str | None = Field(default=None, max_length=MAX_TEMPLATE)  # an AI column's template


class RowProposal(BaseModel):
    values: dict[str, str]  # keys: identifier column keys


class AiColumnAnswer(BaseModel):
    """What the `ai_column` prompt answers for one entity (an AI column's cell)."""

    model_config = ConfigDict(str_strip_whitespace=True)

    answer: str = Field(max_length=500)
    confidence: float = Field(default=0.7, ge=0.0, le=1.0)


class _ColumnsAnswer(BaseModel):
    # Items are checked one by one: one bad column is dropped, not the whole answer.
    columns: list[Any]


class _RowsAnswer(BaseModel):
    rows: list[Any]


def existing_column(
    key: str, label: str | None = None, field: str | None = None, prompt: str | None = None
) -> ColumnProposal:
    """A table's existing column as suggestions see it, whatever its key looks like (a
    CSV import keeps `Company Name`): its role follows from its field and prompt."""
    role: Literal["identifier", "enrichment", "ai"]
    if prompt:
        role = "ai"
    elif field is not None and any(field in fields for fields in IDENTIFIER_FIELDS.values()):
        role = "identifier"
    else:
        role = "enrichment"
    return ColumnProposal.model_construct(
        key=key,
        label=label or key,
        data_type="text",
        role=role,
        field=None if prompt else field,
        prompt=prompt or None,
    )


def identifier_columns(entity_type: str) -> tuple[ColumnProposal, ...]:
    """The identifier columns a new table of `entity_type` gets."""
    return tuple(
        ColumnProposal(key=key, label=label, field=ref, data_type=kind, role="identifier")
        for key, label, ref, kind in IDENTIFIER_COLUMNS[_check_entity_type(entity_type)]
    )


@dataclass(frozen=True)
class TableSpec:
    """What the model is told about a table (new or existing).

    `known_identifiers`: the entities the table has, as detection normalises them: bare
    values (`acme.com`, a LinkedIn slug `ada-lovelace`, `ada@acme.com`) or EntityKey ids
    (`company:domain:acme.com`); `row_identifiers` gives them for a row.
    """

    name: str
    description: str | None
    entity_type: str
    columns: tuple[ColumnProposal, ...] = ()
    known_identifiers: frozenset[str] = frozenset()

    @classmethod
    def from_proposal(
        cls, proposal: TableProposal, columns: Iterable[ColumnProposal] = ()
    ) -> TableSpec:
        return cls(proposal.name, proposal.description, proposal.entity_type, tuple(columns))

    def as_input(self) -> dict[str, Any]:
        """The table as the prompts' JSON input shows it."""
        return {
            "name": self.name,
            "description": self.description,
            "entity_type": self.entity_type,
            "columns": [
                {
                    "key": column.key,
                    "label": column.label,
                    "role": column.role,
                    "field": column.field,
                    "prompt": column.prompt,
                }
                for column in self.columns
            ],
        }


@dataclass(frozen=True)
class Suggestion(Generic[T]):
    """A validated, bounded proposal, what was dropped and why, and what it cost."""

    value: T  # TableProposal | list[ColumnProposal] | list[RowProposal]
    notes: tuple[str, ...]
    usage: AnswerUsage

    def as_json(self) -> dict[str, Any]:
        value: Any = self.value
        if isinstance(value, BaseModel):
            shown: Any = value.model_dump(mode="json")
        elif isinstance(value, list):
            shown = [
                item.model_dump(mode="json") if isinstance(item, BaseModel) else item
                for item in value
            ]
        else:
            shown = value
        usage = self.usage
        return {
            "value": shown,
            "notes": list(self.notes),
            "promptVersion": usage.prompt_version,
            "model": usage.model,
            "usage": {
                "promptTokens": usage.prompt_tokens,
                "completionTokens": usage.completion_tokens,
                "cost": usage.cost,
                "calls": usage.calls,
            },
        }


class _Notes:
    """Notes for the user, one line each; past MAX_NOTES they are counted, not listed."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.more = 0

    def add(self, line: str) -> None:
        if len(self.lines) < MAX_NOTES:
            self.lines.append(line)
        else:
            self.more += 1

    def done(self) -> list[str]:
        more = [f"... and {self.more} more notes"] if self.more else []
        return self.lines + more


def _shown(value: Any, limit: int = 40) -> str:
    text = " ".join(str(value).split())
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


# --- operations ----------------------------------------------------------------------------


async def suggest_table(
    client: LlmClient, context: str, *, table: TableSpec | None = None
) -> Suggestion[TableProposal]:
    """A name, description and entity type for a table about `context` (or a better name and
    description for `table`, keeping its entity type)."""
    context = check_context(context)
    if table is not None:
        _check_entity_type(table.entity_type)
    variables = {"context": context, "table": table.as_input() if table is not None else None}
    answer = await ask(client, load_prompt("table_suggestions"), variables, TableProposal)
    proposal, notes = answer.value, []
    if table is not None and proposal.entity_type != table.entity_type:
        notes.append(
            f"entity type kept as {table.entity_type!r}: the table exists "
            f"(the model proposed {proposal.entity_type!r})"
        )
        proposal = proposal.model_copy(update={"entity_type": table.entity_type})
    return Suggestion(proposal, tuple(notes), answer.usage)


async def suggest_columns(
    client: LlmClient, context: str, *, table: TableSpec
) -> Suggestion[list[ColumnProposal]]:
    """New columns for `table`: the identifiers it lacks, enrichment fields, a few AI columns."""
    context = check_context(context)
    entity_type = _check_entity_type(table.entity_type)
    variables = {
        "context": context,
        "table": table.as_input(),
        "catalogue": list(ALLOWED_FIELDS[entity_type]),
        "ai_placeholders": [f"{{{name}}}" for name in AI_PLACEHOLDERS[entity_type]],
        "max_columns": MAX_COLUMNS,
        "max_ai_columns": MAX_AI_COLUMNS,
    }
    answer = await ask(client, load_prompt("column_suggestions"), variables, _ColumnsAnswer)
    columns, notes = check_columns(answer.value.columns, table)
    if not columns:
        raise AIJobError(
            f"LLM column_suggestions: no usable column in the answer ({_why(notes)})",
            retryable=False,
        )
    return Suggestion(columns, tuple(notes), answer.usage)


async def suggest_rows(
    client: LlmClient, context: str, *, table: TableSpec, count: int
) -> Suggestion[list[RowProposal]]:
    """Up to `count` new rows for `table`, each an entity with the identifiers it needs."""
    context = check_context(context)
    count = check_count(count)
    entity_type = _check_entity_type(table.entity_type)
    columns, notes = row_columns(table)
    variables = {
        "context": context,
        "table": {
            "name": table.name,
            "description": table.description,
            "entity_type": entity_type,
        },
        "identifier_columns": [
            {"key": column.key, "label": column.label, "field": column.field} for column in columns
        ],
        "count": count,
        "exclude": sorted(table.known_identifiers)[:MAX_EXCLUDE],
    }
    answer = await ask(client, load_prompt("row_suggestions"), variables, _RowsAnswer)
    rows, row_notes = check_rows(answer.value.rows, table, count=count, columns=columns)
    notes += row_notes
    if not rows:
        raise AIJobError(
            f"LLM row_suggestions: no usable row in the answer ({_why(notes)})", retryable=False
        )
    return Suggestion(rows, tuple(notes), answer.usage)


def _why(notes: Sequence[str]) -> str:
    return "; ".join(notes[:3]) if notes else "the answer was empty"


# --- columns -------------------------------------------------------------------------------


def check_columns(items: Sequence[Any], table: TableSpec) -> tuple[list[ColumnProposal], list[str]]:
    """The usable columns among a model's `items`, and a note for each one dropped."""
    entity_type = _check_entity_type(table.entity_type)
    notes = _Notes()
    taken_keys = {column.key.casefold() for column in table.columns}
    taken_fields = {column.field: column.key for column in table.columns if column.field}
    taken_prompts = {column.prompt.strip() for column in table.columns if column.prompt}
    kept: list[ColumnProposal] = []
    ai_columns = 0
    for position, item in enumerate(items, 1):
        if len(kept) == MAX_COLUMNS:
            notes.add(
                f"{len(items) - position + 1} more columns dropped: at most {MAX_COLUMNS} "
                "per suggestion"
            )
            break
        column, problem = _check_column(item, entity_type)
        if column is not None and problem is None:
            if column.key.casefold() in taken_keys:
                problem = "the table already has a column with this key, or it is repeated"
            elif column.field is not None and column.field in taken_fields:
                problem = (
                    f"{column.field} is already filled by column {taken_fields[column.field]!r}"
                )
            elif column.prompt is not None and column.prompt in taken_prompts:
                problem = "the same question as another AI column"
            elif column.role == "ai" and ai_columns == MAX_AI_COLUMNS:
                problem = f"at most {MAX_AI_COLUMNS} AI columns per suggestion"
        if column is None or problem is not None:
            key = item.get("key") if isinstance(item, dict) else item
            notes.add(f"column #{position} {_shown(key)} dropped: {problem}")
            continue
        kept.append(column)
        taken_keys.add(column.key.casefold())
        if column.field is not None:
            taken_fields[column.field] = column.key
        if column.prompt is not None:
            taken_prompts.add(column.prompt)
            ai_columns += 1
    return kept, notes.done()


def _check_column(item: Any, entity_type: str) -> tuple[ColumnProposal | None, str | None]:
    """One proposed column, checked on its own: (the column, None) or (None, why not)."""
    if not isinstance(item, dict):
        return None, "not a JSON object"
    try:
        column = ColumnProposal.model_validate(item)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return None, f"{where}: {first['msg']}"
    if column.role == "ai":
        problem = _check_question(column.prompt, entity_type)
        if problem is not None:
            return None, problem
        return column.model_copy(update={"field": None}), None
    if not column.field:
        return None, f"a {column.role} column must name a catalogue field"
    try:
        ref = str(parse_field(column.field))
    except UnknownFieldError:
        return None, f"unknown catalogue field {_shown(column.field)}"
    if ref not in ALLOWED_FIELDS[entity_type]:
        return None, f"{ref} does not fit a {entity_type} table"
    role = column.role
    if role == "identifier" and ref not in IDENTIFIER_FIELDS[entity_type]:
        role = "enrichment"  # a field that identifies nothing is still worth enriching
    return column.model_copy(update={"field": ref, "prompt": None, "role": role}), None


def _check_question(prompt: str | None, entity_type: str) -> str | None:
    if not prompt:
        return "an AI column needs a prompt"
    try:
        names = placeholders(prompt)
    except InvalidPromptError as error:
        return str(error)
    allowed = AI_PLACEHOLDERS[entity_type]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        return (
            f"its prompt uses unknown placeholder {{{unknown[0]}}}; a {entity_type} prompt "
            f"can use {', '.join('{' + name + '}' for name in allowed)}"
        )
    if not names:
        return "its prompt names no identifier, so it would ask every row the same question"
    return None


# --- rows ----------------------------------------------------------------------------------


def row_columns(table: TableSpec) -> tuple[tuple[ColumnProposal, ...], list[str]]:
    """The table's identifier columns (the keys of suggested rows), or the default ones."""
    entity_type = _check_entity_type(table.entity_type)
    found = tuple(
        column
        for column in table.columns
        if column.role != "ai" and column.field in IDENTIFIER_FIELDS[entity_type]
    )
    if found:
        return found, []
    defaults = identifier_columns(entity_type)
    keys = ", ".join(column.key for column in defaults)
    return defaults, [f"the table has no identifier column: rows use {keys}"]


def row_identifiers(values: Mapping[str, Any], columns: Sequence[ColumnProposal]) -> frozenset[str]:
    """The EntityKey ids (`company:domain:acme.com`, `person:email:...`) a row's identifier
    values give: what `known_identifiers` holds for the rows a table already has."""
    by_key = {column.key: column for column in columns}
    return frozenset(_identity(_clean_row(values, by_key)[0], columns))


def check_rows(
    items: Sequence[Any],
    table: TableSpec,
    *,
    count: int,
    columns: Sequence[ColumnProposal] | None = None,
) -> tuple[list[RowProposal], list[str]]:
    """The usable rows among a model's `items` (at most `count`), and notes on what went."""
    entity_type = _check_entity_type(table.entity_type)
    columns = tuple(columns) if columns is not None else row_columns(table)[0]
    by_key = {column.key: column for column in columns}
    known = set(table.known_identifiers)
    seen: set[str] = set()
    kept: list[RowProposal] = []
    dropped: Counter[str] = Counter()
    stray_keys: Counter[str] = Counter()
    bad_values: Counter[str] = Counter()
    for position, item in enumerate(items):
        if len(kept) == count:
            dropped["over"] = len(items) - position
            break
        if isinstance(item, dict) and isinstance(item.get("values"), dict):
            item = item["values"]
        if not isinstance(item, dict):
            dropped["not an object"] += 1
            continue
        values, strays, bad = _clean_row(item, by_key)
        stray_keys.update(strays)
        bad_values.update(bad)
        identity = _identity(values, columns)
        if not _identifies(values, columns, entity_type):
            dropped["no identifier"] += 1
            continue
        forms = identity | _bare_forms(identity)
        if forms & known:
            dropped["already in the table"] += 1
            continue
        if identity & seen:
            dropped["duplicate"] += 1
            continue
        seen |= identity
        kept.append(RowProposal(values=values))
    notes = _row_notes(dropped, stray_keys, bad_values, count=count, proposed=len(items))
    return kept, notes


def _clean_row(
    item: Mapping[str, Any], by_key: Mapping[str, ColumnProposal]
) -> tuple[dict[str, str], list[str], list[str]]:
    """(identifier values as they will be stored, keys outside the columns `by_key`, keys whose
    value was unusable)."""
    values: dict[str, str] = {}
    strays: list[str] = []
    bad: list[str] = []
    for key, raw in item.items():
        column = by_key.get(key)
        if column is None:
            strays.append(str(key)[:40])
            continue
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue
        value = _identifier_value(raw, column.field) if isinstance(raw, str) else None
        if value is None:
            bad.append(key)
        else:
            values[key] = value
    return values, strays, bad


def _identifier_value(raw: str, field: str | None) -> str | None:
    """The value to store for one identifier field, or None when it is not one."""
    text = " ".join(raw.split())
    if not text or len(text) > NAME_MAX_CHARS or not text.isprintable():
        return None
    if field == "company.domain":
        return company_domain(text)
    if field == "person.email":
        return normalize_email(text)
    if field in ("person.linkedin_url", "company.linkedin_url"):
        kind = "company" if field == "company.linkedin_url" else "in"
        return text if linkedin_slug(text, kind=kind) else None
    if field in ("company.name", "person.company", "person.full_name"):
        if len(text) > MAX_NAME_CHARS or len(text.split()) > MAX_NAME_WORDS:
            return None
        normalise = normalize_person_name if field == "person.full_name" else normalize_company_name
        return text if normalise(text) else None
    return text


def _identity(values: Mapping[str, str], columns: Sequence[ColumnProposal]) -> set[str]:
    """The EntityKey ids of a row's entity: by domain, LinkedIn and email, else by name."""
    strong: set[str] = set()
    names: list[str] = []
    for column in columns:
        value = values.get(column.key)
        if value is None:
            continue
        if column.field == "company.domain":
            strong.add(f"company:domain:{value}")
        elif column.field == "person.email":
            strong.add(f"person:email:{value}")
        elif column.field == "person.linkedin_url":
            strong.add(f"person:linkedin:{linkedin_slug(value)}")
        elif column.field == "company.linkedin_url":
            strong.add(f"company:linkedin:{linkedin_slug(value, kind='company')}")
        elif column.field in ("company.name", "person.company"):
            names.append(f"company:name:{normalize_company_name(value)}")
        elif column.field == "person.full_name":
            names.append(f"person:name:{normalize_person_name(value)}")
    if strong:
        return strong
    return {"|".join(sorted(names))} if names else set()


def _bare_forms(identity: Iterable[str]) -> set[str]:
    """`acme.com` for `company:domain:acme.com`: known identifiers may be given either way."""
    return {
        key.split(":", 2)[2]
        for key in identity
        if key.count(":") >= 2 and key.split(":", 2)[1] in ("domain", "email", "linkedin")
    }


def _identifies(
    values: Mapping[str, str], columns: Sequence[ColumnProposal], entity_type: str
) -> bool:
    """Whether enrichment can find the row's entity: a company by domain, LinkedIn or name;
    a person by LinkedIn, email, or full name with their company."""
    fields = {column.field for column in columns if column.key in values}
    if entity_type == "company":
        return bool(fields & {"company.domain", "company.linkedin_url", "company.name"})
    if fields & {"person.linkedin_url", "person.email"}:
        return True
    has_company = bool(fields & {"person.company", "company.name", "company.domain"})
    return "person.full_name" in fields and has_company


def _row_notes(
    dropped: Counter[str],
    stray_keys: Counter[str],
    bad_values: Counter[str],
    *,
    count: int,
    proposed: int,
) -> list[str]:

    notes: list[str] = []
    if stray_keys:
        shown = ", ".join(_shown(key, 30) for key, _ in stray_keys.most_common(5))
        notes.append(f"values under keys outside the identifier columns dropped: {shown}")
    if bad_values:
        shown = ", ".join(f"{key} ({n})" for key, n in bad_values.most_common(5))
        notes.append(f"malformed identifier values dropped: {shown}")
    reasons = {
        "not an object": "not a JSON object",
        "no identifier": "no usable identifier (domain, LinkedIn, email, or name)",
        "already in the table": "the same entity as a row the table already has",
        "duplicate": "the same entity as an earlier suggested row",
    }
    for reason, why in reasons.items():
        if dropped[reason]:
            notes.append(f"{dropped[reason]} rows dropped: {why}")
    if dropped["over"] > 0:
        notes.append(
            f"the model proposed {proposed} rows; kept the first {count} usable (asked for {count})"
        )
    return notes
