"""Field inference: a column key means a field only when its words are one of the field's
names, never because a name hides inside it (issue 9, item 3)."""

import time

import pytest

from glaze_pipeline.core import engine
from glaze_pipeline.core.errors import InputError, InvalidSelectionError
from glaze_pipeline.core.fields import (
    CATALOGUE,
    COMPANY_FIELDS,
    FIELDS,
    FIRST_NAME,
    KEY_MAX_CHARS,
    LAST_NAME,
    PERSON_FIELDS,
    SYNONYMS,
    UnknownFieldError,
    catalogue_fields,
    column_field,
    infer_field,
    infer_name_part,
    parse_field,
)
from glaze_pipeline.core.importer import column_key
from glaze_pipeline.core.models import EntityType, Selection
from glaze_pipeline.core.store import ColumnDef, Store

# (CSV header as exported, the field it means). Each header goes through the importer's own
# slug first, as a real import does ("E-mail" -> "e_mail", "# Employees" -> "employees").
REAL_HEADERS: list[tuple[str, str]] = [
    # seed 001's column keys
    ("email", "person.email"),
    ("company", "company.name"),
    ("title", "person.title"),
    ("bio", "person.bio"),
    ("phone", "person.phone"),
    ("linkedin", "person.linkedin_url"),
    ("location", "person.location"),
    ("industry", "company.industry"),
    ("employee_count", "company.employee_count"),
    ("employees", "company.employee_count"),
    ("revenue", "company.revenue"),
    ("website", "company.domain"),
    ("name", "person.full_name"),
    # Apollo
    ("Title", "person.title"),
    ("Company", "company.name"),
    ("Email", "person.email"),
    ("Mobile Phone", "person.phone"),
    ("Work Direct Phone", "person.phone"),
    ("Corporate Phone", "company.phone"),
    ("# Employees", "company.employee_count"),
    ("Industry", "company.industry"),
    ("Person Linkedin Url", "person.linkedin_url"),
    ("Website", "company.domain"),
    ("Company Linkedin Url", "company.linkedin_url"),
    ("Company Phone", "company.phone"),
    ("Annual Revenue", "company.revenue"),
    # HubSpot
    ("Company Name", "company.name"),
    ("Job Title", "person.title"),
    ("Phone Number", "person.phone"),
    ("Mobile Phone Number", "person.phone"),
    ("Website URL", "company.domain"),
    ("Company Domain Name", "company.domain"),
    ("Number of Employees", "company.employee_count"),
    ("LinkedIn Company Page", "company.linkedin_url"),
    ("Year Founded", "company.founded_year"),
    ("Description", "company.description"),
    # Salesforce, Pipedrive, hand-made sheets
    ("Account Name", "company.name"),
    ("Organization", "company.name"),
    ("Organisation Name", "company.name"),
    ("Employer", "company.name"),
    ("Work Email", "person.email"),
    ("E-mail", "person.email"),
    ("E-Mail Address", "person.email"),
    ("Email Address", "person.email"),
    ("LinkedIn URL", "person.linkedin_url"),
    ("LinkedIn Profile", "person.linkedin_url"),
    ("Company Website", "company.domain"),
    ("Domain", "company.domain"),
    ("Homepage", "company.domain"),
    ("Web Site", "company.domain"),
    ("HQ Location", "company.location"),
    ("Headquarters", "company.location"),
    ("Founded", "company.founded_year"),
    ("Headcount", "company.employee_count"),
    ("Company Size", "company.employee_count"),
    ("ARR", "company.revenue"),
    ("Full Name", "person.full_name"),
    ("Contact Name", "person.full_name"),
    ("Position", "person.title"),
    ("Role", "person.title"),
    ("Summary", "person.bio"),
    ("Sector", "company.industry"),
    # word order and spelling: the same words in any order, or run together
    ("phone_company", "company.phone"),
    ("company-phone", "company.phone"),
    ("linkedin_company", "company.linkedin_url"),
    ("founded_year", "company.founded_year"),
    ("FullName", "person.full_name"),
    ("jobTitle", "person.title"),
    ("JobTitle", "person.title"),
    ("emailAddress", "person.email"),
    ("LinkedInURL", "person.linkedin_url"),
    ("companyname", "company.name"),
    ("numberofemployees", "company.employee_count"),
    ("  EMAIL  ", "person.email"),
]

# Keys that hold a field's name but mean something else: each must map to nothing (the
# column is not enrichable, so no money is spent on it and nothing is written into it).
NEAR_MISSES: list[str] = [
    # the ones the issue saw
    "carrier",  # holds "arr"
    "arrival_date",  # holds "arr"
    "ethnicity",  # holds "city"
    "subtitle",  # holds "title"
    # words that qualify a field's word into something else
    "jobs_count",
    "summary_notes",
    "email_status",
    "Email Opt Out",
    "Email Sent",
    "emails_sent",
    "phone_verified",
    "Home Phone",
    "Personal Email",
    "Contact Owner",
    "Account Owner",
    "Lead Status",
    "revenue_growth",
    "arr_growth",
    "Total Funding",
    "headcount_growth",
    "domain_authority",
    "website_visits",
    "founded_by",
    "Company Name for Emails",
    "parent_company",
    "company_type",
    "company_count",
    "industry_code",
    "title_ix",
    "employee_id",
    "linkedin_connections",
    "Facebook Url",
    "Twitter Url",
    "SEO Description",
    "Record ID",
    "Connected On",
    "email_2",
    # substrings of names, in one word
    "nickname",
    "username",
    "rename",
    "biology",
    "titleist",
    "webinar",
    "arrow",
    "companies",
    # deliberately not inferred (see fields.SYNONYMS): a guess would write the wrong thing
    "URL",  # a LinkedIn connections export's URL is the person's profile
    "City",  # narrower than the free-text location a provider gives
    "Country",
    "State",
    "Company City",
    "Company Address",
    "Headline",
    "notes",
    # unicode keys (the importer keeps letters of any script), blanks, symbols
    "名前",
    "電話",
    "会社名",
    "Straße",
    "",
    "___",
    "#",
]


