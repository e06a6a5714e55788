"""One ConfigurableResource per external system. Nothing here reads the environment at import."""

from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

from glaze_pipeline.core.cache import AnswerCache, MemoryCache, TieredCache
from glaze_pipeline.core.cache_sql import SqlAnswerCache
from glaze_pipeline.core.models import EntityType
from glaze_pipeline.core.providers.base import Provider
from glaze_pipeline.core.providers.fake import FakeProvider
from glaze_pipeline.core.settings import database_url
from glaze_pipeline.core.store import Store


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

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        # Close pooled connections when the run (or step process) ends.
        if self._store is not None:
            self._store.dispose()
            self._store = None


class EnrichmentProviders(ConfigurableResource):
    """The provider waterfall and its cache tiers.

    `config_file` names the providers YAML (else GLAZE_PROVIDERS_FILE, else the bundled fake
    providers); `redis_url` adds the shared Redis tier (else GLAZE_REDIS_URL, else none).
    """

    config_file: str | None = None
    redis_url: str | None = None

    def providers(self) -> list[Provider]:
        return _default_providers()

    def cache(self, store: Store) -> AnswerCache:
        return TieredCache([MemoryCache(), SqlAnswerCache(store)])


def _default_providers() -> list[Provider]:
    return [FakeProvider(EntityType.COMPANY), FakeProvider(EntityType.PERSON)]
