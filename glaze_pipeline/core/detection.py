"""Entity detection: which company or person each requested cell is about (pure functions).

A company is keyed by its registrable domain (from a website column, else a work email), else
by its normalised name, else by its LinkedIn page; a person by LinkedIn slug, else email, else
name + company. Name keys are weaker and carry a lower `strength`, which caps the confidence of
values found through them.

Every parser here is bounded and linear: a cell longer than any identifier of its kind is not
an identifier (None) and is never parsed, and no regular expression can backtrack (the one left
is a single anchored character class). A 1 MB cell costs microseconds, not minutes.

Real exports, not tidy ones: a website column holding a LinkedIn or Facebook page is not the
company's domain (a LinkedIn company page is kept as the company's LinkedIn key); domains
compare in one form whatever script they are written in (`straße.de` is `xn--strae-oqa.de`,
and is not `strasse.de`); placeholders such as `N/A` identify nothing.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote, urlsplit

import idna

from glaze_pipeline.core.fields import FIRST_NAME, LAST_NAME, FieldRef, infer_name_part
from glaze_pipeline.core.models import EntityKey, EntityType

NAME_KEY_STRENGTH = 0.7
NO_IDENTIFIER = "no identifier"

# The longest cell each kind of identifier can come from. Longer is not an identifier: it is
# refused before any parsing, so a pasted document in an email column costs nothing.
EMAIL_MAX_CHARS = 320  # RFC 5321: 64 for the mailbox, 255 for the domain, and the "@"
EMAIL_CELL_MAX_CHARS = 512  # room for a display name: `Ada Lovelace <ada@acme.com>`
EMAIL_LOCAL_MAX_CHARS = 64
URL_MAX_CHARS = 2048  # what browsers and most servers accept
HOST_MAX_CHARS = 253  # DNS
LABEL_MAX_CHARS = 63  # DNS
NAME_MAX_CHARS = 300  # company and person names
SLUG_MAX_CHARS = 100  # LinkedIn's limit for a custom profile URL
BARE_SLUG_MIN_CHARS = 3  # a bare word shorter than LinkedIn's minimum is a placeholder

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
        "rocketmail.com",
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
        "t-online.de",
        "mail.com",
        "mail.ru",
        "bk.ru",
        "list.ru",
        "inbox.ru",
        "rambler.ru",
        "yandex.ru",
        "yandex.com",
        "zoho.com",
        "qq.com",
        "163.com",
        "126.com",
        "yeah.net",
        "sina.com",
        "naver.com",
        "hanmail.net",
        "daum.net",
        "fastmail.com",
        "hey.com",
        "tutanota.com",
        "orange.fr",
        "free.fr",
        "sfr.fr",
        "laposte.net",
        "wanadoo.fr",
        "libero.it",
        "virgilio.it",
        "seznam.cz",
        "wp.pl",
        "o2.pl",
        "ukr.net",
        "rediffmail.com",
        "comcast.net",
        "verizon.net",
        "att.net",
        "sbcglobal.net",
        "btinternet.com",
        "sky.com",
        "bigpond.com",
        "shaw.ca",
        "rogers.com",
    }
)
# Free mail services with a site per country (yahoo.com.au, hotmail.de, outlook.es, ...),
# matched on the registrable domain's own label.
FREE_MAIL_NAMES = frozenset(
    {"gmail", "googlemail", "yahoo", "ymail", "hotmail", "outlook", "live", "aol", "gmx", "yandex"}
)

# Social networks, directories, link shorteners and hosts of other people's pages: a URL there
# is a profile or a listing ABOUT a company, not the company's own site, so its domain is not
# the company's (`linkedin.com/company/northwind` is Northwind, but `linkedin.com` is not).
# Only their bare homepage (`linkedin.com`, `https://www.yelp.com/`) is their own company's.
PROFILE_DOMAINS = frozenset(
    {
        "linkedin.com",
        "lnkd.in",
        "facebook.com",
        "fb.com",
        "fb.me",
        "twitter.com",
        "x.com",
        "t.co",
        "instagram.com",
        "threads.net",
        "tiktok.com",
        "youtube.com",
        "youtu.be",
        "pinterest.com",
        "reddit.com",
        "xing.com",
        "crunchbase.com",
        "angel.co",
        "wellfound.com",
        "producthunt.com",
        "github.com",
        "gitlab.com",
        "bitbucket.org",
        "medium.com",
        "substack.com",
        "wordpress.com",
        "tumblr.com",
        "squarespace.com",
        "linktr.ee",
        "about.me",
        "google.com",
        "goo.gl",
        "g.page",
        "g.co",
        "yelp.com",
        "tripadvisor.com",
        "trustpilot.com",
        "glassdoor.com",
        "indeed.com",
        "kununu.com",
        "g2.com",
        "capterra.com",
        "zoominfo.com",
        "apollo.io",
        "owler.com",
        "pitchbook.com",
        "dnb.com",
        "bloomberg.com",
        "yellowpages.com",
        "wikipedia.org",
        "wikidata.org",
        "bit.ly",
        "tinyurl.com",
        "ow.ly",
        "buff.ly",
        "rebrand.ly",
        "t.ly",
        "cutt.ly",
        "is.gd",
        "shorturl.at",
        "rb.gy",
        "calendly.com",
        "notion.so",
    }
)
# Hosts of directories whose domain is otherwise a company's own (apple.com is Apple's).
PROFILE_HOSTS = frozenset({"apps.apple.com", "maps.apple.com", "podcasts.apple.com"})
# The same networks under other country domains (google.de/maps, yelp.co.uk/biz/...).
PROFILE_NAMES = frozenset(
    {"google", "yelp", "tripadvisor", "trustpilot", "glassdoor", "indeed", "kununu", "facebook"}
)

# What a LinkedIn URL's first path segment says the page is.
_LINKEDIN_PEOPLE = frozenset({"in", "pub"})
_LINKEDIN_ORGANISATIONS = frozenset({"company", "school", "showcase"})

# Cells that stand for "nothing here" in hand-made sheets and exports: never an identifier
# (else every `N/A` row would be one company, enriched once and written everywhere).
PLACEHOLDERS = frozenset(
    {
        "",
        "-",
        "--",
        "---",
        "?",
        "n/a",
        "n.a.",
        "na",
        "#n/a",
        "none",
        "null",
        "nil",
        "nan",
        "unknown",
        "tbd",
        "tba",
        "not available",
        "not applicable",
        "no",
    }
)
# Employer cells that are not a company (normalised, see `normalize_company_name`).
NOT_A_COMPANY = frozenset(
    {
        "self employed",
        "selfemployed",
        "freelance",
        "freelancer",
        "stealth",
        "stealth mode",
        "stealth startup",
        "confidential",
        "retired",
        "student",
        "unemployed",
    }
)

_LEGAL_SUFFIXES = frozenset(
    {
        "inc",
        "incorporated",
        "llc",
        "ltd",
        "limited",
        "corp",
        "corporation",
        "co",
        "company",
        "plc",
        "gmbh",
        "mbh",
        "kg",
        "ag",
        "ug",
        "se",
        "sa",
        "sas",
        "sarl",
        "sl",
        "bv",
        "nv",
        "srl",
        "spa",
        "sro",
        "oy",
        "oyj",
        "ab",
        "as",
        "asa",
        "aps",
        "pty",
        "pte",
        "pvt",
        "sdn",
        "bhd",
        "kk",
        "lp",
        "llp",
        "ltda",
        "lda",
    }
)
# Each one character class, repeated: nothing to backtrack into, linear.
_BARE_SLUG_RE = re.compile(r"[\w-]+")
_NON_WORD = re.compile(r"[^\w]+")
_PLACEHOLDER_MAX = max(len(text) for text in PLACEHOLDERS)
_ASCII_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@lru_cache(maxsize=1)
def _extractor() -> Any:
    # The bundled Public Suffix List snapshot only: no fetch, no cache directory, at run time.
    # Imported here: tldextract pulls in `requests` (~0.15 s), which launching a run need not
    # pay. Private suffixes count: acme.myshopify.com and beta.myshopify.com are two shops,
    # two companies, not one "myshopify.com".
    import tldextract

    return tldextract.TLDExtract(
        suffix_list_urls=(), cache_dir=None, include_psl_private_domains=True
    )


def load_suffix_list() -> None:
    """Parse the bundled Public Suffix List now, not at the first host looked at: a process
    that forks workers does it once for all of them (defs/warm.py)."""
    _extractor()("example.com")


def _bounded(value: Any, limit: int) -> str:
    """A cell's text (NFKC, stripped) when it is at most `limit` characters, else "".

    The raw text is measured before it is normalised, with room for padding and for NFKC's
    changes, so that normalising costs at most a few times `limit`. Placeholders are ""."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if len(text) > 4 * limit:
        return ""
    if not text.isascii():  # ASCII is already NFKC; the check is C-fast, normalising is not
        text = unicodedata.normalize("NFKC", text)
    text = text.strip()
    if len(text) > limit or (len(text) <= _PLACEHOLDER_MAX and text.casefold() in PLACEHOLDERS):
        return ""
    return text


