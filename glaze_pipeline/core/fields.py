"""The field catalogue: what can be enriched, and which field a column means.

`FIELDS` is the one table of fields: each is defined once, with its entity type, the kind of
value a provider gives for it and the column names that mean it. Everything else is read from
it: `CATALOGUE` and the field lists, key inference, the vendor record models
(`providers.json_api.RECORDS`), the fake provider's values and the mock vendors' records. Adding
a field is one entry here (and a fake value for it: `providers.fake` refuses to import without
one, so the demos and tests never meet a field they cannot fill).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from glaze_pipeline.core.errors import InputError
from glaze_pipeline.core.models import EntityType

# What a vendor's value for a field must be (see `providers.json_api`): free text, a count of
# at least 0, or a calendar year.
ValueKind = Literal["text", "count", "year"]


@dataclass(frozen=True, order=True)
class FieldRef:
    """An entity field such as `company.industry`."""

    entity_type: EntityType
    name: str

    def __str__(self) -> str:
        return f"{self.entity_type.value}.{self.name}"


@dataclass(frozen=True)
class CatalogueField:
    """One enrichable field: what it is, what its values look like, which column keys mean it."""

    entity_type: EntityType
    name: str
    value: ValueKind = "text"
    # The column names that mean this field, as words (see the rules below); none: a column is
    # this field only when given it explicitly.
    synonyms: tuple[str, ...] = ()

    @property
    def ref(self) -> FieldRef:
        return FieldRef(self.entity_type, self.name)


# --- the fields, and which column keys mean each --------------------------------------------------
#
# A key means a field only when its words ARE one of the field's `synonyms`: the same words,
# in any order ("phone_company" is "company phone"), or the same letters run together
# ("firstname", "e_mail"). Never a substring: "carrier" holds "arr", "ethnicity" holds "city",
# "subtitle" holds "title", and none of them is revenue, a location or a job title. A key that
# is not listed is not enrichable (a whole-table run leaves it alone); give it a field
# explicitly to enrich it. Each name is here because real exports (Apollo, HubSpot, Salesforce,
# LinkedIn, hand-made sheets) use it with that meaning, and no other common one.
#
# Left out on purpose, each a guess that would write the wrong thing or spend for nothing:
# - "url": a LinkedIn connections export's URL column is the person's profile, not a website;
# - "city", "country", "state", "address": narrower than the free-text location a provider
#   gives ("San Francisco, CA" is neither a city nor a country);
# - "account", "owner", "status", "notes", "headline", "home phone", "personal email": other
#   things, or not the value a provider returns for the field.
FIELDS: tuple[CatalogueField, ...] = (
    CatalogueField(
        EntityType.COMPANY,
        "name",
        synonyms=(
            "company",
            "company name",
            "organization",
            "organisation",
            "organization name",
            "organisation name",
            "org",
            "org name",
            "employer",
            "employer name",
            "account name",
            "business name",
            "current company",
        ),
    ),
    CatalogueField(
        EntityType.COMPANY,
        "domain",
        synonyms=(
            "website",
            "web site",
            "website url",
            "website domain",
            "domain",
            "domain name",
            "company domain",
            "company domain name",
            "company website",
            "company website url",
            "company url",
            "company site",
            "homepage",
            "home page",
            "company homepage",
            "site",
            "web address",
        ),
    ),
    CatalogueField(
        EntityType.COMPANY,
        "description",
        synonyms=(
            "description",
            "company description",
            "business description",
            "short description",
            "about",
            "about company",
            "company about",
            "company overview",
            "overview",
            "company summary",
        ),
    ),
    CatalogueField(
        EntityType.COMPANY,
        "industry",
        synonyms=(
            "industry",
            "industries",
            "company industry",
            "sector",
            "industry sector",
            "vertical",
        ),
    ),
    CatalogueField(
        EntityType.COMPANY,
        "employee_count",
        value="count",
        synonyms=(
            "employees",
            "employee count",
            "employees count",
            "number of employees",
            "num employees",
            "no of employees",
            "nb employees",
            "estimated num employees",
            "headcount",
            "head count",
            "company headcount",
            "company size",
            "employee size",
            "employee range",
            "staff count",
        ),
    ),
    CatalogueField(
        EntityType.COMPANY,
        "revenue",
        synonyms=(
            "revenue",
            "annual revenue",
            "company revenue",
            "estimated revenue",
            "revenue range",
            "arr",
            "annual recurring revenue",
            "turnover",
            "annual turnover",
        ),
    ),
    CatalogueField(
        EntityType.COMPANY,
        "location",
        synonyms=(
            "company location",
            "hq",
            "hq location",
            "headquarters",
            "headquarters location",
            "company headquarters",
            "company hq",
        ),
    ),
    CatalogueField(
        EntityType.COMPANY,
        "founded_year",
        value="year",
        synonyms=(
            "founded",
            "founded year",
            "year founded",
            "founding year",
            "founded in",
            "company founded",
            "year established",
        ),
    ),
    CatalogueField(
        EntityType.COMPANY,
        "linkedin_url",
        synonyms=(
            "company linkedin",
            "company linkedin url",
            "company linkedin page",
            "company linkedin profile",
            "linkedin company",
            "linkedin company url",
            "linkedin company page",
            "organization linkedin url",
        ),
    ),
    CatalogueField(
        EntityType.COMPANY,
        "phone",
        synonyms=(
            "company phone",
            "company phone number",
            "company telephone",
            "corporate phone",
            "hq phone",
            "headquarters phone",
            "main phone",
            "switchboard",
        ),
    ),
    CatalogueField(
        EntityType.PERSON,
        "full_name",
        synonyms=(
            "name",
            "full name",
            "person name",
            "contact name",
            "contact full name",
            "lead name",
            "prospect name",
            "person",
            "contact",
        ),
    ),
    CatalogueField(
        EntityType.PERSON,
        "title",
        synonyms=(
            "title",
            "job title",
            "person title",
            "contact title",
            "current title",
            "position",
            "job position",
            "current position",
            "role",
            "job role",
            "job",
            "designation",
        ),
    ),
    CatalogueField(
        EntityType.PERSON,
        "email",
        synonyms=(
            "email",
            "email address",
            "work email",
            "work email address",
            "business email",
            "contact email",
            "person email",
            "primary email",
            "email id",
        ),
    ),
    CatalogueField(
        EntityType.PERSON,
        "phone",
        synonyms=(
            "phone",
            "phone number",
            "telephone",
            "tel",
            "mobile",
            "mobile phone",
            "mobile phone number",
            "mobile number",
            "cell phone",
            "direct phone",
            "direct dial",
            "work phone",
            "work direct phone",
            "contact phone",
            "person phone",
        ),
    ),
    CatalogueField(
        EntityType.PERSON,
        "linkedin_url",
        synonyms=(
            "linkedin",
            "linkedin url",
            "linkedin profile",
            "linkedin profile url",
            "linkedin link",
            "person linkedin",
            "person linkedin url",
            "contact linkedin",
            "contact linkedin url",
            "profile url",
        ),
    ),
    CatalogueField(
        EntityType.PERSON,
        "location",
        synonyms=(
            "location",
            "person location",
            "contact location",
            "current location",
        ),
    ),
    CatalogueField(
        EntityType.PERSON,
        "bio",
        synonyms=(
            "bio",
            "biography",
            "summary",
            "about me",
            "profile summary",
            "person bio",
        ),
    ),
    # No synonyms: a "company" column is the company itself (company.name), not where a person
    # works; give a column this field explicitly to enrich it.
    CatalogueField(EntityType.PERSON, "company"),
)


def catalogue_fields(entity_type: EntityType) -> tuple[CatalogueField, ...]:
    """The fields of one entity type, in catalogue order."""
    return tuple(field for field in FIELDS if field.entity_type is entity_type)


def _unique(fields: tuple[CatalogueField, ...]) -> None:
    # A field defined twice would be read one way here and another way there: refused at import.
    refs = [str(field.ref) for field in fields]
    repeated = sorted({ref for ref in refs if refs.count(ref) > 1})
    if repeated:
        raise AssertionError(f"fields defined twice in the catalogue: {repeated}")


_unique(FIELDS)
COMPANY_FIELDS: tuple[str, ...] = tuple(f.name for f in catalogue_fields(EntityType.COMPANY))
PERSON_FIELDS: tuple[str, ...] = tuple(f.name for f in catalogue_fields(EntityType.PERSON))
CATALOGUE: dict[EntityType, frozenset[str]] = {
    EntityType.COMPANY: frozenset(COMPANY_FIELDS),
    EntityType.PERSON: frozenset(PERSON_FIELDS),
}
# `company.industry` -> the column names that mean it, for the fields that have any.
SYNONYMS: Mapping[str, tuple[str, ...]] = {
    str(field.ref): field.synonyms for field in FIELDS if field.synonyms
}


class UnknownFieldError(InputError, ValueError):
    """A field name outside the catalogue (a ValueError too, for callers that catch that)."""


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


# Parts of a person's name: no catalogue field (nothing fills half a name), but together they
# identify the person (detection joins them), as nearly every export gives them.
FIRST_NAME = "first_name"
LAST_NAME = "last_name"
NAME_PARTS: Mapping[str, tuple[str, ...]] = {
    FIRST_NAME: ("first name", "given name", "forename", "contact first name"),
    LAST_NAME: ("last name", "surname", "family name", "contact last name"),
}

# Longer keys mean nothing we know: a header is a few words (the import caps keys anyway).
KEY_MAX_CHARS = 200


def _key_words(key: str) -> tuple[str, ...]:
    """The words of a key: split on anything not a letter or digit (any script) and on
    camelCase boundaries, case-folded. Linear, no regex."""
    words: list[str] = []
    current: list[str] = []
    previous = ""
    for index, ch in enumerate(key):
        if not ch.isalnum():
            if current:
                words.append("".join(current))
                current = []
            previous = ""
            continue
        following = key[index + 1] if index + 1 < len(key) else ""
        # "jobTitle" -> job|Title; "LinkedInURL" -> Linked|In|URL; "HQLocation" -> HQ|Location
        boundary = ch.isupper() and (
            previous.islower() or previous.isdigit() or (previous.isupper() and following.islower())
        )
        if boundary and current:
            words.append("".join(current))
            current = []
        current.append(ch)
        previous = ch
    if current:
        words.append("".join(current))
    return tuple(word.casefold() for word in words)


def _index(
    table: Mapping[str, tuple[str, ...]],
) -> tuple[dict[tuple[str, ...], str], dict[str, str]]:
    """Each name by its sorted words and by its letters run together -> what it means.

    Built at import, and refuses a name that would mean two things: the lists stay exact."""
    by_words: dict[tuple[str, ...], str] = {}
    by_letters: dict[str, str] = {}
    for target, names in table.items():
        for name in names:
            words = tuple(name.split())
            for other in (
                by_words.setdefault(tuple(sorted(words)), target),
                by_letters.setdefault("".join(words), target),
            ):
                if other != target:
                    raise AssertionError(f"{name!r} names both {other} and {target}")
    return by_words, by_letters


_BY_WORDS, _BY_LETTERS = _index({**SYNONYMS, **NAME_PARTS})


def _meaning(column_key: str) -> str | None:
    # Measured before the cache, which would otherwise keep a megabyte key alive.
    return None if len(column_key) > KEY_MAX_CHARS else _meaning_of_short_key(column_key)


@lru_cache(maxsize=4096)
def _meaning_of_short_key(column_key: str) -> str | None:
    words = _key_words(column_key)
    if not words:
        return None
    return _BY_WORDS.get(tuple(sorted(words))) or _BY_LETTERS.get("".join(words))


def infer_field(column_key: str) -> FieldRef | None:
    """The field a column means, from its key; None when the key is not one of a field's
    names (see SYNONYMS): such a column is not enrichable unless given a field explicitly."""
    meaning = _meaning(column_key)
    if meaning is None or meaning in NAME_PARTS:
        return None
    return parse_field(meaning)


def infer_name_part(column_key: str) -> str | None:
    """FIRST_NAME or LAST_NAME when the key names that part of a person's name, else None."""
    meaning = _meaning(column_key)
    return meaning if meaning in NAME_PARTS else None


def column_field(column_key: str, explicit_field: str | None) -> FieldRef | None:
    """A column's field: the explicit one when set, else inferred from the key."""
    if explicit_field:
        return parse_field(explicit_field)
    return infer_field(column_key)
