"""Providers from one YAML file: the bundled fakes by default, real vendors by configuration.

The file is, in order: the path given, else `GLAZE_PROVIDERS_FILE` (read at call time), else
the bundled `glaze_pipeline/providers.yaml`. Each entry has a `kind`: `fake` (the in-process
seed-001 provider), `json_api` (any JSON vendor, see `json_api.JsonApiConfig`) or `website`
(company homepages). `${VAR}` / `${VAR:-default}` in URLs are filled from the environment when
the file is loaded, so one file serves a laptop, CI and the benchmark. API keys never go in the
file: an entry names the environment variable that holds its key; a key that is set is
checked when the providers are built (a ConfigError naming the variable, never the value).

The kinds are `PROVIDER_KINDS`: each kind's module declares its `ProviderKind` (entry model,
provider class, how to build one) next to them, and the file's schema, `build_provider` and the
kind `describe_providers` reports are read from that list. Adding a kind is one module and one
line there.

When several processes (or machines) run chunks of one job at once, `load_providers(...,
redis_url=..., processes=N)` makes each HTTP provider hold its vendor's limits together with
the others: one rate schedule in Redis, and a share of its concurrency (see
`http.shared_limits`). Without Redis, limits stay per process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from glaze_pipeline.core.errors import ConfigError
from glaze_pipeline.core.providers import fake, json_api, website
from glaze_pipeline.core.providers.base import (
    Provider,
    ProviderConfig,
    ProviderKind,
    ReportsHealth,
    Verdict,
)
from glaze_pipeline.core.providers.http import HttpBackedProvider, ProviderHealth, expand_env
from glaze_pipeline.core.providers.http.shared_limits import redis_for_limits

PROVIDERS_FILE_ENV = "GLAZE_PROVIDERS_FILE"


class ProviderConfigError(ConfigError, ValueError):
    """The providers file is missing, unreadable or invalid; the message says where and why.

    A ConfigError, so the CLI prints it as one line; still a ValueError for older callers.
    """


# Every kind a providers file may use, in the order an unknown `kind` error lists them.
PROVIDER_KINDS: tuple[ProviderKind[Any], ...] = (fake.KIND, json_api.KIND, website.KIND)
_KINDS: dict[str, ProviderKind[Any]] = {kind.name: kind for kind in PROVIDER_KINDS}
# Expanded in every entry before its kind is checked: a bad `${VAR}` is reported first.
_URL_SETTINGS = tuple(dict.fromkeys(key for kind in PROVIDER_KINDS for key in kind.url_settings))
_URL_MAPS = tuple(dict.fromkeys(key for kind in PROVIDER_KINDS for key in kind.url_maps))

if TYPE_CHECKING:
    ProviderEntry = ProviderConfig
else:
    # One entry of the file: whichever kind's model its `kind` names. (Type checkers cannot
    # follow a union built at run time: to them an entry is the `ProviderConfig` protocol.)
    ProviderEntry = Annotated[
        Union[tuple(kind.config for kind in PROVIDER_KINDS)],  # noqa: UP007 (no `|` of a tuple)
        Field(discriminator="kind"),
    ]


class ProvidersFile(BaseModel):
    """The whole file: a list of provider entries with unique names."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    providers: list[ProviderEntry]

    @model_validator(mode="after")
    def _unique_names(self) -> ProvidersFile:
        names = [entry.name for entry in self.providers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"provider names must be unique; repeated: {duplicates}")
        return self


def providers_file(path: str | Path | None = None) -> Path:
    """Which file configures the providers: `path`, else GLAZE_PROVIDERS_FILE, else bundled."""
    chosen = path or os.environ.get(PROVIDERS_FILE_ENV)
    if chosen:
        return Path(chosen)
    return Path(str(resources.files("glaze_pipeline").joinpath("providers.yaml")))


def parse_providers(data: Mapping[str, Any], *, source: str = "<config>") -> ProvidersFile:
    """Validate a loaded providers document (URLs expanded from the environment)."""
    try:
        expanded = _expand_urls(data)
        return ProvidersFile.model_validate(expanded)
    except ValidationError as error:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise ProviderConfigError(f"invalid providers file {source}:\n{problems}") from None
    except ValueError as error:
        raise ProviderConfigError(f"invalid providers file {source}: {error}") from None


def build_provider(entry: ProviderConfig) -> Provider:
    """One provider object from one validated entry."""
    return _KINDS[entry.kind].build(entry)


