"""One ConfigurableResource per external system. Nothing here reads the environment at import."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from glaze_pipeline.core.answers import AnswerSharing, SharingSettings, open_answer_sharing
from glaze_pipeline.core.progress import (
    ProgressPublisher,
    open_progress,
    request_channel,
    resolve_prefix,
    table_channel,
)
from glaze_pipeline.core.providers.base import Provider
from glaze_pipeline.core.providers.registry import load_providers
from glaze_pipeline.core.settings import (
    database_url,
    non_negative_setting,
    pre_enrich_budget,
    redis_url,
)
from glaze_pipeline.core.store import Store

if TYPE_CHECKING:
    from glaze_pipeline.core.ai.client import LlmSettings


class GlazeDatabase(ConfigurableResource):
    """The app database: `url`, else GLAZE_DATABASE_URL at run time, else the embedded SQLite."""

    url: str | None = None

    _store: Store | None = PrivateAttr(default=None)

    @property
    def resolved_url(self) -> str:
        return database_url(self.url)

    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.resolved_url)
        return self._store

    @contextmanager
    def open_store(self) -> Iterator[Store]:
        """A store for one sensor tick or command, closed afterwards."""
        store = Store(self.resolved_url)
        try:
            yield store
        finally:
            store.dispose()

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        # Close pooled connections when the run (or step process) ends.
        if self._store is not None:
            self._store.dispose()
            self._store = None


class EnrichmentProviders(ConfigurableResource):
    """The provider waterfall and where runs share answers.

    `config_file` names the providers YAML (else GLAZE_PROVIDERS_FILE, else the bundled fake
    providers); `redis_url` adds the shared Redis tier and Redis single-flight (else
    GLAZE_REDIS_URL; without Redis, Postgres advisory locks, or on SQLite file locks for steps
    side by side);
    `cache_ttl_by_provider` sets how long the Redis tier keeps a provider's answers. With
    Redis, every process keeps each vendor's rate limit together with the others
    (core/providers/http/shared_limits.py); `concurrent_steps` gives each step its share of a
    vendor's `max_concurrency`.
    """

    config_file: str | None = None
    redis_url: str | None = None
    concurrent_steps: int = Field(
        default=1,
        ge=1,
        description="How many enrich steps run at once (processes here or on Celery workers): "
        "each takes that share of a vendor's max_concurrency; with Redis, all of them keep "
        "the vendor's rate limit together. The multiprocess executor's max_concurrent counts "
        "by itself; set this for Celery (its workers' concurrency, all told).",
    )
    always_guard: bool = Field(
        default=False,
        description="With Redis on Postgres: take the Postgres advisory lock behind every "
        "Redis lock, and meet in SQL too, so a process that loses Redis while others keep it "
        "never buys again what they are buying (~0.4 ms of CPU per call). Off: the database's "
        "lock is taken only while Redis is down, after waiting out purchases under Redis locks.",
    )
    cache_ttl_by_provider: dict[str, float] = Field(
        default={},
        description="Seconds the Redis tier keeps an answer, by provider name (others: 7 days); "
        "a miss never outlives its provider's TTL (at most 6 hours).",
    )

    _providers: list[Provider] | None = PrivateAttr(default=None)

    def providers(self, steps_at_once: int = 1) -> list[Provider]:
        """The waterfall's providers, loaded once per process (circuit breakers and rate limits
        live as long as the run). Each takes its share of a vendor's `max_concurrency` for the
        larger of `concurrent_steps` and `steps_at_once` (what the run's executor runs at once,
        `executors.steps_at_once`; the first call's count holds for the process)."""
        if self._providers is None:
            self._providers = load_providers(
                self.config_file,
                redis_url=redis_url(self.redis_url),
                processes=max(self.concurrent_steps, steps_at_once),
            )
        return self._providers

    def sharing(self, store: Store, *, side_by_side: bool = False) -> AnswerSharing:
        """The tiered cache and single-flight for one step; close it (a context manager).
        `side_by_side`: the run's steps run in processes of their own (not in process)."""
        settings = SharingSettings(
            redis_ttl_by_provider={
                name: timedelta(seconds=seconds)
                for name, seconds in self.cache_ttl_by_provider.items()
            },
            always_guard=self.always_guard,
        )
        return open_answer_sharing(
            store, redis_url(self.redis_url), settings=settings, side_by_side=side_by_side
        )


class ProgressChannel(ConfigurableResource):
    """Live progress on Redis pub/sub (`redis_url`, else GLAZE_REDIS_URL; none: silent).

    Channels are `<prefix>:request:<id>` and `<prefix>:table:<id>`; `prefix`, else
    GLAZE_PROGRESS_PREFIX when a publisher opens, else `glaze` on Redis db 0 and `glaze:db<N>`
    on db N (pub/sub is server-wide: environments on one server must not hear each other).
    """

    redis_url: str | None = None
    prefix: str | None = None

    def resolved_prefix(self) -> str:
        return resolve_prefix(redis_url(self.redis_url), self.prefix)

    def request_channel(self, request_id: str) -> str:
        """Where a subscriber hears one request's events."""
        return request_channel(self.resolved_prefix(), request_id)

    def table_channel(self, table_id: str) -> str:
        """Where a subscriber hears the events of every request on one table."""
        return table_channel(self.resolved_prefix(), table_id)

    @contextmanager
    def publisher(self) -> Iterator[ProgressPublisher]:
        publisher = open_progress(redis_url(self.redis_url), self.prefix)
        try:
            yield publisher
        finally:
            publisher.close()


class PreEnrichment(ConfigurableResource):
    """The pre-enrich schedule's budget cap per table, in provider cost units.

    `budget`, else GLAZE_PRE_ENRICH_BUDGET read when the schedule is evaluated, else 100.
    """

    budget: float | None = None

    def resolved_budget(self) -> float:
        return pre_enrich_budget(self.budget)


STALE_AFTER_ENV = "GLAZE_STALE_AFTER_SECONDS"
DEFAULT_STALE_AFTER = timedelta(minutes=5)


class RequestLiveness(ConfigurableResource):
    """How long a running request may stay silent before the reconciler fails it.

    `stale_after_seconds`, else GLAZE_STALE_AFTER_SECONDS read when the reconciler ticks, else
    300. A job beats every second in every phase, so minutes of silence mean its worker died.
    """

    stale_after_seconds: float | None = None

    def stale_after(self) -> timedelta:
        """The silence that fails a request; a bad value raises, naming where it came from."""
        value = non_negative_setting(
            self.stale_after_seconds,
            STALE_AFTER_ENV,
            label="stale_after_seconds",
            unit=" of seconds",
        )
        return DEFAULT_STALE_AFTER if value is None else timedelta(seconds=value)


class LanguageModel(ConfigurableResource):
    """The LLM that AI jobs and AI columns ask (OpenAI-compatible Chat Completions).

    Each setting, else its GLAZE_LLM_* variable read when a step asks for it (never at import):
    `base_url` (GLAZE_LLM_BASE_URL), `model` (GLAZE_LLM_MODEL), `api_key` (GLAZE_LLM_API_KEY).
    A job that needs no LLM never reads them, so none is required to enrich.
    """

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None

    def settings(self) -> "LlmSettings":
        """The resolved settings; LlmConfigError names the variable that is missing or bad."""
        from glaze_pipeline.core.ai.client import LlmSettings

        env = dict(os.environ)
        for name, value in (
            ("GLAZE_LLM_BASE_URL", self.base_url),
            ("GLAZE_LLM_MODEL", self.model),
            ("GLAZE_LLM_API_KEY", self.api_key),
        ):
            if value is not None:
                env[name] = value
        return LlmSettings.from_env(env)
