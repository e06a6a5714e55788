"""A JSON API vendor described by configuration: adding a vendor is a YAML entry, not code.

The entry says how to ask (a request template per kind of entity key, e.g.
`GET /v1/companies?domain={value}`), how to authenticate (a header and the NAME of the
environment variable that holds the key, read at call time), and where each catalogue field
sits in the answer (dotted paths). Every answer is validated into a typed record at the edge:
a payload that does not fit is a `BadResponse`, never a crash and never half-trusted data.

The vendor's host is the operator's `base_url`, trusted as configuration: no SSRF guard here
(nor for the health probe, a path under the same `base_url`).
User data reaches only the path (each value percent-encoded, `/`, `?`, `#` and `@` included, so
it cannot leave the path or name another host), the query and the JSON body.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal
from urllib.parse import quote

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from glaze_pipeline.core.fields import CATALOGUE, ValueKind, catalogue_fields
from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.core.providers.base import (
    BadResponse,
    EntityNotFound,
    ProviderAnswer,
    ProviderError,
    ProviderKind,
)
from glaze_pipeline.core.providers.http import (
    HttpBackedProvider,
    HttpSettings,
    ProviderClient,
    UnsupportedLookup,
    load_secret,
    probe_health,
    read_secret,
    secret_problem,
)

# Which identifiers each entity type is keyed by (see detection.identify_row), and the
# placeholders a request template may use for each.
KEY_KINDS: dict[EntityType, frozenset[str]] = {
    EntityType.COMPANY: frozenset({"domain", "name"}),
    EntityType.PERSON: frozenset({"linkedin", "email", "name_company"}),
}
_COMMON_PLACEHOLDERS = frozenset({"value", "kind", "type"})
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_]+)\}")
_ACCEPT_JSON = {"Accept": "application/json"}


def placeholders(key: EntityKey) -> dict[str, str]:
    """The values a request template can use for `key`."""
    values = {"value": key.value, "kind": key.kind, "type": key.type.value}
    if key.kind == "name_company":
        name, _, company = key.value.partition("|")
        values.update(name=name, company=company)
    return values


def _allowed_placeholders(kind: str) -> frozenset[str]:
    extra = {"name", "company"} if kind == "name_company" else set()
    return _COMMON_PLACEHOLDERS | extra


def fill(template: str, values: Mapping[str, str], *, quote_values: bool = False) -> str:
    """Substitute `{name}` placeholders (no format-string attribute access, no surprises)."""

    def one(match: re.Match[str]) -> str:
        value = values[match.group(1)]
        return quote(value, safe="") if quote_values else value

    return _PLACEHOLDER_RE.sub(one, template)


# --- typed records: what a vendor's values must look like -----------------------------------

Text = Annotated[str, Field(max_length=20_000)]
Year = Annotated[int, Field(ge=1000, le=2100)]


class _Record(BaseModel):
    model_config = ConfigDict(
        extra="forbid", coerce_numbers_to_str=True, str_strip_whitespace=True, frozen=True
    )

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_missing(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


# What each kind of catalogue value must be in a vendor's answer (`CatalogueField.value`).
_VALUE_TYPES: dict[ValueKind, Any] = {"text": Text, "count": NonNegativeInt, "year": Year}


def _record_model(entity_type: EntityType) -> type[_Record]:
    """The record of one entity type: every catalogue field, optional, typed by its value kind.

    Made from the catalogue, so a field added there is accepted from vendors with no edit here.
    """
    fields: dict[str, Any] = {
        field.name: (_VALUE_TYPES[field.value] | None, None)
        for field in catalogue_fields(entity_type)
    }
    name = f"{entity_type.value.capitalize()}Record"  # as BadResponse messages name it
    return create_model(name, __base__=_Record, __module__=__name__, **fields)


RECORDS: dict[EntityType, type[_Record]] = {
    entity_type: _record_model(entity_type) for entity_type in EntityType
}
CompanyRecord = RECORDS[EntityType.COMPANY]
PersonRecord = RECORDS[EntityType.PERSON]


# --- configuration -------------------------------------------------------------------------


class RequestTemplate(BaseModel):
    """How to ask about one entity: `{value}` etc. in the path, params and JSON body strings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["GET", "POST"] = "GET"
    path: str
    params: dict[str, str] = Field(default_factory=dict)
    json_body: dict[str, Any] | None = None

    def used_placeholders(self) -> set[str]:
        texts = [self.path, *self.params.values()]
        texts += [v for v in _strings(self.json_body)] if self.json_body else []
        return {name for text in texts for name in _PLACEHOLDER_RE.findall(text)}