# --- domains ------------------------------------------------------------------------------


def canonical_host(host: str) -> str | None:
    """A host name in one form: IDNA 2008 (UTS 46, non-transitional) U-labels, lower-case.

    One form, so that `straße.de`, `Straße.DE` and its punycode `xn--strae-oqa.de` are the
    same company and are bought once. Unicode (U-labels) rather than punycode because
    it is what a user typed and reads (the key shows up in logs and, through providers, in
    cells), and because keys cached before this change were already unicode. IDNA 2008, not
    Python's `encodings.idna` (IDNA 2003), which maps `ß` to `ss` and so would make
    `straße.de` the same company as `strasse.de`: they are two registrations. A trailing dot
    (a fully qualified name) is dropped. None for what is not a host name.
    """
    # Measured before the cache, which keeps only names that can be hosts.
    return _canonical_host(host) if len(host) <= HOST_MAX_CHARS + 1 else None


@lru_cache(maxsize=1 << 14)
def _canonical_host(host: str) -> str | None:
    host = host.rstrip(".")
    if not host or len(host) > HOST_MAX_CHARS:
        return None
    labels = host.split(".")
    if any(not label or len(label) > LABEL_MAX_CHARS for label in labels):
        return None
    lowered = host.lower()
    if lowered.isascii() and not any(label.startswith("xn--") for label in lowered.split(".")):
        return lowered if set(lowered) <= _ASCII_HOST_CHARS else None
    try:
        return str(idna.decode(idna.encode(host, uts46=True, transitional=False)))
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class _Site:
    host: str  # canonical, e.g. uk.linkedin.com
    domain: str  # registrable, e.g. linkedin.com
    label: str  # the registrable domain's own label, e.g. linkedin


