"""A mock LLM: OpenAI-compatible Chat Completions on loopback, for development, tests and demos.

It answers Glaze's prompts deterministically: it reads the operation from the system
message's first line (`glaze-operation: <name>`) and the inputs from the JSON object between
`<input>` and `</input>` in the user message, and builds the answer from them alone, so the
same input always gets the same answer and a test knows what to expect:

- table_suggestions: a name and description from the context; "person" when it talks of people;
- column_suggestions: the identifier columns the table lacks, enrichment columns, two AI
  columns; never a key or field the table already has;
- row_suggestions: `count` companies or people with names, domains, LinkedIn URLs and emails
  built from syllables seeded by the context and the row's index, all distinct, none of
  `exclude`;
- ai_column: "yes" or "no" from a hash of the filled question.

Tokens are counted as len(text) // 4 + 1 (prompt: all the messages; completion: the answer).

Faults, queued with `POST /_faults` (a list; each for `times` requests, optionally only for one
`operation`), make it misbehave: `latency` (`delay_s`), `rate_limited` (429 with `Retry-After:
retry_after`), `error` (500), `bad_request` (400), `unauthorized` (401), `invalid_json` (200,
content that is not JSON), `wrong_shape` (valid JSON, wrong fields), `hang` (no answer for
`timeout_s`), `too_many_rows` (`rows_override` rows or columns, ignoring `count`), `no_rows`
(an empty list), `echo_context` (the context verbatim as a column key and label, and in a
row), `messy` (repeated, known, malformed and off-key rows; repeated, clashing and invalid
columns).

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /_stats, POST /_reset,
GET|POST /_faults, GET /_health. With `api_key`, chat and models answer 401 unless
`Authorization: Bearer <api_key>` is sent.

`MockLlmServer` runs it in a background thread on a free port; `serve()` runs it in the
foreground (`glaze mock-llm`).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from glaze_pipeline.testing import loopback

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8766
DEFAULT_MODEL = "glaze-mock-1"
OPERATION_PREFIX = "glaze-operation: "
MAX_COUNT = 100_000

FaultMode = Literal[
    "latency",
    "rate_limited",
    "error",
    "bad_request",
    "unauthorized",
    "invalid_json",
    "wrong_shape",
    "hang",
    "too_many_rows",
    "no_rows",
    "echo_context",
    "messy",
]


class Fault(BaseModel):
    """One queued misbehaviour, for the next `times` requests (of `operation`, when given)."""

    model_config = ConfigDict(extra="forbid")

    mode: FaultMode
    times: int = Field(default=1, ge=1)
    operation: str | None = None
    delay_s: float = Field(default=0.0, ge=0)  # latency
    retry_after: float | None = Field(default=1.0, ge=0)  # rate_limited; None: no header
    timeout_s: float = Field(default=30.0, ge=0)  # hang
    rows_override: int = Field(default=10_000, ge=0, le=MAX_COUNT)  # too_many_rows


_FAULTS = TypeAdapter(list[Fault])


# --- deterministic data --------------------------------------------------------------------

_SYLLABLES = (
    "ka", "lo", "mi", "no", "ra", "sol", "ve", "tri", "zen", "pay", "fin", "lum",
    "dor", "sa", "ton", "qui", "mar", "vik", "el", "ora", "bri", "nex", "ta", "lyn",
)  # fmt: skip
_COMPANY_SUFFIXES = ("", "", " Pay", " Labs", " Systems", " Group", " Finance", " Tech")
_TLDS = (".com", ".io", ".se", ".no", ".fi", ".dk", ".co")
_FIRST_NAMES = (
    "Ada", "Linnea", "Erik", "Sofia", "Mikko", "Ingrid", "Lars", "Maja", "Noah", "Elsa",
    "Oskar", "Freja", "Emil", "Aino", "Jonas", "Astrid", "Leo", "Saga", "Hugo", "Ella",
)  # fmt: skip
_LAST_NAMES = (
    "Lindqvist", "Berg", "Hansen", "Virtanen", "Nielsen", "Johansson", "Dahl", "Korhonen",
    "Larsen", "Holm", "Eriksson", "Lund", "Nyberg", "Salo", "Strand", "Bakke",
)  # fmt: skip
_PERSON_WORDS = re.compile(
    r"\b(people|person|persons|founders?|ceos?|ctos?|cfos?|vps?|heads?|engineers?|developers?|"
    r"managers?|directors?|executives?|buyers?|contacts?|leaders?|recruiters?|designers?)\b",
    re.IGNORECASE,
)


def _column(
    key: str, label: str, role: str, ref: str | None = None, kind: str = "text", prompt: str = ""
) -> dict[str, Any]:
    return {
        "key": key,
        "label": label,
        "data_type": kind,
        "role": role,
        "field": ref,
        "prompt": prompt or None,
    }


COMPANY_COLUMNS: tuple[dict[str, Any], ...] = (
    _column("company_name", "Company name", "identifier", "company.name"),
    _column("domain", "Domain", "identifier", "company.domain", "url"),
    _column("industry", "Industry", "enrichment", "company.industry"),
    _column("employee_count", "Employees", "enrichment", "company.employee_count", "number"),
    _column("location", "HQ location", "enrichment", "company.location"),
    _column("description", "Description", "enrichment", "company.description"),
    _column("linkedin_url", "LinkedIn", "enrichment", "company.linkedin_url", "url"),
    _column("revenue", "Revenue", "enrichment", "company.revenue", "number"),
    _column("founded_year", "Founded", "enrichment", "company.founded_year", "number"),
    _column("phone", "Phone", "enrichment", "company.phone"),
    _column(
        "sells_to_enterprise",
        "Sells to enterprises?",
        "ai",
        prompt="Does {company} ({domain}) sell to enterprises? Answer yes or no.",
    ),
    _column(
        "b2b_focus",
        "B2B focus?",
        "ai",
        prompt="Is {company} mainly a B2B business? Answer yes or no.",
    ),
    _column(
        "recent_funding",
        "Raised funding recently?",
        "ai",
        prompt="Has {company} ({domain}) raised funding in the last two years? Answer yes or no.",
    ),
)
PERSON_COLUMNS: tuple[dict[str, Any], ...] = (
    _column("full_name", "Full name", "identifier", "person.full_name"),
    _column("company", "Company", "identifier", "person.company"),
    _column("linkedin_url", "LinkedIn URL", "identifier", "person.linkedin_url", "url"),
    _column("email", "Email", "identifier", "person.email", "email"),
    _column("title", "Job title", "enrichment", "person.title"),
    _column("location", "Location", "enrichment", "person.location"),
    _column("company_industry", "Company industry", "enrichment", "company.industry"),
    _column("bio", "Bio", "enrichment", "person.bio"),
    _column("phone", "Phone", "enrichment", "person.phone"),
    _column(
        "decision_maker",
        "Decision maker?",
        "ai",
        prompt="Is {person} a decision maker for software purchases at {company}? Answer yes or no.",
    ),
    _column(
        "technical_role",
        "Technical role?",
        "ai",
        prompt="Does {full_name} of {company} hold a technical role? Answer yes or no.",
    ),
)
# Per suggestion: every missing identifier, then at most this many of the others.
ENRICHMENT_PER_ANSWER = 6
AI_PER_ANSWER = 2


def _digest(*parts: Any) -> bytes:
    return hashlib.sha256("|".join(str(part) for part in parts).encode()).digest()


def company_name(seed: str, index: int) -> str:
    """A real-looking company name, the same for the same seed and index."""
    digest = _digest("company", seed, index)
    syllables = 2 + digest[0] % 2
    word = "".join(_SYLLABLES[digest[1 + i] % len(_SYLLABLES)] for i in range(syllables))
    return word.capitalize() + _COMPANY_SUFFIXES[digest[5] % len(_COMPANY_SUFFIXES)]


def company_domain(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]", "", name.lower())
    return slug + _TLDS[_digest("tld", name)[0] % len(_TLDS)]


def person_name(seed: str, index: int) -> str:
    digest = _digest("person", seed, index)
    return (
        f"{_FIRST_NAMES[digest[0] % len(_FIRST_NAMES)]} {_LAST_NAMES[digest[1] % len(_LAST_NAMES)]}"
    )


def ai_answer(question: str) -> dict[str, Any]:
    """The mock's answer to one AI column question: yes or no, from a hash of the question."""
    digest = _digest("ai", question)
    return {
        "answer": "yes" if digest[0] % 2 == 0 else "no",
        "confidence": 0.5 + digest[1] % 50 / 100,
    }


