"""API keys and `${VAR}` placeholders from the environment, read at call time, never at import."""

from __future__ import annotations

import os
import re

from glaze_pipeline.core.errors import ConfigError
from glaze_pipeline.core.providers.base import CredentialsMissing
from glaze_pipeline.core.redact import clean_secret


def read_secret(env_var: str, *, provider: str) -> str:
    """An API key from the environment, read at call time: checked, stripped, registered for
    redaction. A missing or unusable one is `CredentialsMissing` for this provider (its message
    names the variable, never the value); `load_secret` reports the same at load time."""
    try:
        value = load_secret(env_var, provider=provider)
    except ConfigError as error:
        raise CredentialsMissing(str(error), provider=provider) from None
    if value is None:
        raise CredentialsMissing(
            f"{provider}: API key missing: set the environment variable {env_var}",
            provider=provider,
        )
    return value


def secret_problem(env_var: str, *, provider: str) -> str | None:
    """Why the key in `env_var` cannot be used (without the provider's name), or None.

    Cheap and without I/O: the waterfall asks before every lookup.
    """
    try:
        read_secret(env_var, provider=provider)
    except CredentialsMissing as error:
        return str(error).removeprefix(f"{provider}: ")
    return None


def load_secret(env_var: str, *, provider: str) -> str | None:
    """The key in `env_var` as it can be sent (see `redact.clean_secret`), None when unset.

    Raises ConfigError for a key that cannot be sent (a control or non-ASCII character).
    """
    raw = os.environ.get(env_var, "")
    value = clean_secret(raw, provider=provider, env_var=env_var) if raw else ""
    return value or None


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """Replace `${VAR}` and `${VAR:-default}` with values from the environment (at call time)."""

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found:
            return found
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set and has no default")

    return _ENV_RE.sub(value, text)