def _site(host: str) -> _Site | None:
    return _cached_site(host) if len(host) <= HOST_MAX_CHARS + 1 else None


@lru_cache(maxsize=1 << 16)
def _cached_site(host: str) -> _Site | None:
    # Cached on the host (at most 254 characters): a table repeats its companies' websites,
    # and both detection and the apply stage derive the same keys.
    canonical = canonical_host(host)
    if canonical is None:
        return None
    extracted = _extractor()(canonical)
    if not extracted.suffix or not extracted.domain or extracted.ipv4:
        return None
    domain = str(extracted.top_domain_under_public_suffix).lower()
    return _Site(canonical, domain, str(extracted.domain)) if domain else None


@dataclass(frozen=True, slots=True)
class _Url:
    site: _Site
    path: str
    query: str


def _parse_url(text: str) -> _Url | None:
    """A URL, bare host or email-ish string (already bounded): its site, path and query."""
    # Cached when short (nearly always): a table repeats its companies' websites, and both
    # detection and the apply stage parse every row's cells.
    return _parse_short_url(text) if len(text) <= _CACHED_URL_CHARS else _parse_any_url(text)


def _parse_any_url(text: str, *, cached: bool = True) -> _Url | None:
    """`_parse_url` uncached; `cached` False leaves the host's site out of its cache too."""
    if len(text.split(None, 1)) != 1:  # empty, or holds whitespace: not a URL
        return None
    if "@" in text and "/" not in text:  # an address (or `mailto:`): its domain
        text = text.rpartition("@")[2]
    if "://" not in text:
        text = "//" + text.lstrip("/")
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:
        return None
    if not host:
        return None
    if cached:
        site = _site(host)
    else:
        site = _cached_site.__wrapped__(host) if len(host) <= HOST_MAX_CHARS + 1 else None
    return _Url(site, parts.path, parts.query) if site is not None else None


