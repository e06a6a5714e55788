"""An LLM client for OpenAI-compatible Chat Completions (OpenAI, vLLM, Ollama, llama.cpp).

httpx directly rather than the `openai` package: one HTTP stack in the engine, our own retry
policy (the package has its own, which would multiply ours), `Retry-After` honoured as the
providers honour it, and the exact token counts of every attempt, failed ones included.

Retries: timeouts, connection errors, 408, 429 (waiting what `Retry-After` says, capped by
`max_backoff_s`) and 5xx, up to `max_attempts`; then `AIJobError(retryable=True)`. Any other
4xx (a bad request, a refused key, an unknown model) fails at once: `AIJobError(retryable=False)`.
Every HTTP attempt reaches `on_call` as one `LlmCall` (a row of `llm_calls`), whatever its end.

The API key is sent as a Bearer token, registered for redaction (see `core.redact`), and never
appears in an error or a log line.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from glaze_pipeline.core.ai.errors import AIJobError
from glaze_pipeline.core.errors import ConfigError
from glaze_pipeline.core.providers.http import USER_AGENT, parse_retry_after
from glaze_pipeline.core.redact import clean_secret, redact

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# How much of a refusing server's body goes into the error: enough to act on.
ERROR_DETAIL_CHARS = 300
DEFAULT_MODEL = "glaze-mock-1"


class LlmConfigError(ConfigError):
    """A missing or invalid GLAZE_LLM_* setting; the message names the variable."""


@dataclass(frozen=True)
class LlmSettings:
    """Where the LLM is and how to talk to it; `from_env` reads the GLAZE_LLM_* variables."""

    base_url: str
    model: str = DEFAULT_MODEL
    api_key: str | None = field(default=None, repr=False)  # never in a log line
    timeout_s: float = 30.0  # per attempt
    max_attempts: int = 4  # 1 = no retry
    backoff_s: float = 0.5
    max_backoff_s: float = 20.0
    price_input_per_1k: float = 0.0  # credits per 1,000 prompt tokens
    price_output_per_1k: float = 0.0  # credits per 1,000 completion tokens
    price_per_answer: float = 1.0  # credits per AI cell answer, the job's budget unit
    max_tokens: int = 4000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LlmSettings:
        """The settings from GLAZE_LLM_* variables (`env`, else the process environment).

        GLAZE_LLM_BASE_URL is required; GLAZE_LLM_MODEL, GLAZE_LLM_API_KEY,
        GLAZE_LLM_TIMEOUT_SECONDS, GLAZE_LLM_MAX_ATTEMPTS, GLAZE_LLM_PRICE_INPUT,
        GLAZE_LLM_PRICE_OUTPUT and GLAZE_LLM_PRICE_PER_ANSWER are optional. A bad value is an LlmConfigError naming its variable.
        """
        env = os.environ if env is None else env
        base_url = (env.get("GLAZE_LLM_BASE_URL") or "").strip()
        if not base_url:
            raise LlmConfigError(
                "GLAZE_LLM_BASE_URL is not set: give the base URL of an OpenAI-compatible "
                "server, e.g. http://127.0.0.1:8766/v1 (`glaze mock-llm` serves one)"
            )
        check_base_url(base_url, "GLAZE_LLM_BASE_URL")
        api_key: str | None = None
        raw_key = env.get("GLAZE_LLM_API_KEY") or ""
        if raw_key:
            try:
                api_key = clean_secret(raw_key, provider="llm", env_var="GLAZE_LLM_API_KEY")
            except ConfigError as error:
                raise LlmConfigError(str(error)) from None
        return cls(
            base_url=base_url.rstrip("/"),
            model=(env.get("GLAZE_LLM_MODEL") or "").strip() or DEFAULT_MODEL,
            api_key=api_key or None,
            timeout_s=_number(env, "GLAZE_LLM_TIMEOUT_SECONDS", 30.0, minimum=0.001),
            max_attempts=int(_number(env, "GLAZE_LLM_MAX_ATTEMPTS", 4, minimum=1, whole=True)),
            price_input_per_1k=_number(env, "GLAZE_LLM_PRICE_INPUT", 0.0, minimum=0.0),
            price_output_per_1k=_number(env, "GLAZE_LLM_PRICE_OUTPUT", 0.0, minimum=0.0),
            price_per_answer=_number(env, "GLAZE_LLM_PRICE_PER_ANSWER", 1.0, minimum=0.0),
        )

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Credits for one call's tokens, at the configured prices."""
        return round(
            prompt_tokens * self.price_input_per_1k / 1000
            + completion_tokens * self.price_output_per_1k / 1000,
            6,
        )


