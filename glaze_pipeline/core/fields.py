"""The field catalogue: what can be enriched, and which field a column means."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from glaze_pipeline.core.errors import InputError
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


# --- which field a column key means -------------------------------------------------------
#
# A key means a field only when its words ARE one of the field's names below: the same words,
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
SYNONYMS: Mapping[str, tuple[str, ...]] = {
    "company.name": (
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
    "company.domain": (
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
    "company.description": (
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
    "company.industry": (
        "industry",
        "industries",
        "company industry",
        "sector",
        "industry sector",
        "vertical",
    ),
    "company.employee_count": (
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
    "company.revenue": (
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
    "company.location": (
        "company location",
        "hq",
        "hq location",
        "headquarters",
        "headquarters location",
        "company headquarters",
        "company hq",
    ),
    "company.founded_year": (
        "founded",
        "founded year",
        "year founded",
        "founding year",
        "founded in",
        "company founded",
        "year established",
    ),
    "company.linkedin_url": (
        "company linkedin",
        "company linkedin url",
        "company linkedin page",
        "company linkedin profile",
        "linkedin company",
        "linkedin company url",
        "linkedin company page",
        "organization linkedin url",
    ),
    "company.phone": (
        "company phone",
        "company phone number",
        "company telephone",
        "corporate phone",
        "hq phone",
        "headquarters phone",
        "main phone",
        "switchboard",
    ),
    "person.full_name": (
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
    "person.title": (
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
    "person.email": (
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
    "person.phone": (
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
    "person.linkedin_url": (
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
    "person.location": (
        "location",
        "person location",
        "contact location",
        "current location",
    ),
    "person.bio": (
        "bio",
        "biography",
        "summary",
        "about me",
        "profile summary",
        "person bio",
    ),
}

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


for _target in SYNONYMS:
    parse_field(_target)  # a typo in the lists fails at import, not on a user's column
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