_CACHED_URL_CHARS = 256
_parse_short_url = lru_cache(maxsize=1 << 16)(_parse_any_url)


def normalize_domain(value: Any) -> str | None:
    """The registrable domain of a URL, host or email-ish string, in canonical form; else None.

    `https://WWW.Shop.Acme.co.uk:8080/about?x=1` -> `acme.co.uk`; `xn--strae-oqa.de` ->
    `straße.de`. IPs, bare words and hosts without a public suffix give None.
    """
    url = _parse_url(_bounded(value, URL_MAX_CHARS))
    return url.site.domain if url is not None else None


def _is_profile_page(url: _Url) -> bool:
    """A page on a social network, directory or shortener, other than its own homepage."""
    site = url.site
    if site.host in PROFILE_HOSTS:
        return True
    if site.domain not in PROFILE_DOMAINS and site.label not in PROFILE_NAMES:
        return False
    own_homepage = (
        site.host in (site.domain, f"www.{site.domain}") and url.path in ("", "/") and not url.query
    )
    return not own_homepage


def company_domain(value: Any) -> str | None:
    """The company's own domain from a website cell; None for a profile or directory page
    (`linkedin.com/company/acme`, `facebook.com/acme`, `bit.ly/x`), which is not its site."""
    url = _parse_url(_bounded(value, URL_MAX_CHARS))
    if url is None or _is_profile_page(url):
        return None
    return url.site.domain


def _website_key(value: Any) -> EntityKey | None:
    """What a website cell says about the company: its domain, its LinkedIn page, or nothing."""
    if isinstance(value, str) and len(value) <= _CACHED_URL_CHARS:
        return _cached_website_key(value)
    return _parse_website_key(value)


def _parse_website_key(value: Any) -> EntityKey | None:
    # Not through `_parse_url`'s caches: the key is cached (below), so the URL and its site
    # are not asked for again, and caching them too would hold each website three times.
    url = _parse_any_url(text, cached=False) if (text := _bounded(value, URL_MAX_CHARS)) else None
    if url is None:
        return None
    if not _is_profile_page(url):
        return EntityKey(EntityType.COMPANY, "domain", url.site.domain)
    profile = _linkedin_profile(url)
    if profile is not None and profile[0] == "company":
        return EntityKey(EntityType.COMPANY, "linkedin", profile[1])
    return None


# Cached on the cell's text: a table repeats its companies' websites (ten rows a company in
# the benchmark's S5), and detection and the apply stage both derive every row's key; the
# key is immutable, so one object serves every row, and the job's entity is that object.
# Room for a job's companies (S5: 100,000): a table read in id order meets its companies in
# no order, and an LRU smaller than their number misses a share of rows that grows with
# the table (65,536 entries missed ~35 % of S5's rows, each a ~25 us parse, and every miss
# made the entity again: 165,000 keys for 100,000 entities). An entry is ~200 bytes
# beside the key it returns, which the job holds anyway.
_cached_website_key = lru_cache(maxsize=1 << 18)(_parse_website_key)


# --- email --------------------------------------------------------------------------------


def normalize_email(value: Any) -> str | None:
    """An email address in one form, else None.

    Accepts what exports hold: `mailto:` links, display names (`Ada <ada@acme.com>`), case,
    surrounding space, a trailing dot. Lower-cased (mailboxes are case-insensitive in
    practice), with the domain in canonical form. Sub-addresses (`ada+crm@acme.com`) are
    kept as they are: `+` is a convention of some mail servers, not a rule, so merging them
    could make two people one; keeping them costs at worst one more lookup.
    """
    text = _bounded(value, EMAIL_CELL_MAX_CHARS).lower()
    if text.startswith("mailto:"):
        text = text[len("mailto:") :].partition("?")[0]
    if text.endswith(">") and "<" in text:
        text = text[text.rindex("<") + 1 : -1].strip()
    if len(text) > EMAIL_MAX_CHARS or len(text.split(None, 1)) != 1:
        return None
    local, at, domain = text.rpartition("@")
    if not at or not local or "@" in local or len(local) > EMAIL_LOCAL_MAX_CHARS:
        return None
    host = canonical_host(domain)
    if host is None or "." not in host:
        return None
    return f"{local}@{host}"