# --- answers -------------------------------------------------------------------------------


def operation_of(messages: list[Any]) -> str:
    """The operation a request is for: the system message's first line names it."""
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "system":
            first = str(message.get("content") or "").split("\n", 1)[0].strip()
            if first.startswith(OPERATION_PREFIX):
                return first[len(OPERATION_PREFIX) :].strip()
    return "unknown"


def input_of(messages: list[Any]) -> dict[str, Any]:
    """The JSON object inside the last `<input>...</input>` of the user messages."""
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = str(message.get("content") or "")
        start, end = content.rfind("<input>"), content.rfind("</input>")
        if start != -1 and end > start:
            with suppress(ValueError):
                data = json.loads(content[start + len("<input>") : end])
                if isinstance(data, dict):
                    return data
    return {}


def answer_for(operation: str, data: Mapping[str, Any], fault: Fault | None = None) -> Any:
    """The JSON answer to one request (deterministic in the operation, input and fault)."""
    mode = fault.mode if fault is not None else None
    if operation == "table_suggestions":
        return _table_answer(data, mode)
    if operation == "column_suggestions":
        return _columns_answer(data, fault)
    if operation == "row_suggestions":
        return _rows_answer(data, fault)
    if operation == "ai_column":
        return ai_answer(str(data.get("template", "")))
    return {"answer": "ok"}


