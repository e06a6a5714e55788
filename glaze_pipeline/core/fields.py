"""The field catalogue: what can be enriched, and which field a column means."""

from __future__ import annotations

import re
from dataclasses import dataclass

from glaze_pipeline.core.models import EntityType

COMPANY_FIELDS: tuple[str, ...] = (
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
PERSON_FIELDS: tuple[str, ...] = (
    "full_name",
    "title",
    "email",
    "phone",
    "linkedin_url",
    "location",
    "bio",
    "company",
)
CATALOGUE: dict[EntityType, frozenset[str]] = {
    EntityType.COMPANY: frozenset(COMPANY_FIELDS),
    EntityType.PERSON: frozenset(PERSON_FIELDS),
}


@dataclass(frozen=True, order=True)
class FieldRef:
    """An entity field such as `company.industry`."""

    entity_type: EntityType
    name: str

    def __str__(self) -> str:
        return f"{self.entity_type.value}.{self.name}"


class UnknownFieldError(ValueError):
    pass


def parse_field(text: str) -> FieldRef:
    """Parse `company.industry` into a FieldRef, rejecting anything not in the catalogue."""
    entity, _, name = text.strip().partition(".")
    try:
        entity_type = EntityType(entity)
    except ValueError:
        raise UnknownFieldError(
            f"unknown field {text!r}: the entity must be 'company' or 'person'"
        ) from None
    if name not in CATALOGUE[entity_type]:
        known = ", ".join(sorted(CATALOGUE[entity_type]))
        raise UnknownFieldError(f"unknown field {text!r}: {entity} fields are {known}")
    return FieldRef(entity_type, name)


# Ordered: the first rule whose pattern matches the column key wins. Company-qualified keys
# come before the bare person ones ("company_phone" is the company's phone). Seed 001's keys
# (email, company, title, bio, phone, linkedin, location, industry, employee, revenue) all map.
_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"company_?(linkedin)", "company.linkedin_url"),
    (r"company_?(phone)", "company.phone"),
    (r"company_?(location|hq|headquarters)", "company.location"),
    (r"company_?(description|about)", "company.description"),
    (r"company_?(domain|website|url|site)", "company.domain"),
    (r"^(website|domain|url|site|homepage|company_?website)$", "company.domain"),
    (r"industry|sector", "company.industry"),
    (r"employee|headcount|company_?size", "company.employee_count"),
    (r"revenue|arr", "company.revenue"),
    (r"founded|year_?founded", "company.founded_year"),
    (r"description", "company.description"),
    (r"company|organi[sz]ation|employer", "company.name"),
    (r"email", "person.email"),
    (r"title|job|role|position", "person.title"),
    (r"bio|summary", "person.bio"),
    (r"phone|mobile", "person.phone"),
    (r"linkedin", "person.linkedin_url"),
    (r"location|city|country", "person.location"),
    (r"^(full_?name|name|person|contact|person_?name|contact_?name)$", "person.full_name"),
)


def infer_field(column_key: str) -> FieldRef | None:
    """The field a column means, from its key; None when the key says nothing we know."""
    key = column_key.strip().lower().replace("-", "_").replace(" ", "_")
    for pattern, field in _KEY_RULES:
        if re.search(pattern, key):
            return parse_field(field)
    return None


def column_field(column_key: str, explicit_field: str | None) -> FieldRef | None:
    """A column's field: the explicit one when set, else inferred from the key."""
    if explicit_field:
        return parse_field(explicit_field)
    return infer_field(column_key)
