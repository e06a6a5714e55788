"""Who may do what: API keys for the app, a session cookie for a person, a public token per job.

* An **API key** (`Authorization: Bearer <key>`) may do everything. Keys come from
  `GLAZE_API_KEYS` (comma-separated) or the file `GLAZE_API_KEYS_FILE` (one per line, `#`
  comments). With no key configured the API is open, and `glaze serve` binds loopback only.
* A **session cookie** stands for a key in a browser: `GET /login?token=...` (the one-time
  link `glaze serve` prints, Jupyter-style) sets it, HttpOnly and SameSite=Strict, so the
  page's JavaScript never holds a key.
* A **public job token** (seed 004's `publicAccessToken`) is a JWT that can only *read* one job
  (its status, its progress stream): another job, another table or any write is refused (403),
  an expired or tampered one too (401). It is safe to hand to a browser.

Every token is an HS256 JWT signed with `GLAZE_TOKEN_SECRET`, or with a secret generated once
under `GLAZE_HOME` (mode 0600) when that is unset. Keys and the secret are registered with
`core.redact`, so an error message that quotes one never shows it; the server's access log
drops the query string (`?token=`) of every line (`server.py`).
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import jwt
from fastapi import Depends, HTTPException, Query, Request, status

from glaze_pipeline.core.errors import ConfigError
from glaze_pipeline.core.redact import register_secret
from glaze_pipeline.core.settings import glaze_home

API_KEYS_ENV = "GLAZE_API_KEYS"
API_KEYS_FILE_ENV = "GLAZE_API_KEYS_FILE"
TOKEN_SECRET_ENV = "GLAZE_TOKEN_SECRET"
TOKEN_TTL_ENV = "GLAZE_TOKEN_TTL_S"
MAX_UPLOAD_ENV = "GLAZE_MAX_UPLOAD_MB"
SSE_POLL_ENV = "GLAZE_SSE_POLL_MS"
SSE_HEARTBEAT_ENV = "GLAZE_SSE_HEARTBEAT_S"

SESSION_COOKIE = "glaze_session"
ALGORITHM = "HS256"
JOB_SCOPE = "job:read"
SESSION_SCOPE = "session"
LOGIN_SCOPE = "login"
DEFAULT_TOKEN_TTL_S = 3600
SESSION_TTL_S = 7 * 24 * 3600
LOGIN_TTL_S = 24 * 3600
DEFAULT_MAX_UPLOAD_MB = 50


@dataclass(frozen=True)
class ApiSettings:
    """What the API reads from its environment, once, at start."""

    api_keys: frozenset[str] = frozenset()
    token_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    heartbeat_s: float = 15.0
    # Without Redis the stream reads the job's row this often (a primary-key read): the
    # latency from a job's start to its `running` event.
    poll_s: float = 0.2

    @property
    def open(self) -> bool:
        """No key configured: anyone who can reach the server may use it (loopback only)."""
        return not self.api_keys

    @classmethod
    def from_env(cls) -> ApiSettings:
        keys = _keys_from_env()
        for key in keys:
            register_secret(key)
        secret = os.environ.get(TOKEN_SECRET_ENV, "").strip() or _stored_secret()
        register_secret(secret)
        return cls(
            api_keys=keys,
            token_secret=secret,
            token_ttl_s=_positive_int(TOKEN_TTL_ENV, DEFAULT_TOKEN_TTL_S),
            max_upload_bytes=_positive_int(MAX_UPLOAD_ENV, DEFAULT_MAX_UPLOAD_MB) * 1024 * 1024,
            heartbeat_s=float(_positive_int(SSE_HEARTBEAT_ENV, 15)),
            poll_s=_positive_int(SSE_POLL_ENV, 200) / 1000,
        )


def _keys_from_env() -> frozenset[str]:
    keys = {k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()}
    path = os.environ.get(API_KEYS_FILE_ENV, "").strip()
    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError(
                f"{API_KEYS_FILE_ENV}: cannot read {path}: {error.strerror or error}"
            ) from error
        keys.update(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    short = [k for k in keys if len(k) < 16]
    if short:
        raise ConfigError(f"API keys must be at least 16 characters ({len(short)} shorter)")
    return frozenset(keys)


def _stored_secret() -> str:
    """The token secret kept under GLAZE_HOME, made on first use (readable by its owner only)."""
    path = glaze_home() / "token_secret"
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(secret)
    return secret


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, not {value}")
    return value


class TokenError(Exception):
    """A token that does not grant what was asked: `status` is 401 (not valid) or 403 (not
    for this)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class JobClaims:
    job_id: str
    table_id: str


