import pytest

from glaze_pipeline.core.detection import (
    NAME_KEY_STRENGTH,
    ColumnSpec,
    EntityIndex,
    IdentifierColumns,
    identify_row,
    linkedin_slug,
    normalize_company_name,
    normalize_domain,
    targets_for_row,
    work_email_domain,
)
from glaze_pipeline.core.fields import infer_field
from glaze_pipeline.core.models import EntityKey, EntityType


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://www.Acme.com/about?x=1", "acme.com"),
        ("HTTP://Kernel.org:443/", "kernel.org"),
        ("www.shop.example.co.uk", "example.co.uk"),
        ("  acme.com  ", "acme.com"),
        ("acme.com/path#frag", "acme.com"),
        ("//cdn.acme.io", "acme.io"),
        ("user:pw@acme.com:8080", "acme.com"),
        ("sales@acme.com", "acme.com"),
        ("bücher.de", "bücher.de"),
        ("\uff21\uff23\uff2d\uff25\uff0e\uff23\uff2f\uff2d", "acme.com"),  # full-width ACME.COM
    ],
)
def test_normalize_domain(value: str, expected: str) -> None:
    assert normalize_domain(value) == expected


@pytest.mark.parametrize(
    "value", ["", None, "   ", "localhost", "192.168.1.1", "acme", "not a url"]
)
def test_normalize_domain_rejects_non_domains(value: object) -> None:
    assert normalize_domain(value) is None


def test_free_mail_is_not_a_work_domain() -> None:
    assert work_email_domain("grace.hopper@gmail.com") is None
    assert work_email_domain("someone@yahoo.co.uk") is None
    assert work_email_domain("Ada@Analytical.IO") == "analytical.io"
    assert work_email_domain("not-an-email") is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Société Générale S.A.", "societe generale"),
        ("Analytical Engines Ltd", "Analytical Engines"),
        ("The Acme Corporation", "acme"),
        ("Procter & Gamble Co.", "procter and gamble"),
    ],
)
def test_company_names_meet(a: str, b: str) -> None:
    assert normalize_company_name(a) == normalize_company_name(b)


def test_linkedin_slug() -> None:
    assert linkedin_slug("https://www.linkedin.com/in/Ada-Lovelace/?trk=x") == "ada-lovelace"
    assert linkedin_slug("linkedin.com/in/jos%C3%A9") == "josé"
    assert linkedin_slug("https://linkedin.com/company/acme") is None
    assert linkedin_slug("https://linkedin.com/company/acme", kind="company") == "acme"
    assert linkedin_slug("ada-lovelace") == "ada-lovelace"
    assert linkedin_slug("https://example.com/in/x") is None


def _columns(*keys: str) -> list[ColumnSpec]:
    return [ColumnSpec(f"col_{key}", key, infer_field(key)) for key in keys]


IDS = IdentifierColumns.from_columns(_columns("name", "email", "company", "website", "linkedin"))


def test_company_key_priority_domain_then_email_then_name() -> None:
    row = {"website": "https://acme.com", "email": "x@other.com", "company": "Acme"}
    assert identify_row(row, IDS).company == EntityKey(EntityType.COMPANY, "domain", "acme.com")
    row = {"website": "", "email": "x@other.com", "company": "Acme"}
    assert identify_row(row, IDS).company == EntityKey(EntityType.COMPANY, "domain", "other.com")
    row = {"email": "x@gmail.com", "company": "Acme Inc."}
    company = identify_row(row, IDS).company
    assert company == EntityKey(EntityType.COMPANY, "name", "acme", NAME_KEY_STRENGTH)


def test_person_key_priority_linkedin_then_email_then_name_and_company() -> None:
    row = {"linkedin": "linkedin.com/in/ada", "email": "ada@a.io", "name": "Ada"}
    assert identify_row(row, IDS).person == EntityKey(EntityType.PERSON, "linkedin", "ada")
    row = {"email": "Ada@A.io", "name": "Ada"}
    assert identify_row(row, IDS).person == EntityKey(EntityType.PERSON, "email", "ada@a.io")
    row = {"name": "José Ñúñez", "company": "Société Générale"}
    person = identify_row(row, IDS).person
    assert person is not None and person.kind == "name_company"
    assert person.value == "jose nunez|societe generale"
    assert identify_row({"name": "Katherine Johnson"}, IDS).person is None


def test_dedupe_and_no_identifier() -> None:
    targets = _columns("industry", "title")
    index = EntityIndex()
    rows = [
        {"website": "https://www.acme.com/", "email": "a@acme.com"},
        {"website": "ACME.com", "email": "b@acme.com"},
        {"website": "", "email": "c@acme.com"},
        {"website": "", "email": "", "name": "Nobody"},
    ]
    for n, row in enumerate(rows):
        index.add(targets_for_row(f"r{n}", row, targets, IDS))
    acme = EntityKey(EntityType.COMPANY, "domain", "acme.com")
    assert index.cells_total == 8
    companies = [k for k in index.fields if k.type is EntityType.COMPANY]
    assert companies == [acme]  # three rows, one company
    assert index.fields[acme] == {"industry"}
    assert len([k for k in index.fields if k.type is EntityType.PERSON]) == 3
    assert index.cells_without_identifier == 2  # the last row's two cells