def work_email_domain(value: Any) -> str | None:
    """The employer's domain from a work email; None for free mail or a malformed address."""
    email = normalize_email(value)
    if email is None:
        return None
    site = _site(email.rpartition("@")[2])
    if site is None or site.domain in FREE_MAIL_DOMAINS or site.label in FREE_MAIL_NAMES:
        return None
    return site.domain


# --- names --------------------------------------------------------------------------------


def _fold(text: str) -> list[str]:
    # Accents folded, case folded, punctuation dropped: "Société Générale, S.A." and
    # "societe generale sa" meet on the same words. (`_NON_WORD` is one character class
    # repeated: linear.)
    if not text.isascii():
        decomposed = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    folded = text.casefold().replace("&", " and ").replace(".", "")
    return _NON_WORD.sub(" ", folded).split()


def normalize_company_name(value: Any) -> str | None:
    """A company name in one form: `ACME, Inc.`, `Acme Inc` and `The Acme Corporation` are
    `acme`; `Acme GmbH & Co. KG` too. None for a placeholder or a non-employer (`Freelance`)."""
    words = _fold(_bounded(value, NAME_MAX_CHARS))
    while len(words) > 1 and (words[-1] in _LEGAL_SUFFIXES or words[-1] == "and"):
        words.pop()
    if len(words) > 1 and words[0] == "the":
        words = words[1:]
    name = " ".join(words)
    return name if name and name not in NOT_A_COMPANY else None


def normalize_person_name(value: Any) -> str | None:
    return " ".join(_fold(_bounded(value, NAME_MAX_CHARS))) or None


# --- LinkedIn -----------------------------------------------------------------------------


def _clean_slug(raw: str, *, max_chars: int = SLUG_MAX_CHARS) -> str | None:
    slug = unicodedata.normalize("NFC", unquote(raw)).strip().lower()
    if not slug or len(slug) > max_chars:
        return None
    # Printable excludes control, format and unassigned characters and every space but " ".
    if not slug.isprintable() or " " in slug:
        return None
    return slug


def _linkedin_profile(url: _Url) -> tuple[str, str] | None:
    """("in" | "company", slug) of a LinkedIn profile or organisation page, else None.

    Any LinkedIn host (`www.`, `uk.`, `m.`), any case, with or without a trailing slash,
    query or sub-page (`/in/ada/details/experience`); slugs percent-decoded and lower-cased.
    An old public profile (`/pub/ada-lovelace/1/23/456`) is keyed by its whole path: the
    name alone is shared by every Ada Lovelace.
    """
    if url.site.domain != "linkedin.com":
        return None
    segments = [segment for segment in url.path.split("/") if segment]
    if len(segments) < 2:
        return None
    section = segments[0].lower()
    if section == "pub":
        parts = segments[1:5]
        slug = _clean_slug("/".join(parts), max_chars=SLUG_MAX_CHARS + 20)
        return ("in", slug) if slug is not None else None
    if section not in _LINKEDIN_PEOPLE and section not in _LINKEDIN_ORGANISATIONS:
        return None
    slug = _clean_slug(segments[1])
    if slug is None or "/" in slug:
        return None
    return ("in" if section in _LINKEDIN_PEOPLE else "company", slug)


def linkedin_slug(value: Any, *, kind: str = "in") -> str | None:
    """The slug of a LinkedIn URL (`/in/<slug>`, or `/company/<slug>` with kind="company"),
    or of a bare slug (`ada-lovelace`); None for anything else, another site's URL included."""
    text = _bounded(value, URL_MAX_CHARS)
    if not text:
        return None
    url = _parse_url(text)
    if url is not None:
        profile = _linkedin_profile(url)
        return profile[1] if profile is not None and profile[0] == kind else None
    if (
        "." not in text
        and BARE_SLUG_MIN_CHARS <= len(text) <= SLUG_MAX_CHARS
        and _BARE_SLUG_RE.fullmatch(text)
    ):
        return text.lower()
    return None