class TokenSigner:
    """Issues and checks the API's JWTs (job, session and login tokens)."""

    def __init__(self, secret: str, *, job_ttl_s: int = DEFAULT_TOKEN_TTL_S) -> None:
        self._secret = secret
        self.job_ttl_s = job_ttl_s
        self._used_logins: set[str] = set()
        self._lock = threading.Lock()

    def _issue(self, claims: dict[str, object], ttl_s: int) -> tuple[str, datetime]:
        now = int(time.time())
        token = jwt.encode(
            {**claims, "iat": now, "exp": now + ttl_s}, self._secret, algorithm=ALGORITHM
        )
        return token, datetime.fromtimestamp(now + ttl_s, UTC)

    def _decode(self, token: str, scope: str) -> dict[str, object]:
        try:
            claims: dict[str, object] = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "iat", "scope"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError(401, "the token has expired") from None
        except jwt.InvalidTokenError:
            raise TokenError(401, "the token is not valid") from None
        if claims.get("scope") != scope:
            raise TokenError(403, f"the token does not grant {scope}")
        return claims

    def issue_job_token(self, job_id: str, table_id: str) -> tuple[str, datetime]:
        """A token that reads job `job_id` of table `table_id` only, for `job_ttl_s`."""
        return self._issue({"sub": job_id, "tbl": table_id, "scope": JOB_SCOPE}, self.job_ttl_s)

    def job_claims(self, token: str) -> JobClaims:
        claims = self._decode(token, JOB_SCOPE)
        return JobClaims(str(claims.get("sub", "")), str(claims.get("tbl", "")))

    def issue_session(self) -> tuple[str, datetime]:
        return self._issue({"scope": SESSION_SCOPE}, SESSION_TTL_S)

    def valid_session(self, token: str) -> bool:
        try:
            self._decode(token, SESSION_SCOPE)
        except TokenError:
            return False
        return True

    def issue_login(self) -> str:
        """A login link's token: good once (per server process), for a day."""
        token, _ = self._issue({"scope": LOGIN_SCOPE, "jti": secrets.token_hex(8)}, LOGIN_TTL_S)
        return token

    def redeem_login(self, token: str) -> None:
        """Accept a login token once; raises TokenError when it is invalid or used."""
        claims = self._decode(token, LOGIN_SCOPE)
        jti = str(claims.get("jti", ""))
        with self._lock:
            if jti in self._used_logins:
                raise TokenError(401, "this login link was already used: run glaze serve's again")
            self._used_logins.add(jti)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def _is_key(settings: ApiSettings, candidate: str) -> bool:
    # Compare against every key, always: the time taken says nothing about which one matched.
    found = False
    for key in settings.api_keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def has_full_access(request: Request) -> bool:
    """An API key, a session cookie, or an open (key-less) server."""
    settings: ApiSettings = request.app.state.settings
    if settings.open:
        return True
    bearer = _bearer(request)
    if bearer is not None and _is_key(settings, bearer):
        return True
    cookie = request.cookies.get(SESSION_COOKIE)
    signer: TokenSigner = request.app.state.signer
    return cookie is not None and signer.valid_session(cookie)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def require_key(request: Request) -> None:
    """Dependency: the caller holds an API key (or the session cookie, or the server is open)."""
    if has_full_access(request):
        return
    if _bearer(request) is None and SESSION_COOKIE not in request.cookies:
        raise _unauthorized("an API key is required (Authorization: Bearer <key>)")
    bearer = _bearer(request)
    if bearer is not None:
        signer: TokenSigner = request.app.state.signer
        try:
            signer.job_claims(bearer)
        except TokenError:
            pass
        else:  # a valid job token, used for something it does not grant
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, detail="a job token can only read its own job"
            )
    raise _unauthorized("the API key or session is not valid")


def job_reader(
    request: Request,
    job_id: str,
    token: Annotated[str | None, Query(description="The job's publicAccessToken.")] = None,
) -> None:
    """Dependency for reading one job: full access, or a public token for *this* job.

    A token that is presented is always checked, even on an open server, so that a token for
    another job is refused there too. The table in the path, when there is one, must be the
    token's."""
    presented = token
    bearer = _bearer(request)
    signer: TokenSigner = request.app.state.signer
    settings: ApiSettings = request.app.state.settings
    if presented is None and bearer is not None and not _is_key(settings, bearer):
        presented = bearer
    if presented is None:
        if has_full_access(request):
            return
        raise _unauthorized("an API key or the job's publicAccessToken is required")
    try:
        claims = signer.job_claims(presented)
    except TokenError as error:
        raise HTTPException(error.status_code, detail=str(error)) from None
    table_id = request.path_params.get("table_id")
    if claims.job_id != job_id or (table_id is not None and claims.table_id != table_id):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="this token is for another job")


RequireKey = Depends(require_key)
ReadJob = Depends(job_reader)
