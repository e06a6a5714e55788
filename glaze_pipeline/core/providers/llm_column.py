"""AI columns as one more provider: the LLM answers a column's question, once per entity.

One `AiColumnProvider` per AI column template in a job. Its only field is the column's `ai_`
field, so the waterfall asks it about each unique entity once (entity-first, like any field),
and the entity cache, keyed by entity and provider name, keeps the answer. The name stands for
the template, the prompt version and the model: a re-run with the same model buys nothing, a
new model or prompt version asks again.

Billing is the engine's, as for every provider: a flat credit price per answer
(`GLAZE_LLM_PRICE_PER_ANSWER`), reserved from the job's budget before the call and charged
only for an answer. What each HTTP attempt used in tokens goes to `llm_calls`: the provider
keeps its `LlmCall`s until the engine writes them at the end of each chunk.

The LLM client's own retries (429 honouring Retry-After, 5xx, timeouts) run inside one lookup;
what is left maps onto the provider errors: retryable -> TransientProviderError, anything else
(a refused request, an answer still invalid after repair) -> FatalProviderError. Neither is
charged.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable

import httpx

from glaze_pipeline.core.ai.client import AIJobError, LlmCall, LlmClient, LlmSettings
from glaze_pipeline.core.ai.columns import AI_FIELD_PREFIX, check_template, question_input
from glaze_pipeline.core.ai.prompts import Prompt, load_prompt
from glaze_pipeline.core.ai.structured import ask
from glaze_pipeline.core.ai.suggestions import AiColumnAnswer
from glaze_pipeline.core.detection import ColumnSpec
from glaze_pipeline.core.fields import FieldRef
from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.core.providers.base import (
    FatalProviderError,
    ProviderAnswer,
    ProviderUnavailable,
    TransientProviderError,
    Verdict,
)
from glaze_pipeline.core.providers.http import HttpSettings, probe_health

PROMPT_NAME = "ai_column"
DEFAULT_CONFIDENCE = 0.7
# Questions in flight per AI column and step: an LLM server is slower per call than a data
# vendor, and a self-hosted one serves a few at a time.
DEFAULT_CONCURRENCY = 8
PROBE_TIMEOUT_S = 5.0
PROVIDER_PREFIX = "llm_"


def provider_name(field: FieldRef, prompt_version: str, model: str) -> str:
    """`llm_<template digest>_<digest of prompt version and model>`: the entity cache's key
    for the answers, so they are reused for the same question, prompt and model only."""
    asked = hashlib.sha256(f"{prompt_version}\x1f{model}".encode()).hexdigest()[:8]
    return f"{PROVIDER_PREFIX}{field.name.removeprefix(AI_FIELD_PREFIX)}_{asked}"


class LlmCallLog:
    """The LLM attempts of one step, kept until the engine writes them to `llm_calls`.

    Appended to from the event loop (the client's `on_call`), taken from the step's thread.
    """

    def __init__(self) -> None:
        self._calls: list[LlmCall] = []
        self._lock = threading.Lock()

    def __call__(self, call: LlmCall) -> None:
        with self._lock:
            self._calls.append(call)

    def take(self) -> list[LlmCall]:
        with self._lock:
            calls, self._calls = self._calls, []
        return calls


class AiColumnProvider:
    """The LLM as the provider of one AI column's field (see the module docstring).

    Built without `client` when the LLM is not configured: it is then unavailable with
    `problem` as the reason (the preflight says so, the waterfall never asks it).
    """

    charges_misses = True  # tokens are spent whether or not the model knows the answer
    always_answers = True  # a model answers every question: the estimate's prior says so

    def __init__(
        self,
        template: str,
        field: FieldRef,
        *,
        prompt: Prompt,
        model: str,
        price: float,
        client: LlmClient | None = None,
        calls: LlmCallLog | None = None,
        problem: str | None = None,
        confidence: float = DEFAULT_CONFIDENCE,
        max_concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        if client is None and problem is None:
            raise ValueError("an AI column provider needs an LLM client or the reason it has none")
        self.template = check_template(template)
        self.field = field
        self.prompt = prompt
        self.model = model
        self.cost_per_call = price
        self.confidence = confidence
        self.max_concurrency = max_concurrency
        self.name = provider_name(field, prompt.version, model)
        self._client = client
        self._calls = calls
        self._problem = problem

    @property
    def entity_type(self) -> EntityType:
        return self.field.entity_type

    @property
    def fields(self) -> frozenset[str]:
        return frozenset({self.field.name})

    @property
    def source(self) -> str:
        """What a cell it filled records as its source: the provider, the model, the prompt."""
        return f"{self.name} ({self.model}, {self.prompt.version})"

    def unavailable_reason(self) -> str | None:
        return self._problem

    async def lookup(self, key: EntityKey, fields: frozenset[str]) -> ProviderAnswer:
        if self._client is None:
            raise ProviderUnavailable(self._problem or "no LLM configured", provider=self.name)
        try:
            result = await ask(
                self._client, self.prompt, question_input(self.template, key), AiColumnAnswer
            )
        except AIJobError as error:
            kind = TransientProviderError if error.retryable else FatalProviderError
            raise kind(str(error), provider=self.name) from None
        answer = result.value
        return ProviderAnswer(
            {self.field.name: answer.answer}, {self.field.name: answer.confidence}
        )

    async def preflight(self, *, probe: bool = True) -> Verdict:
        """Configured (GLAZE_LLM_BASE_URL set), then with `probe` one free GET {base_url}/models.
        Never raises."""
        if self._client is None:
            return Verdict(self.name, False, self._problem, ("configured",))
        if not probe:
            return Verdict(self.name, True, None, ("configured",))
        settings = self._client.settings
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        reason = await probe_health(
            settings.base_url,
            "models",
            settings=HttpSettings(),
            timeout_s=min(PROBE_TIMEOUT_S, settings.timeout_s),
            headers=headers,
            keyed=bool(settings.api_key),
        )
        return Verdict(self.name, reason is None, reason, ("configured", "probe"))

    def take_llm_calls(self) -> list[LlmCall]:
        """The attempts made since the last take (shared by the step's AI columns)."""
        return self._calls.take() if self._calls is not None else []

    async def aclose(self) -> None:
        """Close the client's connections of this event loop (the engine's provider_session)."""
        if self._client is not None:
            await self._client.aclose()


def ai_templates(columns: Iterable[ColumnSpec]) -> dict[FieldRef, str]:
    """The AI columns' templates by field: columns asking the same question share one."""
    return {
        column.field: column.prompt
        for column in columns
        if column.prompt is not None and column.field is not None
    }


def ai_column_providers(
    columns: Iterable[ColumnSpec],
    settings: LlmSettings | None,
    *,
    problem: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[AiColumnProvider]:
    """One provider per AI column template among `columns`, sharing one LLM client and one
    call log (a step's); none when there is no AI column.

    Without `settings` (the LLM is not configured) each is unavailable for `problem`, at the
    default price per answer (it is never asked, so never charged).
    """
    templates = ai_templates(columns)
    if not templates:
        return []
    prompt = load_prompt(PROMPT_NAME)
    if settings is None:
        reason = problem or "the LLM is not configured (GLAZE_LLM_BASE_URL)"
        model, price, client, calls = "", LlmSettings.price_per_answer, None, None
    else:
        reason, model, price = None, settings.model, settings.price_per_answer
        calls = LlmCallLog()
        client = LlmClient(settings, on_call=calls, transport=transport)
    return [
        AiColumnProvider(
            template,
            field,
            prompt=prompt,
            model=model,
            price=price,
            client=client,
            calls=calls,
            problem=reason,
        )
        for field, template in templates.items()
    ]