# --- rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnSpec:
    """A table column as detection sees it: its key in row data and the field it means."""

    id: str
    key: str
    field: FieldRef | None
    prompt: str | None = None  # an AI column's template (its field is then an `ai_` field)


@dataclass(frozen=True)
class IdentifierColumns:
    """The row-data keys that identify entities, found from the table's column fields (and,
    for the parts of a person's name, which are no field, from the column keys)."""

    websites: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    company_names: tuple[str, ...] = ()
    company_linkedins: tuple[str, ...] = ()
    person_linkedins: tuple[str, ...] = ()
    person_names: tuple[str, ...] = ()
    first_names: tuple[str, ...] = ()
    last_names: tuple[str, ...] = ()

    @classmethod
    def from_columns(cls, columns: Iterable[ColumnSpec]) -> IdentifierColumns:
        by_field: dict[str, list[str]] = {}
        for column in columns:
            if column.field is not None:
                by_field.setdefault(str(column.field), []).append(column.key)
            else:
                part = infer_name_part(column.key)
                if part is not None:
                    by_field.setdefault(part, []).append(column.key)
        return cls(
            websites=tuple(by_field.get("company.domain", ())),
            emails=tuple(by_field.get("person.email", ())),
            company_names=tuple(by_field.get("company.name", ()))
            + tuple(by_field.get("person.company", ())),
            company_linkedins=tuple(by_field.get("company.linkedin_url", ())),
            person_linkedins=tuple(by_field.get("person.linkedin_url", ())),
            person_names=tuple(by_field.get("person.full_name", ())),
            first_names=tuple(by_field.get(FIRST_NAME, ())),
            last_names=tuple(by_field.get(LAST_NAME, ())),
        )


T = TypeVar("T")


def _first(
    data: Mapping[str, Any], keys: Iterable[str], parse: Callable[[Any], T | None]
) -> T | None:
    for key in keys:
        parsed = parse(data.get(key))
        if parsed:
            return parsed
    return None


def _company_linkedin(value: Any) -> str | None:
    return linkedin_slug(value, kind="company")


def _bounded_name(value: Any) -> str | None:
    return _bounded(value, NAME_MAX_CHARS) or None


def _person_name(data: Mapping[str, Any], ids: IdentifierColumns) -> str | None:
    """A full-name column, else first and last name columns joined (both needed: a first name
    and a company is too weak to be one person)."""
    full = _first(data, ids.person_names, normalize_person_name)
    if full:
        return full
    first = _first(data, ids.first_names, _bounded_name)
    last = _first(data, ids.last_names, _bounded_name)
    if first and last:
        return normalize_person_name(f"{first} {last}")
    return None


def _company_key(data: Mapping[str, Any], ids: IdentifierColumns) -> EntityKey | None:
    """Website domain, else work-email domain, else name, else LinkedIn page.

    A LinkedIn page pins the company exactly, but providers here look companies up by domain
    or name only (a company by `linkedin` is passed over, with no call and no charge), so it
    is the last resort: used when nothing else identifies the company, and never confused
    with `linkedin.com`."""
    linkedin: EntityKey | None = None
    for key in ids.websites:
        found = _website_key(data.get(key))
        if found is not None and found.kind == "domain":
            return found
        if found is not None and linkedin is None:
            linkedin = found
    domain = _first(data, ids.emails, work_email_domain)
    if domain:
        return EntityKey(EntityType.COMPANY, "domain", domain)
    name = _first(data, ids.company_names, normalize_company_name)
    if name:
        return EntityKey(EntityType.COMPANY, "name", name, NAME_KEY_STRENGTH)
    if linkedin is not None:
        return linkedin
    slug = _first(data, ids.company_linkedins, _company_linkedin)
    return EntityKey(EntityType.COMPANY, "linkedin", slug) if slug else None


@dataclass(frozen=True)
class RowEntities:
    company: EntityKey | None
    person: EntityKey | None

    def for_type(self, entity_type: EntityType) -> EntityKey | None:
        return self.company if entity_type is EntityType.COMPANY else self.person


def identify_row(
    data: Mapping[str, Any], ids: IdentifierColumns, *, person_wanted: bool = True
) -> RowEntities:
    """The company and the person a row is about, from its identifier columns. Without
    `person_wanted` (no cell asks about a person) the person is not looked for: None."""
    company = _company_key(data, ids)
    if not person_wanted:
        return RowEntities(company, None)
    return RowEntities(company, _person_key(data, ids, company))


