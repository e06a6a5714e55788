"""Entity detection: which company or person each requested cell is about (pure functions).

A company is keyed by its registrable domain (from a website column, else a work email), else
by its normalised name; a person by LinkedIn slug, else email, else name + company. Name keys
are weaker and carry a lower `strength`, which caps the confidence of values found through them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

from glaze_pipeline.core.fields import FieldRef
from glaze_pipeline.core.models import EntityKey, EntityType

NAME_KEY_STRENGTH = 0.7
NO_IDENTIFIER = "no identifier"

# Registrable domains of free and consumer mail services: an address there says nothing
# about the employer.
FREE_MAIL_DOMAINS = frozenset(
    {
        "gmail.com",
        "googlemail.com",
        "yahoo.com",
        "yahoo.co.uk",
        "yahoo.fr",
        "ymail.com",
        "hotmail.com",
        "hotmail.co.uk",
        "hotmail.fr",
        "outlook.com",
        "live.com",
        "msn.com",
        "aol.com",
        "icloud.com",
        "me.com",
        "mac.com",
        "proton.me",
        "protonmail.com",
        "pm.me",
        "gmx.com",
        "gmx.de",
        "gmx.net",
        "web.de",
        "mail.com",
        "mail.ru",
        "yandex.ru",
        "yandex.com",
        "zoho.com",
        "qq.com",
        "163.com",
        "126.com",
        "fastmail.com",
        "hey.com",
        "tutanota.com",
        "orange.fr",
        "free.fr",
        "libero.it",
    }
)

_LEGAL_SUFFIXES = frozenset(
    {
        "inc",
        "incorporated",
        "llc",
        "l.l.c",
        "ltd",
        "limited",
        "corp",
        "corporation",
        "co",
        "company",
        "plc",
        "gmbh",
        "ag",
        "sa",
        "sas",
        "sarl",
        "bv",
        "nv",
        "srl",
        "spa",
        "oy",
        "ab",
        "as",
        "aps",
        "pty",
        "pte",
        "kk",
        "lp",
        "llp",
    }
)
_EMAIL_RE = re.compile(r"^[^@\s]+@([^@\s]+\.[^@\s]+)$")
_LINKEDIN_RE = re.compile(r"linkedin\.com/(in|pub|company)/([^/?#\s]+)", re.IGNORECASE)
_BARE_SLUG_RE = re.compile(r"^[\w-]{2,100}$", re.UNICODE)


@lru_cache(maxsize=1)
def _extractor() -> Any:
    # The bundled Public Suffix List snapshot only: no fetch, no cache directory, at run time.
    # Imported here: tldextract pulls in `requests` (~0.15 s), which launching a run need not pay.
    import tldextract

    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return unicodedata.normalize("NFKC", str(value)).strip()


def normalize_domain(value: Any) -> str | None:
    """The registrable domain of a URL, host or email-ish string, lower-cased; else None.

    `https://WWW.Shop.Acme.co.uk:8080/about?x=1` -> `acme.co.uk`. IPs, bare words and
    hosts without a public suffix give None.
    """
    text = _text(value).lower()
    return _registrable_domain(text) if text else None


@lru_cache(maxsize=1 << 16)
def _registrable_domain(text: str) -> str | None:
    # Cached: a table repeats its companies' websites, and both detection and the apply stage
    # derive the same keys (a job of 1M rows parses each distinct website once, not twice a row).
    if "@" in text and "/" not in text:
        text = text.rsplit("@", 1)[1]
    if "://" not in text:
        text = "//" + text.lstrip("/")
    try:
        host = urlsplit(text).hostname or ""
    except ValueError:
        return None
    host = host.strip(".")
    if not host or " " in host:
        return None
    extracted = _extractor()(host)
    if not extracted.suffix or not extracted.domain or extracted.ipv4:
        return None
    return str(extracted.top_domain_under_public_suffix).lower() or None


def normalize_email(value: Any) -> str | None:
    text = _text(value).lower()
    if text.startswith("mailto:"):
        text = text[len("mailto:") :]
    return text if _EMAIL_RE.match(text) else None


def work_email_domain(value: Any) -> str | None:
    """The employer's domain from a work email; None for free mail or a malformed address."""
    email = normalize_email(value)
    if email is None:
        return None
    domain = normalize_domain(email.rsplit("@", 1)[1])
    if domain is None or domain in FREE_MAIL_DOMAINS:
        return None
    return domain


def _fold(text: str) -> list[str]:
    # Accents folded, case folded, punctuation dropped: "Société Générale, S.A." and
    # "societe generale sa" meet on the same words.
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()
    stripped = stripped.replace("&", " and ")
    return re.sub(r"[^\w]+", " ", stripped.replace(".", "")).split()


def normalize_company_name(value: Any) -> str | None:
    words = _fold(_text(value))
    while len(words) > 1 and words[-1] in _LEGAL_SUFFIXES:
        words.pop()
    if words and words[0] == "the" and len(words) > 1:
        words = words[1:]
    return " ".join(words) or None


