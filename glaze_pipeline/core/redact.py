"""Secrets: checked when they are read, and kept out of every error message and log line.

An API key reaches an error text in ways nobody writes on purpose: httpx (h11, really) quotes an
illegal header value whole (`Illegal header value b'sk-...\\n'`), a vendor's 401 body echoes
the key it refused, a decode error quotes what it could not read. So rather than trusting
every raiser, each secret the providers read is registered here, and `redact` replaces it (in
the forms an error text would show it: raw, repr-escaped, JSON-escaped, URL-quoted) and any
obvious credential (`Authorization: Bearer ...`, `X-Api-Key: ...`) with `***`.
`ProviderError` redacts its message when it is made, so nothing a provider raises, and nothing
stored or logged from it, carries a key.

The registry is process-wide on purpose: an error made anywhere (the waterfall, the engine, a
log line) must be cleaned of every key any provider of the process has read.
"""

from __future__ import annotations

import json
import re
import threading
from urllib.parse import quote

from glaze_pipeline.core.errors import ConfigError

REDACTED = "***"
# Shorter values are not redacted: replacing "ab" everywhere would garble every message, and a
# key that short protects nothing.
MIN_SECRET_LENGTH = 4

_lock = threading.Lock()
_registered: set[str] = set()
_forms: tuple[str, ...] = ()  # every form to replace, longest first (read without the lock)

# Credentials that announce themselves, whoever's they are. Each is a fixed word followed by
# one run of a bounded character class: linear in the text, whatever the text.
_CREDENTIAL_PATTERNS = (
    # `Authorization: Bearer x`, `x-api-key=x`, `"api_key": "x"`: keep the name, hide the value.
    re.compile(
        r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]?key|apikey|x-auth-token|"
        r"access[-_]?token|client[-_]?secret)(['\"]?\s*[:=]\s*['\"]?)"
        r"(?:(bearer|basic|token|digest)\s+)?[^\s,;&'\"]+"
    ),
    re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9\-._~+/]+=*"),
    # h11's "Illegal header value b'...'" quotes only the value, so any value it shows goes.
    re.compile(r"(?i)(illegal header value)(\s+)b?(?:'[^']{0,4096}'|\"[^\"]{0,4096}\")"),
)


def register_secret(value: str) -> None:
    """Make `redact` hide `value` (and the ways an error text would spell it) from now on."""
    if value in _registered:
        return
    global _forms
    with _lock:
        if value in _registered:
            return
        _registered.add(value)
        candidates = set(_forms)
        for text in {value, value.strip()}:
            if len(text) < MIN_SECRET_LENGTH:
                continue
            candidates.update(
                {
                    text,
                    repr(text)[1:-1],
                    repr(text.encode("utf-8", "backslashreplace"))[2:-1],
                    json.dumps(text)[1:-1],
                    json.dumps(text, ensure_ascii=False)[1:-1],
                    quote(text, safe=""),
                }
            )
        _forms = tuple(sorted(candidates, key=len, reverse=True))


def redact(text: str) -> str:
    """`text` with every registered secret and every obvious credential value as `***`."""
    for form in _forms:
        if form in text:
            text = text.replace(form, REDACTED)
    for pattern in _CREDENTIAL_PATTERNS:
        text = pattern.sub(_keep_name, text)
    return text


def _keep_name(match: re.Match[str]) -> str:
    scheme = match.group(3) + " " if match.re.groups >= 3 and match.group(3) else ""
    return f"{match.group(1)}{match.group(2)}{scheme}{REDACTED}"


def clean_secret(raw: str, *, provider: str, env_var: str) -> str:
    """The key `raw` as it can be sent: surrounding whitespace stripped, else refused.

    A trailing newline (`echo key > file`) is what people mean to leave out, so it goes. A
    control or non-ASCII character inside cannot be sent in a header (httpx would quote the
    whole key in its error): that is a ConfigError naming the provider and the variable, and
    where the character is, never the value.
    """
    register_secret(raw)
    value = raw.strip()
    for position, char in enumerate(value):
        if ord(char) < 0x20 or ord(char) == 0x7F:
            what = f"a control character (U+{ord(char):04X})"
        elif ord(char) > 0x7E:
            what = "a non-ASCII character"
        else:
            continue
        raise ConfigError(
            f"{provider}: the API key in {env_var} has {what} at position {position + 1}; "
            "a key must be printable ASCII"
        )
    return value