def _person_key(
    data: Mapping[str, Any], ids: IdentifierColumns, company: EntityKey | None
) -> EntityKey | None:
    """LinkedIn slug, else email, else name + company (the row's `company` key)."""
    slug = _first(data, ids.person_linkedins, linkedin_slug)
    if slug:
        return EntityKey(EntityType.PERSON, "linkedin", slug)
    email = _first(data, ids.emails, normalize_email)
    if email:
        return EntityKey(EntityType.PERSON, "email", email)
    full_name = _person_name(data, ids)
    if full_name and company is not None:
        return EntityKey(
            EntityType.PERSON, "name_company", f"{full_name}|{company.value}", NAME_KEY_STRENGTH
        )
    return None


class CellTarget(NamedTuple):
    """One requested cell and the entity it is about (None: no usable identifier).

    A named tuple, not a frozen dataclass: one is made per requested cell of every row read
    (twice per job), and a tuple is built ~4x faster."""

    row_id: str
    column: ColumnSpec
    entity: EntityKey | None


def targets_for_row(
    row_id: str,
    data: Mapping[str, Any],
    columns: Sequence[ColumnSpec],
    ids: IdentifierColumns,
) -> list[CellTarget]:
    """Map each requested column of one row to the entity its field belongs to.

    Run on every row read, twice a job (detection, then the span that writes it): no object
    but the targets is made, and the person is looked for only when a cell asks about one."""
    if not columns:  # e.g. a whole-table job on a row whose cells are all filled
        return []
    try:
        persons = [column.field.entity_type is _PERSON for column in columns]  # type: ignore[union-attr]
    except AttributeError:  # a column without a field: validated away before a job starts
        unmapped = next(column for column in columns if column.field is None)
        raise ValueError(f"column {unmapped.key!r} maps to no field") from None
    company = _company_key(data, ids)
    if True not in persons:
        return [_target(CellTarget, (row_id, column, company)) for column in columns]
    person = _person_key(data, ids, company)
    return [
        _target(CellTarget, (row_id, column, person if is_person else company))
        for column, is_person in zip(columns, persons, strict=True)
    ]


_PERSON = EntityType.PERSON
# CellTarget(...) without the named tuple's own __new__, a Python call per cell.
_target = tuple.__new__


@dataclass
class EntityIndex:
    """Accumulates the unique entities of a job, page by page, with the fields they need.

    Each entity's fields are a frozenset shared by every entity that wants the same fields
    (a job asks a handful of combinations of 100,000 entities): one set, not one per entity,
    kept until the job ends (detection's `EntityRequest`s and the chunks' hold the same)."""

    fields: dict[EntityKey, frozenset[str]] = field(default_factory=dict)
    cells: Counter[EntityKey] = field(default_factory=Counter)  # cells about each entity
    cells_total: int = 0
    cells_without_identifier: int = 0
    rows_read: int = 0
    _sets: dict[frozenset[str], frozenset[str]] = field(default_factory=dict, repr=False)

    def add(self, targets: Iterable[CellTarget]) -> None:
        # A row's cells are mostly about one entity: its fields and its count are looked up
        # once per run of equal entities, not once per cell (EntityKey's hash is computed in
        # Python each time).
        entity: EntityKey | None = None
        names: list[str] = []
        total = without = 0
        for _row_id, column, key in targets:
            total += 1
            if key is None:
                without += 1
            elif key is entity:
                names.append(column.field.name)  # type: ignore[union-attr]
            else:
                if entity is not None:
                    self._merge(entity, names)
                entity, names = key, [column.field.name]  # type: ignore[union-attr]
        if entity is not None:
            self._merge(entity, names)
        self.cells_total += total
        self.cells_without_identifier += without

    def _merge(self, entity: EntityKey, names: list[str]) -> None:
        self.cells[entity] += len(names)
        found = self.fields.get(entity)
        if found is not None and found.issuperset(names):
            return
        wanted = frozenset(names) if found is None else found.union(names)
        self.fields[entity] = self._sets.setdefault(wanted, wanted)

    def __len__(self) -> int:
        return len(self.fields)