class BatchTemplate(BaseModel):
    """A batch endpoint: POST `{ids_field: [values...]}`, answers listed under `results_path`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    key_kind: str
    ids_field: str = "ids"
    results_path: str = "results"
    id_path: str = "id"  # inside one result: the identifier it answers for
    max_size: PositiveInt = 100


class AuthConfig(BaseModel):
    """An API key sent in a header; `env` NAMES the variable holding it (never the key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    header: str = "Authorization"
    env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    scheme: str = ""  # e.g. "Bearer": the header value is "<scheme> <key>"


class HealthCheck(BaseModel):
    """A free endpoint that says whether the vendor is up (and takes our key), under
    `base_url`; the preflight GETs it once, with the auth header, before a job spends."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(pattern=r"^/")
    method: Literal["GET"] = "GET"
    timeout_s: PositiveFloat = Field(default=2.0, le=30)


class JsonApiConfig(BaseModel):
    """One JSON API vendor, as written in the providers YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["json_api"] = "json_api"
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    entity_type: EntityType
    base_url: str = Field(pattern=r"^https?://")
    lookups: dict[str, RequestTemplate]
    record_path: str = ""  # where the record sits in a single answer (dotted), "" = the root
    fields: dict[str, str]  # catalogue field -> dotted path inside the record
    field_confidence: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    batch: BatchTemplate | None = None
    auth: AuthConfig | None = None
    health: HealthCheck | None = None
    cost_per_call: float = Field(default=0.0, ge=0)
    charges_misses: bool = False
    confidence: float = Field(default=0.8, ge=0, le=1)
    http: HttpSettings = Field(default_factory=HttpSettings)
    enabled: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> JsonApiConfig:
        catalogue = CATALOGUE[self.entity_type]
        kinds = KEY_KINDS[self.entity_type]
        unknown = sorted(set(self.fields) - catalogue)
        if unknown:
            raise ValueError(
                f"{self.name}: unknown {self.entity_type.value} fields {unknown}; "
                f"known: {sorted(catalogue)}"
            )
        if not self.fields:
            raise ValueError(f"{self.name}: map at least one field")
        unknown_conf = sorted(set(self.field_confidence) - set(self.fields))
        if unknown_conf:
            raise ValueError(f"{self.name}: field_confidence names unmapped fields {unknown_conf}")
        if not self.lookups:
            raise ValueError(f"{self.name}: give at least one lookup (by key kind)")
        for kind, template in self.lookups.items():
            if kind not in kinds:
                raise ValueError(
                    f"{self.name}: cannot look up a {self.entity_type.value} by {kind!r}; "
                    f"key kinds are {sorted(kinds)}"
                )
            extra = template.used_placeholders() - _allowed_placeholders(kind)
            if extra:
                raise ValueError(
                    f"{self.name}: lookup {kind!r} uses unknown placeholders {sorted(extra)}"
                )
        if self.batch is not None and self.batch.key_kind not in kinds:
            raise ValueError(f"{self.name}: batch key_kind {self.batch.key_kind!r} is unknown")
        return self


# --- the provider --------------------------------------------------------------------------


class JsonApiProvider(HttpBackedProvider):
    """A Provider backed by a JSON API described by a `JsonApiConfig`."""

    config: JsonApiConfig

    def __init__(self, config: JsonApiConfig, *, http: ProviderClient | None = None) -> None:
        """Built from config; a key already in the environment is checked now (ConfigError
        naming the variable when it cannot be sent), and read again at each call."""
        if config.auth is not None:
            load_secret(config.auth.env, provider=config.name)
        self.config = config
        self.http = http or ProviderClient(config.name, config.http, base_url=config.base_url)
        self._record = RECORDS[config.entity_type]

    def __repr__(self) -> str:
        return (
            f"JsonApiProvider(name={self.name!r}, entity_type={self.entity_type.value!r}, "
            f"base_url={self.config.base_url!r})"
        )

    @property
    def entity_type(self) -> EntityType:
        return self.config.entity_type

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(self.config.fields)

    @property
    def cost_per_call(self) -> float:
        return self.config.cost_per_call

    @property
    def charges_misses(self) -> bool:
        return self.config.charges_misses

    def supports(self, key: EntityKey) -> bool:
        """Whether this vendor can be asked about `key` at all."""
        return key.type is self.entity_type and key.kind in self.config.lookups

    @property
    def batch_size(self) -> int:
        """How many keys one batch request takes; 0 without a batch endpoint."""
        return self.config.batch.max_size if self.config.batch is not None else 0

    def batches(self, key: EntityKey) -> bool:
        """Whether `key` goes through the batch endpoint (its key kind is the one it takes)."""
        batch = self.config.batch
        return batch is not None and key.type is self.entity_type and key.kind == batch.key_kind

    async def lookup(self, key: EntityKey, fields: frozenset[str]) -> ProviderAnswer:
        if not self.supports(key):
            raise UnsupportedLookup(
                f"{self.name}: cannot look up a {key.type.value} by {key.kind}", provider=self.name
            )
        template = self.config.lookups[key.kind]
        values = placeholders(key)
        headers = self._headers()  # a missing key is refused here, outside the breaker
        with self.http.guard():
            response = await self.http.fetch(
                template.method,
                fill(template.path, values, quote_values=True),
                params={k: fill(v, values) for k, v in template.params.items()},
                json_body=_fill_json(template.json_body, values) if template.json_body else None,
                headers=headers,
            )
            payload = response.json()
            if not isinstance(payload, dict):
                raise BadResponse(
                    f"{self.name}: expected a JSON object, got {type(payload).__name__}",
                    provider=self.name,
                )
            record = _dig(payload, self.config.record_path, missing=_MISSING)
            if record is None:  # an explicit null: the vendor's way of saying "no such entity"
                raise EntityNotFound(f"{self.name}: null answer", provider=self.name)
            return self._answer(record)

    async def lookup_many(
        self, keys: Sequence[EntityKey], fields: frozenset[str]
    ) -> dict[str, ProviderAnswer | ProviderError]:
        """Many entities in as few calls as the batch endpoint allows, by entity id.

        Without a batch endpoint (or for other key kinds) each key is looked up alone. An
        entity the batch answer leaves out is `EntityNotFound`; a failed call fails its batch.
        """
        results: dict[str, ProviderAnswer | ProviderError] = {}
        batch = self.config.batch
        batched = [k for k in keys if batch is not None and k.kind == batch.key_kind]
        for key in keys:
            if batch is None or key.kind != batch.key_kind:
                try:
                    results[key.id] = await self.lookup(key, fields)
                except ProviderError as error:
                    results[key.id] = error
        if batch is not None:
            for start in range(0, len(batched), batch.max_size):
                group = batched[start : start + batch.max_size]
                try:
                    results.update(await self._lookup_batch(batch, group))
                except ProviderError as error:
                    results.update((key.id, error) for key in group)
        return results

    async def _lookup_batch(
        self, batch: BatchTemplate, keys: Sequence[EntityKey]
    ) -> dict[str, ProviderAnswer | ProviderError]:
        headers = self._headers()
        with self.http.guard():
            response = await self.http.fetch(
                "POST",
                batch.path,
                json_body={batch.ids_field: [key.value for key in keys]},
                headers=headers,
            )
            items = _dig(response.json(), batch.results_path)
            if not isinstance(items, list):
                raise BadResponse(
                    f"{self.name}: batch answer has no list at {batch.results_path!r}",
                    provider=self.name,
                )
            by_id: dict[str, Any] = {}
            for item in items:
                ident = _dig(item, batch.id_path)
                if isinstance(ident, str | int):
                    by_id[str(ident).lower()] = item
            results: dict[str, ProviderAnswer | ProviderError] = {}
            for key in keys:
                item = by_id.get(key.value.lower())
                if item is None:
                    results[key.id] = EntityNotFound(
                        f"{self.name}: not in batch answer", provider=self.name
                    )
                    continue
                try:
                    results[key.id] = self._answer(
                        _dig(item, self.config.record_path, missing=_MISSING)
                    )
                except BadResponse as error:  # one bad record spoils only its own entity
                    results[key.id] = error
            return results

    # -- preflight hooks (see HttpBackedProvider.preflight)

    def _configuration_problem(self) -> str | None:
        url = self.config.base_url
        try:
            host = httpx.URL(url).host
        except httpx.InvalidURL as error:
            return f"base_url {url!r} is not a valid URL: {error}"
        return None if host else f"base_url {url!r} names no host"

    @property
    def _needs_credentials(self) -> bool:
        return self.config.auth is not None

    def _credentials_problem(self) -> str | None:
        auth = self.config.auth
        return None if auth is None else secret_problem(auth.env, provider=self.name)

    @property
    def _has_probe(self) -> bool:
        return self.config.health is not None

    async def _probe(self) -> str | None:
        health = self.config.health
        if health is None:
            return None
        return await probe_health(
            self.config.base_url,
            health.path,
            settings=self.config.http,
            timeout_s=health.timeout_s,
            headers=self._headers(),
            keyed=self.config.auth is not None,
        )

    def _headers(self) -> dict[str, str]:
        auth = self.config.auth
        if auth is None:
            return dict(_ACCEPT_JSON)
        secret = read_secret(auth.env, provider=self.name)
        return {**_ACCEPT_JSON, auth.header: f"{auth.scheme} {secret}" if auth.scheme else secret}

    def _answer(self, record: Any) -> ProviderAnswer:
        if record is _MISSING:
            raise BadResponse(
                f"{self.name}: the answer has nothing at {self.config.record_path!r}",
                provider=self.name,
            )
        if not isinstance(record, Mapping):
            raise BadResponse(
                f"{self.name}: expected a JSON object at {self.config.record_path or 'the root'}, "
                f"got {type(record).__name__}",
                provider=self.name,
            )
        raw = {name: _dig(record, path) for name, path in self.config.fields.items()}
        try:
            parsed = self._record.model_validate({k: v for k, v in raw.items() if v is not None})
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
            )
            raise BadResponse(
                f"{self.name}: answer does not fit {self._record.__name__} ({problems})",
                provider=self.name,
            ) from None
        values = {k: v for k, v in parsed.model_dump().items() if v is not None}
        confidence = {k: c for k, c in self.config.field_confidence.items() if k in values}
        return ProviderAnswer(values, confidence)


KIND = ProviderKind(
    config=JsonApiConfig,
    provider=JsonApiProvider,
    build=JsonApiProvider,
    url_settings=("base_url",),
)

_MISSING: Any = object()


def _dig(data: Any, path: str, *, missing: Any = None) -> Any:
    """Follow a dotted path (`company.metrics.employees`, `emails.0`); `missing` where it ends."""
    if not path:
        return data
    for part in path.split("."):
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return missing
    return data


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _fill_json(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return fill(value, values)
    if isinstance(value, Mapping):
        return {k: _fill_json(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_json(v, values) for v in value]
    return value
