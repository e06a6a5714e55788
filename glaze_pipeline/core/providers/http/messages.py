"""How errors and URLs read in messages: never a query (it can hold PII), never credentials."""

from __future__ import annotations

import os

import httpx


def url_path(url: str) -> str:
    """The path of a URL, without host or query: safe to show (queries can hold PII).

    Never raises: it names the URL in error messages, including "this URL is invalid".
    """
    if "://" in url:
        try:
            return httpx.URL(url).path
        except httpx.InvalidURL:
            url = "/" + url.split("://", 1)[1].partition("/")[2]
    return url.split("?", 1)[0].split("#", 1)[0]


def shown_url(base_url: str, path: str) -> str:
    """Where a request to `path` under `base_url` goes, without credentials in the URL."""
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL:
        return path
    host = f"[{url.host}]" if ":" in url.host else url.host
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{host}{port}{url.path.rstrip('/')}{path}"


def os_cause(error: BaseException) -> str:
    """The system's words for a failed connection ("Connection refused"), found under the
    layers httpx and anyio wrap it in ("All connection attempts failed"); else the error."""
    cause: BaseException | None = error
    for _ in range(20):  # a chain is short; a cycle must not hang a preflight
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    return describe_error(error)


def describe_error(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