def _context(data: Mapping[str, Any]) -> str:
    return str(data.get("context") or "")


def _table(data: Mapping[str, Any]) -> Mapping[str, Any]:
    table = data.get("table")
    return table if isinstance(table, dict) else {}


def _entity_type(data: Mapping[str, Any]) -> str:
    given = _table(data).get("entity_type")
    if given in ("company", "person"):
        return str(given)
    return "person" if _PERSON_WORDS.search(_context(data)) else "company"


def _table_answer(data: Mapping[str, Any], mode: str | None) -> dict[str, Any]:
    context = _context(data)
    entity_type = _entity_type(data)
    if mode == "echo_context":
        name = context[:80]
    else:
        words = re.findall(r"[\w'-]+", context)[:6]
        name = " ".join(words)[:80] or "Untitled table"
        name = name[0].upper() + name[1:]
    kind = "People" if entity_type == "person" else "Companies"
    description = f"{kind} that match: {' '.join(context.split())}"
    return {"name": name, "description": description[:500], "entity_type": entity_type}


def _columns_answer(data: Mapping[str, Any], fault: Fault | None) -> dict[str, Any]:
    entity_type = _entity_type(data)
    pool = PERSON_COLUMNS if entity_type == "person" else COMPANY_COLUMNS
    if fault is not None and fault.mode == "no_rows":
        return {"columns": []}
    existing = _table(data).get("columns")
    existing = existing if isinstance(existing, list) else []
    taken = {str(c.get(name)) for c in existing if isinstance(c, dict) for name in ("key", "field")}
    taken |= {str(c.get("prompt")) for c in existing if isinstance(c, dict) and c.get("prompt")}
    fresh = [c for c in pool if not {c["key"], c.get("field"), c.get("prompt")} & taken]
    identifiers = [c for c in fresh if c["role"] == "identifier"]
    enrichment = [c for c in fresh if c["role"] == "enrichment"][:ENRICHMENT_PER_ANSWER]
    ai = [c for c in fresh if c["role"] == "ai"][:AI_PER_ANSWER]
    columns: list[Any] = [dict(c) for c in identifiers + enrichment + ai]
    mode = fault.mode if fault is not None else None
    if mode == "echo_context":
        context = _context(data)
        columns.append({"key": context, "label": context, "role": "enrichment", "field": context})
    elif mode == "too_many_rows":
        assert fault is not None
        placeholder = "{person}" if entity_type == "person" else "{company}"
        columns += [
            {
                "key": f"signal_{n}",
                "label": f"Signal {n}",
                "role": "ai",
                "prompt": f"Does {placeholder} show buying signal {n}? Answer yes or no.",
            }
            for n in range(1, fault.rows_override + 1)
        ]
    elif mode == "messy":
        columns += [
            *columns[:2],  # repeated
            *[dict(c) for c in pool if c["role"] == "identifier"],  # maybe the table's own
            *[dict(c) for c in existing[:2] if isinstance(c, dict)],  # the table's own
            {"key": "Bad Key!", "label": "Bad key", "role": "enrichment", "field": "company.name"},
            {
                "key": "favourite_colour",
                "label": "Colour",
                "role": "enrichment",
                "field": "company.favourite_colour",
            },
            {
                "key": "ceo_salary",
                "label": "CEO salary",
                "role": "ai",
                "prompt": "What does the CEO of {company} earn in {currency}?",
            },
            "not a column",
        ]
    return {"columns": columns}