@pytest.mark.parametrize(("header", "expected"), REAL_HEADERS)
def test_real_export_headers_map_to_their_field(header: str, expected: str) -> None:
    assert str(infer_field(header)) == expected  # the key as given (API, seed)
    key = column_key(header)  # and as a CSV import slugs the header
    assert str(infer_field(key)) == expected, f"{header!r} imported as key {key!r}"


@pytest.mark.parametrize("key", NEAR_MISSES)
def test_near_misses_map_to_nothing(key: str) -> None:
    assert infer_field(key) is None
    assert infer_field(column_key(key)) is None


@pytest.mark.parametrize(
    ("header", "part"),
    [
        ("First Name", FIRST_NAME),
        ("first_name", FIRST_NAME),
        ("FirstName", FIRST_NAME),
        ("firstname", FIRST_NAME),
        ("Given Name", FIRST_NAME),
        ("Last Name", LAST_NAME),
        ("lastName", LAST_NAME),
        ("Surname", LAST_NAME),
        ("Family Name", LAST_NAME),
    ],
)
def test_first_and_last_name_are_name_parts_not_fields(header: str, part: str) -> None:
    """A first name is not the person's full name: never enriched as one (a whole-table run
    would write "Ada Lovelace" into it), but detection joins the two parts to identify."""
    assert infer_field(header) is None
    assert infer_name_part(header) == part
    assert infer_name_part(column_key(header)) == part


def test_no_field_name_is_claimed_twice_and_every_target_is_in_the_catalogue() -> None:
    seen: dict[tuple[str, ...], str] = {}
    for target, names in SYNONYMS.items():
        parse_field(target)
        for name in names:
            words = tuple(sorted(name.split()))
            assert seen.setdefault(words, target) == target, name
            assert infer_field(name) == parse_field(target), name


def test_long_keys_are_bounded_and_mean_nothing() -> None:
    started = time.perf_counter()
    for key in ("email_" * 200_000, "a" * 1_000_000, "名" * 1_000_000, "aB" * 500_000):
        assert infer_field(key) is None
    elapsed = time.perf_counter() - started
    print(f"4 keys of ~1 MB inferred in {elapsed * 1000:.2f} ms")
    assert elapsed < 0.5
    assert infer_field("email".ljust(KEY_MAX_CHARS)) == parse_field("person.email")


def test_explicit_field_wins_over_key() -> None:
    field = column_field("notes", "company.industry")
    assert field is not None and field.entity_type is EntityType.COMPANY
    assert field.name == "industry"
    assert column_field("carrier", "company.revenue") == parse_field("company.revenue")


@pytest.mark.parametrize("text", ["company.colour", "animal.name", "industry", ""])
def test_parse_field_rejects_unknown(text: str) -> None:
    with pytest.raises(UnknownFieldError, match="unknown field") as raised:
        parse_field(text)
    assert isinstance(raised.value, InputError)  # the CLI prints it as one line, exit 2


def test_a_whole_table_run_leaves_unknown_columns_alone(store: Store) -> None:
    """Before: `carrier` was company.revenue (it holds "arr"), and a whole-table run bought
    revenue and wrote `$20M` into it; `ethnicity` was a location, `subtitle` a job title.
    Now a whole-table run fills only columns that name a field, and asking for one that
    names none is refused before anything is bought."""
    keys = ("company", "website", "carrier", "arrival_date", "ethnicity", "subtitle", "industry")
    table = store.create_table("Shipments", [ColumnDef(key) for key in keys])
    store.insert_rows(table.id, [{"company": "Acme", "website": "acme.com"}])
    target = engine.resolve_target(store, table.id, Selection(whole_table=True))
    assert {c.key for c in target.columns} <= {"company", "website", "industry"}
    assert "industry" in {c.key for c in target.columns}
    detection = engine.detect_entities(store, target)
    wanted = {name for entity in detection.entities for name in entity.fields}
    assert "revenue" not in wanted and "location" not in wanted and "title" not in wanted
    for key in ("carrier", "arrival_date", "ethnicity", "subtitle"):
        with pytest.raises(InvalidSelectionError, match="map to no enrichment field"):
            engine.resolve_target(
                store, table.id, Selection(column_ids=[table.column_by_key(key).id])
            )


def test_the_field_lists_are_read_from_the_one_table() -> None:
    assert COMPANY_FIELDS == (
        "name",
        "domain",
        "description",
        "industry",
        "employee_count",
        "revenue",
        "location",
        "founded_year",
        "linkedin_url",
        "phone",
    )
    assert PERSON_FIELDS == (
        "full_name",
        "title",
        "email",
        "phone",
        "linkedin_url",
        "location",
        "bio",
        "company",
    )
    for entity_type in EntityType:
        assert CATALOGUE[entity_type] == {f.name for f in catalogue_fields(entity_type)}
    assert len({field.ref for field in FIELDS}) == len(FIELDS)  # each field defined once
    # Inference reads each field's own synonyms; a field without any is never inferred.
    assert {str(f.ref): f.synonyms for f in FIELDS if f.synonyms} == SYNONYMS
    assert "person.company" not in SYNONYMS
    assert infer_field("company") == parse_field("company.name")
    values = {str(field.ref): field.value for field in FIELDS if field.value != "text"}
    assert values == {"company.employee_count": "count", "company.founded_year": "year"}