def normalize_person_name(value: Any) -> str | None:
    return " ".join(_fold(_text(value))) or None


def linkedin_slug(value: Any, *, kind: str = "in") -> str | None:
    """The profile slug of a LinkedIn URL (`/in/<slug>`, or `/company/<slug>` with kind)."""
    text = _text(value)
    if not text:
        return None
    match = _LINKEDIN_RE.search(text)
    if match:
        found_kind = "company" if match.group(1).lower() == "company" else "in"
        if found_kind != kind:
            return None
        return unquote(match.group(2)).strip().lower() or None
    if "/" not in text and "." not in text and _BARE_SLUG_RE.match(text):
        return text.lower()
    return None


@dataclass(frozen=True)
class ColumnSpec:
    """A table column as detection sees it: its key in row data and the field it means."""

    id: str
    key: str
    field: FieldRef | None


@dataclass(frozen=True)
class IdentifierColumns:
    """The row-data keys that identify entities, found from the table's column fields."""

    websites: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    company_names: tuple[str, ...] = ()
    person_linkedins: tuple[str, ...] = ()
    person_names: tuple[str, ...] = ()

    @classmethod
    def from_columns(cls, columns: Iterable[ColumnSpec]) -> IdentifierColumns:
        by_field: dict[str, list[str]] = {}
        for column in columns:
            if column.field is not None:
                by_field.setdefault(str(column.field), []).append(column.key)
        return cls(
            websites=tuple(by_field.get("company.domain", ())),
            emails=tuple(by_field.get("person.email", ())),
            company_names=tuple(by_field.get("company.name", ()))
            + tuple(by_field.get("person.company", ())),
            person_linkedins=tuple(by_field.get("person.linkedin_url", ())),
            person_names=tuple(by_field.get("person.full_name", ())),
        )


def _first(data: Mapping[str, Any], keys: Iterable[str], parse: Any) -> Any:
    for key in keys:
        parsed = parse(data.get(key))
        if parsed:
            return parsed
    return None


@dataclass(frozen=True)
class RowEntities:
    company: EntityKey | None
    person: EntityKey | None

    def for_type(self, entity_type: EntityType) -> EntityKey | None:
        return self.company if entity_type is EntityType.COMPANY else self.person


def identify_row(data: Mapping[str, Any], ids: IdentifierColumns) -> RowEntities:
    """The company and the person a row is about, from its identifier columns."""
    company: EntityKey | None = None
    domain = _first(data, ids.websites, normalize_domain) or _first(
        data, ids.emails, work_email_domain
    )
    if domain:
        company = EntityKey(EntityType.COMPANY, "domain", domain)
    else:
        name = _first(data, ids.company_names, normalize_company_name)
        if name:
            company = EntityKey(EntityType.COMPANY, "name", name, NAME_KEY_STRENGTH)

    person: EntityKey | None = None
    slug = _first(data, ids.person_linkedins, linkedin_slug)
    email = _first(data, ids.emails, normalize_email)
    if slug:
        person = EntityKey(EntityType.PERSON, "linkedin", slug)
    elif email:
        person = EntityKey(EntityType.PERSON, "email", email)
    else:
        full_name = _first(data, ids.person_names, normalize_person_name)
        if full_name and company is not None:
            person = EntityKey(
                EntityType.PERSON,
                "name_company",
                f"{full_name}|{company.value}",
                NAME_KEY_STRENGTH,
            )
    return RowEntities(company, person)


@dataclass(frozen=True)
class CellTarget:
    """One requested cell and the entity it is about (None: no usable identifier)."""

    row_id: str
    column: ColumnSpec
    entity: EntityKey | None


def targets_for_row(
    row_id: str,
    data: Mapping[str, Any],
    columns: Sequence[ColumnSpec],
    ids: IdentifierColumns,
) -> list[CellTarget]:
    """Map each requested column of one row to the entity its field belongs to."""
    if not columns:  # e.g. a whole-table job on a row whose cells are all filled
        return []
    entities = identify_row(data, ids)
    targets = []
    for column in columns:
        if column.field is None:  # validated away before a job starts
            raise ValueError(f"column {column.key!r} maps to no field")
        targets.append(CellTarget(row_id, column, entities.for_type(column.field.entity_type)))
    return targets


@dataclass
class EntityIndex:
    """Accumulates the unique entities of a job, page by page, with the fields they need."""

    fields: dict[EntityKey, set[str]] = field(default_factory=dict)
    cells_total: int = 0
    cells_without_identifier: int = 0
    rows_read: int = 0

    def add(self, targets: Iterable[CellTarget]) -> None:
        for target in targets:
            self.cells_total += 1
            if target.entity is None:
                self.cells_without_identifier += 1
                continue
            assert target.column.field is not None
            self.fields.setdefault(target.entity, set()).add(target.column.field.name)

    def __len__(self) -> int:
        return len(self.fields)
