"""How an AI operation fails: apart from the client, so the operations that only raise it (the
structured answers, the suggestions) depend on no HTTP library."""

from __future__ import annotations

from glaze_pipeline.core.errors import GlazeError
from glaze_pipeline.core.redact import redact


class AIJobError(GlazeError):
    """An AI operation that failed; `retryable` says whether trying again later may help.

    Seed 003's AIJobError: a rate limit or an outage is retryable, a refused request, a
    refused key or an answer that stays invalid after repair is not.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(redact(message))
        self.retryable = retryable