def _id_columns(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    found = data.get("identifier_columns")
    columns = [
        (str(c["key"]), str(c.get("field") or ""))
        for c in (found if isinstance(found, list) else [])
        if isinstance(c, dict) and c.get("key")
    ]
    if columns:
        return columns
    pool = PERSON_COLUMNS if _entity_type(data) == "person" else COMPANY_COLUMNS
    return [(c["key"], c["field"]) for c in pool if c["role"] == "identifier"]


def _candidate(entity_type: str, seed: str, index: int) -> dict[str, str]:
    """Everything the mock knows of its index-th entity for a context, by field."""
    name = company_name(seed, index)
    domain = company_domain(name)
    slug = re.sub(r"[^a-z0-9]", "-", name.lower()).strip("-")
    values = {
        "company.name": name,
        "company.domain": domain,
        "company.linkedin_url": f"https://www.linkedin.com/company/{slug}",
    }
    if entity_type == "person":
        full_name = person_name(seed, index)
        first, last = full_name.lower().split(" ", 1)
        tag = _digest("tag", seed, index).hex()[:4]
        values |= {
            "person.full_name": full_name,
            "person.company": name,
            "person.linkedin_url": f"https://www.linkedin.com/in/{first}-{last}-{tag}",
            "person.email": f"{first}.{last}@{domain}",
        }
    return values


def _identities(values: Mapping[str, str]) -> set[str]:
    """How a table may know the entity already: bare values and EntityKey ids."""
    found = {
        f"{ref.split('.')[0]}:{kind}:{value}"
        for ref, kind, value in (
            ("company.domain", "domain", values["company.domain"]),
            ("person.email", "email", values.get("person.email")),
            ("person.linkedin_url", "linkedin", _slug(values.get("person.linkedin_url"))),
            ("company.linkedin_url", "linkedin", _slug(values["company.linkedin_url"])),
        )
        if value
    }
    return found | {key.split(":", 2)[2] for key in found}


def _slug(url: str | None) -> str | None:
    return url.rstrip("/").rsplit("/", 1)[1] if url else None


def _rows_answer(data: Mapping[str, Any], fault: Fault | None) -> dict[str, Any]:
    mode = fault.mode if fault is not None else None
    if mode == "no_rows":
        return {"rows": []}
    entity_type = _entity_type(data)
    columns = _id_columns(data)
    context = _context(data)
    count = data.get("count")
    count = count if isinstance(count, int) and not isinstance(count, bool) else 10
    if mode == "too_many_rows" and fault is not None:
        count = fault.rows_override
    count = max(0, min(count, MAX_COUNT))
    exclude = {str(item) for item in data.get("exclude") or [] if isinstance(item, str)}
    rows: list[Any] = []
    seen: set[str] = set()
    index = 0
    while len(rows) < count and index < count * 3 + 100:
        values = _candidate(entity_type, context, index)
        index += 1
        identities = _identities(values) | {values["company.name"].lower()}
        if entity_type == "person":
            identities.add(values["person.full_name"].lower())
        if identities & seen or identities & exclude:
            continue
        seen |= identities
        rows.append({key: values[ref] for key, ref in columns if ref in values})
    # The bad rows come first, so that a client keeping `count` rows meets them.
    if mode == "echo_context":
        rows.insert(0, {key: context for key, _ in columns} | {context: context})
    elif mode == "messy":
        domain_key = next((key for key, ref in columns if ref == "company.domain"), None)
        bad: list[Any] = [dict(row) for row in rows[:3]]  # repeated
        if domain_key is not None:
            known = [
                item.rsplit(":", 1)[-1]
                for item in sorted(exclude)
                if "@" not in item and "." in item and "linkedin" not in item
            ][:2]
            bad += [{domain_key: value} for value in known]  # rows the table has
            bad.append({domain_key: "not a domain"})
        bad += [{"favourite_colour": "blue"}, 42, {columns[0][0]: ["not", "text"]}]
        rows = rows[:3] + bad + rows[3:]
    return {"rows": rows}


# --- state ---------------------------------------------------------------------------------


@dataclass
class _Counters:
    requests: int = 0
    by_operation: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class MockLlmState(loopback.Pauses):
    """Faults and counters, shared by the server thread and the thread that reads them."""

    def __init__(self, *, api_key: str | None = None) -> None:
        super().__init__()
        self.api_key = api_key
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._counters = _Counters()

    def add_faults(self, faults: list[Fault]) -> None:
        with self._lock:
            self._faults.extend(fault.model_copy() for fault in faults)

    def pending_faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return [fault.model_dump() for fault in self._faults]

    def take_fault(self, operation: str) -> Fault | None:
        """The first queued fault for `operation` (one use of it), or None."""
        with self._lock:
            for position, fault in enumerate(self._faults):
                if fault.operation in (None, operation):
                    if fault.times <= 1:
                        del self._faults[position]
                    else:
                        self._faults[position] = fault.model_copy(update={"times": fault.times - 1})
                    self._counters.faults[fault.mode] += 1
                    return fault
        return None

    def arrive(self, operation: str) -> None:
        """Count a chat request as it arrives (a hung one is counted before it answers)."""
        with self._lock:
            self._counters.requests += 1
            self._counters.by_operation[operation] += 1

    def answered(self, status: int, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            counters = self._counters
            counters.statuses[str(status)] += 1
            counters.prompt_tokens += prompt_tokens
            counters.completion_tokens += completion_tokens

    def snapshot(self) -> dict[str, Any]:
        """The body of `GET /_stats`: chat requests in all, by operation and status, tokens."""
        with self._lock:
            c = self._counters
            return {
                "requests": c.requests,
                "by_operation": dict(c.by_operation),
                "statuses": dict(c.statuses),
                "faults_applied": dict(c.faults),
                "faults_pending": len(self._faults),
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens,
            }

    def reset(self) -> None:
        """Zero the counters and drop the queued faults."""
        with self._lock:
            self._counters = _Counters()
            self._faults.clear()


# --- the app -------------------------------------------------------------------------------


def tokens(text: str) -> int:
    return len(text) // 4 + 1


def _error(
    status: int, message: str, kind: str, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": None}},
        status_code=status,
        headers=dict(headers or {}),
    )


def create_app(state: MockLlmState | None = None) -> Starlette:
    """The mock LLM as an ASGI app (`state` lets the caller read counters without HTTP)."""
    state = state or MockLlmState()

    def authorised(request: Request) -> bool:
        return state.api_key is None or request.headers.get("authorization") == (
            f"Bearer {state.api_key}"
        )

    async def chat(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            state.arrive("unknown")
            state.answered(400, 0, 0)
            return _error(
                400, "the body must be JSON with a list of messages", "invalid_request_error"
            )
        operation = operation_of(messages)
        state.arrive(operation)
        response = await _chat(state, body, messages, operation, authorised(request))
        usage = json.loads(bytes(response.body))["usage"] if response.status_code == 200 else {}
        state.answered(
            response.status_code, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        )
        return response

    async def models(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "invalid or missing API key", "invalid_request_error")
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": DEFAULT_MODEL, "object": "model", "owned_by": "glaze"}],
            }
        )

    async def stats(request: Request) -> Response:
        return JSONResponse(state.snapshot())

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse(state.snapshot())

    async def faults(request: Request) -> Response:
        if request.method == "POST":
            try:
                body = await request.json()
                if isinstance(body, dict):
                    body = body.get("faults", [body])
                state.add_faults(_FAULTS.validate_python(body))
            except (ValueError, ValidationError) as error:
                return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse({"faults": state.pending_faults()})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models),
            Route("/_stats", stats),
            Route("/_reset", reset, methods=["POST"]),
            Route("/_faults", faults, methods=["GET", "POST"]),
            Route("/_health", health),
        ]
    )
    app.state.mock = state
    return app