def load_providers(
    path: str | Path | None = None, *, redis_url: str | None = None, processes: int = 1
) -> list[Provider]:
    """The enabled providers of the providers file (see `providers_file`).

    `processes`: how many processes use these vendors at once (this one included); with a
    `redis_url` they share each vendor's rate limit through it (see `share_limits`).
    """
    source = providers_file(path)
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as error:
        raise ProviderConfigError(f"cannot read providers file {source}: {error}") from None
    except yaml.YAMLError as error:
        raise ProviderConfigError(f"providers file {source} is not valid YAML: {error}") from None
    if not isinstance(data, Mapping):
        raise ProviderConfigError(f"providers file {source} must be a mapping with `providers:`")
    config = parse_providers(data, source=str(source))
    providers = [build_provider(entry) for entry in config.providers if entry.enabled]
    if redis_url or processes > 1:
        share_limits(providers, redis_url=redis_url, processes=processes)
    return providers


def share_limits(
    providers: Iterable[Provider], *, redis_url: str | None, processes: int = 1
) -> None:
    """Make each HTTP provider keep its vendor's limits together with the other `processes`:
    its rate limit through Redis (one client for all of them) when `redis_url` is given, its
    concurrency split either way. Call before the providers are used."""
    client = redis_for_limits(redis_url) if redis_url else None
    for provider in providers:
        if isinstance(provider, HttpBackedProvider):
            provider.http.share_limits(client, processes=processes)


@dataclass(frozen=True)
class ProviderDescription:
    """One provider as `glaze providers` shows it."""

    name: str
    entity_type: str
    kind: str
    fields: tuple[str, ...]
    cost_per_call: float
    charges_misses: bool
    confidence: float
    max_concurrency: int
    health: str
    circuit: str | None = None
    last_error: str | None = None
    attempts: int | None = None
    # The preflight's verdict ("ok" / "unavailable" and why), when one was asked for.
    status: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "entity_type": self.entity_type,
            "kind": self.kind,
            "fields": list(self.fields),
            "cost_per_call": self.cost_per_call,
            "charges_misses": self.charges_misses,
            "confidence": self.confidence,
            "max_concurrency": self.max_concurrency,
            "health": self.health,
            "circuit": self.circuit,
            "last_error": self.last_error,
            "attempts": self.attempts,
            "status": self.status,
            "reason": self.reason,
        }


def describe_providers(
    providers: Iterable[Provider], verdicts: Mapping[str, Verdict] | None = None
) -> list[ProviderDescription]:
    """Name, entity type, fields, price and health of each provider, cheapest first; with
    `verdicts` (see `core.preflight.check_providers`), whether each can be used now."""
    described = []
    for provider in providers:
        verdict = (verdicts or {}).get(provider.name)
        health: ProviderHealth | None = None
        if isinstance(provider, ReportsHealth):
            result = provider.health()
            health = result if isinstance(result, ProviderHealth) else None
        described.append(
            ProviderDescription(
                name=provider.name,
                entity_type=provider.entity_type.value,
                kind=_kind(provider),
                fields=tuple(sorted(provider.fields)),
                cost_per_call=provider.cost_per_call,
                charges_misses=provider.charges_misses,
                confidence=provider.confidence,
                max_concurrency=provider.max_concurrency,
                health=str(health) if health is not None else "ok (in process)",
                circuit=health.circuit if health is not None else None,
                last_error=health.last_error if health is not None else None,
                attempts=health.attempts if health is not None else None,
                status=verdict.status if verdict is not None else None,
                reason=verdict.reason if verdict is not None else None,
            )
        )
    return sorted(described, key=lambda d: (d.entity_type, d.cost_per_call, d.name))


def _kind(provider: Provider) -> str:
    for kind in PROVIDER_KINDS:
        if isinstance(provider, kind.provider):
            return kind.name
    return type(provider).__name__


def _expand_urls(data: Mapping[str, Any]) -> dict[str, Any]:
    """`${VAR:-default}` in URL settings only: secrets never flow through the config."""
    entries = data.get("providers")
    if not isinstance(entries, list):
        return dict(data)
    expanded = []
    for entry in entries:
        if isinstance(entry, Mapping):
            entry = dict(entry)
            for key in _URL_SETTINGS:
                if isinstance(entry.get(key), str):
                    entry[key] = expand_env(entry[key])
            for key in _URL_MAPS:
                if isinstance(entry.get(key), Mapping):
                    entry[key] = {
                        k: expand_env(v) if isinstance(v, str) else v for k, v in entry[key].items()
                    }
        expanded.append(entry)
    return {**data, "providers": expanded}
