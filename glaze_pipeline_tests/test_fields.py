import pytest

from glaze_pipeline.core.fields import UnknownFieldError, column_field, infer_field, parse_field
from glaze_pipeline.core.models import EntityType


@pytest.mark.parametrize(
    ("key", "expected"),
    [
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
        ("revenue", "company.revenue"),
        # identifiers and company-qualified keys
        ("website", "company.domain"),
        ("Company Website", "company.domain"),
        ("company_linkedin", "company.linkedin_url"),
        ("company-phone", "company.phone"),
        ("name", "person.full_name"),
        ("Job Title", "person.title"),
        ("founded_year", "company.founded_year"),
    ],
)
def test_infer_field_from_key(key: str, expected: str) -> None:
    assert str(infer_field(key)) == expected


def test_unknown_key_maps_to_nothing() -> None:
    assert infer_field("notes") is None


def test_explicit_field_wins_over_key() -> None:
    field = column_field("notes", "company.industry")
    assert field is not None and field.entity_type is EntityType.COMPANY
    assert field.name == "industry"


@pytest.mark.parametrize("text", ["company.colour", "animal.name", "industry"])
def test_parse_field_rejects_unknown(text: str) -> None:
    with pytest.raises(UnknownFieldError, match="unknown field"):
        parse_field(text)