def check_base_url(url: str, variable: str) -> str:
    """An http(s) URL with a host, else an LlmConfigError naming `variable`."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise LlmConfigError(
            f"{variable} must be an http(s) URL such as http://127.0.0.1:8766/v1, got {url!r}"
        )
    return url


def _number(
    env: Mapping[str, str], variable: str, default: float, *, minimum: float, whole: bool = False
) -> float:
    raw = (env.get(variable) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise LlmConfigError(f"{variable} must be {kind}, got {raw!r}") from None
    if not value >= minimum:  # also refuses NaN
        raise LlmConfigError(f"{variable} must be at least {minimum:g}, got {raw!r}")
    if not math.isfinite(value):  # an infinite price or timeout is a typo, not a setting
        raise LlmConfigError(f"{variable} must be a finite number, got {raw!r}")
    return value


@dataclass(frozen=True)
class LlmCall:
    """One HTTP attempt: one row of the `llm_calls` table."""

    operation: str
    prompt_version: str
    model: str
    attempt: int
    outcome: str  # "ok" | "retried" (a retryable failure, tried again) | "failed"
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency_ms: float
    error: str | None = None


@dataclass(frozen=True)
class Completion:
    """The answer of one `complete`: its tokens and cost (a failed attempt reports none), and
    how many HTTP attempts it took."""

    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    attempts: int


@dataclass(frozen=True)
class _Answer:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int


class _Failure(Exception):
    """One failed attempt: why, whether another may succeed, how long to wait first."""

    def __init__(self, reason: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class LlmClient:
    """Chat Completions over HTTP, with bounded retries and a record of every attempt.

    async with LlmClient(LlmSettings.from_env(), on_call=record) as client:
        completion = await client.complete(messages, operation=..., prompt_version=...)

    `sleep` and `rng` (the backoff's jitter) are injected so tests assert the waits.
    """

    def __init__(
        self,
        settings: LlmSettings,
        *,
        on_call: Callable[[LlmCall], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._on_call = on_call
        self._sleep = sleep
        self._transport = transport
        self._rng = rng or random.Random()
        # One httpx client per event loop: its pooled connections belong to the loop that
        # opened them (the engine runs each step under its own `asyncio.run`).
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> LlmClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json"}
            if self.settings.api_key:
                headers["Authorization"] = f"Bearer {self.settings.api_key}"
            self._client = httpx.AsyncClient(
                base_url=self.settings.base_url.rstrip("/") + "/",
                headers=headers,
                timeout=httpx.Timeout(self.settings.timeout_s),
                transport=self._transport,
                follow_redirects=False,
                trust_env=False,
            )
            self._loop = loop
        return self._client

    async def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        operation: str,
        prompt_version: str,
        json_output: bool = True,
        max_tokens: int | None = None,
    ) -> Completion:
        """One chat completion, retried on retryable failures; raises AIJobError."""
        settings = self.settings
        body: dict[str, Any] = {
            "model": settings.model,
            "messages": [dict(message) for message in messages],
            "temperature": 0,
            "max_tokens": max_tokens or settings.max_tokens,
        }
        if json_output:
            body["response_format"] = {"type": "json_object"}
        attempts = max(1, settings.max_attempts)
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            try:
                answer = await self._attempt(body)
            except _Failure as failure:
                last = attempt == attempts or not failure.retryable
                self._record(
                    LlmCall(
                        operation=operation,
                        prompt_version=prompt_version,
                        model=settings.model,
                        attempt=attempt,
                        outcome="failed" if last else "retried",
                        prompt_tokens=0,
                        completion_tokens=0,
                        cost=0.0,
                        latency_ms=_ms_since(started),
                        error=redact(failure.reason),
                    )
                )
                if not failure.retryable:
                    raise AIJobError(
                        f"LLM {operation} failed: {failure.reason}", retryable=False
                    ) from None
                if last:
                    raise AIJobError(
                        f"LLM {operation} failed after {attempts} attempts: {failure.reason}",
                        retryable=True,
                    ) from None
                await self._sleep(self._wait(attempt, failure.retry_after))
                continue
            # A failed attempt has no usage to report, so the answer's is the completion's.
            cost = settings.cost(answer.prompt_tokens, answer.completion_tokens)
            self._record(
                LlmCall(
                    operation=operation,
                    prompt_version=prompt_version,
                    model=answer.model,
                    attempt=attempt,
                    outcome="ok",
                    prompt_tokens=answer.prompt_tokens,
                    completion_tokens=answer.completion_tokens,
                    cost=cost,
                    latency_ms=_ms_since(started),
                )
            )
            return Completion(
                text=answer.text,
                model=answer.model,
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=answer.completion_tokens,
                cost=cost,
                attempts=attempt,
            )
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    def _record(self, call: LlmCall) -> None:
        if self._on_call is not None:
            self._on_call(call)

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        """What the server asked for, else exponential backoff with jitter; both capped."""
        cap = self.settings.max_backoff_s
        if retry_after is not None:
            return min(retry_after, cap)
        base = min(cap, self.settings.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + 0.5 * self._rng.random())

    async def _attempt(self, body: Mapping[str, Any]) -> _Answer:
        """One POST to /chat/completions, bounded by `timeout_s` as a whole."""
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                response = await self._http().post("chat/completions", json=body)
        except (TimeoutError, httpx.TimeoutException):
            raise _Failure(
                f"no answer within {self.settings.timeout_s:g}s", retryable=True
            ) from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as error:
            raise _Failure(f"connection failed ({_describe(error)})", retryable=True) from None
        except httpx.HTTPError as error:  # an unusable URL, a protocol the server cannot speak
            raise _Failure(f"request failed ({_describe(error)})", retryable=False) from None
        status = response.status_code
        if status != 200:
            detail = _detail(response)
            said = f": {detail}" if detail else ""
            if status in RETRYABLE_STATUSES or status >= 500:
                raise _Failure(
                    f"HTTP {status}{said}",
                    retryable=True,
                    retry_after=parse_retry_after(response.headers.get("retry-after")),
                )
            hint = " (check GLAZE_LLM_API_KEY)" if status in (401, 403) else ""
            raise _Failure(f"HTTP {status}{hint}{said}", retryable=False)
        return _parse_answer(response, asked_model=body["model"])


def _parse_answer(response: httpx.Response, *, asked_model: str) -> _Answer:
    """The text and usage of a Chat Completions answer; a body of another shape is refused.
    A server that does not name its model is taken to have used `asked_model`."""
    try:
        payload = response.json()
        message = payload["choices"][0]["message"]
        text = message.get("content") or ""
        if not isinstance(text, str):
            raise TypeError("content is not a string")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise _Failure(
            f"the server's answer is not a Chat Completions response ({_excerpt(response.text)})",
            retryable=False,
        ) from None
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    model = payload.get("model") if isinstance(payload.get("model"), str) else ""
    return _Answer(
        text=text,
        model=model or asked_model,
        prompt_tokens=_tokens(usage.get("prompt_tokens"), response.request.content.decode()),
        completion_tokens=_tokens(usage.get("completion_tokens"), text),
    )


def _tokens(reported: Any, text: str) -> int:
    """The server's count; a server that reports none gets the usual estimate (4 chars/token)."""
    if isinstance(reported, int) and not isinstance(reported, bool) and reported >= 0:
        return reported
    return len(text) // 4 + 1


def _detail(response: httpx.Response) -> str:
    """The message of an error answer (OpenAI's `{"error": {"message": ...}}` or the body)."""
    try:
        payload = response.json()
    except ValueError:
        return _excerpt(response.text)
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return _excerpt(error["message"])
    if isinstance(error, str):
        return _excerpt(error)
    return _excerpt(response.text)


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    cut = text[:ERROR_DETAIL_CHARS] + ("..." if len(text) > ERROR_DETAIL_CHARS else "")
    return redact(cut)


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