async def _chat(
    state: MockLlmState,
    body: Mapping[str, Any],
    messages: list[Any],
    operation: str,
    authorised: bool,
) -> Response:
    if not authorised:
        return _error(401, "invalid or missing API key", "invalid_request_error")
    fault = state.take_fault(operation)
    mode = fault.mode if fault is not None else None
    if fault is not None and mode == "latency":
        await state.pause(fault.delay_s)
    if fault is not None and mode == "hang":
        await state.pause(fault.timeout_s)
        return _error(504, "hung up", "server_error")
    if fault is not None and mode == "rate_limited":
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        return _error(429, "rate limit reached, slow down", "rate_limit_error", headers)
    if mode == "error":
        return _error(500, "the model crashed", "server_error")
    if mode == "bad_request":
        return _error(400, "this request is not valid for the model", "invalid_request_error")
    if mode == "unauthorized":
        return _error(401, "invalid or missing API key", "invalid_request_error")
    if mode == "invalid_json":
        content = 'Sure! Here is the answer you asked for: {"name": "Acme", <oops>'
    elif mode == "wrong_shape":
        content = json.dumps({"result": "done", "items": 3, "name": ["not", "a", "string"]})
    else:
        content = json.dumps(answer_for(operation, input_of(messages), fault), ensure_ascii=False)
    prompt_text = "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
    prompt_tokens, completion_tokens = tokens(prompt_text), tokens(content)
    model = body.get("model") if isinstance(body.get("model"), str) else DEFAULT_MODEL
    return JSONResponse(
        {
            "id": "chatcmpl-" + _digest(model, prompt_text, content).hex()[:24],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model or DEFAULT_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


# --- running it ----------------------------------------------------------------------------


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    api_key: str | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Run the mock LLM in the foreground until interrupted (`glaze mock-llm`); `sock` as in
    `loopback.serve`."""
    state = MockLlmState(api_key=api_key)
    loopback.serve(create_app(state), host, port, sock=sock, on_stop=state.wake_sleepers)


class MockLlmServer(loopback.LoopbackServer):
    """The mock LLM on a free loopback port, in a background thread; a context manager.

    with MockLlmServer() as llm:
        llm.url                                   # "http://127.0.0.1:<port>/v1"
        llm.faults([{"mode": "rate_limited", "retry_after": 0.05, "times": 2}])
        llm.stats()["by_operation"]
    """

    def __init__(self, api_key: str | None = None, *, host: str = DEFAULT_HOST) -> None:
        self.state = MockLlmState(api_key=api_key)
        super().__init__(
            create_app(self.state), name="mock LLM", host=host, on_stop=self.state.wake_sleepers
        )

    @property
    def url(self) -> str:
        """The base URL a client is given (GLAZE_LLM_BASE_URL); `/_stats`, `/_reset` and
        `/_faults` are at `root_url`."""
        return f"{self.root_url}/v1"

    def faults(self, faults: list[Mapping[str, Any]]) -> None:
        """Queue faults for the next requests (see the module docstring for the modes)."""
        self.state.add_faults(_FAULTS.validate_python(list(faults)))

    def stats(self) -> dict[str, Any]:
        return self.state.snapshot()

    def reset(self) -> None:
        self.state.reset()
