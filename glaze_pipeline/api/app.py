"""The app's HTTP API (seed 001 and 002 endpoints), on FastAPI.

The API never runs a job: it checks a request, writes it to the queue (`enrichment_requests`)
and answers 202 at once; the launcher or the queue sensor runs it, exactly as for a request
the app would write itself. Everything else here reads state (tables, rows, jobs, the cells a
job wrote) or makes a user's edit. Bad input is refused with a 4xx that names it, before
anything is written.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.datastructures import UploadFile
from starlette.types import Message

from glaze_pipeline.api import ai, auth, pages, realtime
from glaze_pipeline.api.models import (
    CellBody,
    ColumnBody,
    ColumnOut,
    EnrichBody,
    EnrichResponse,
    ErrorOut,
    Health,
    JobOut,
    JobToken,
    Page,
    RowOut,
    TableOut,
    TableSummary,
    TaskOut,
)
from glaze_pipeline.api.views import job_out, seed_status
from glaze_pipeline.core import queue
from glaze_pipeline.core.engine import resolve_target
from glaze_pipeline.core.errors import (
    CsvImportError,
    InputError,
    NotFoundError,
    ServiceUnavailableError,
    UnknownColumnError,
    UnknownRequestError,
)
from glaze_pipeline.core.models import (
    TERMINAL_REQUEST_STATUSES,
    CellStatus,
    RequestKind,
    RequestStatus,
    Selection,
)
from glaze_pipeline.core.progress import ProgressPublisher, open_progress
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.schema import EnrichmentRequest
from glaze_pipeline.core.settings import redis_url
from glaze_pipeline.core.store import ColumnDef, ColumnInfo, Store

MAX_LIMIT = 500
# The importer's advice names the CLI's options; an upload has form fields instead.
UPLOAD_TERMS = {"--encoding ": "encoding=", "--name": "the 'name' field"}
ESTIMATE_WAIT_MAX_S = 60.0

PageNumber = Annotated[int, Query(ge=1, le=1_000_000, description="1-based page number.")]


def _limit(default: int) -> Any:
    return Query(default, ge=1, le=MAX_LIMIT, description=f"Items per page (<= {MAX_LIMIT}).")


def create_app(
    store: Store,
    settings: auth.ApiSettings | None = None,
    *,
    publisher: ProgressPublisher | None = None,
) -> FastAPI:
    """The API over `store`. `publisher` announces cancels to realtime subscribers (default:
    Redis when `GLAZE_REDIS_URL` is set, else nothing)."""
    settings = settings or auth.ApiSettings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.publisher.close()

    app = FastAPI(
        title="Glaze pipeline API",
        version="1.0",
        description=(
            "Tables, rows and enrichment jobs (seed 001 and 002 endpoints). Every endpoint but "
            "`/health`, the page and the realtime stream needs `Authorization: Bearer <API key>` "
            "when the server has keys; a job's `publicAccessToken` reads that job only."
        ),
        lifespan=lifespan,
        dependencies=[Depends(_plain_path_ids)],
    )
    app.state.store = store
    app.state.settings = settings
    app.state.signer = auth.TokenSigner(settings.token_secret, job_ttl_s=settings.token_ttl_s)
    app.state.publisher = publisher or open_progress(redis_url())

    for error_type, code in (
        (NotFoundError, status.HTTP_404_NOT_FOUND),
        (InputError, status.HTTP_422_UNPROCESSABLE_CONTENT),
        (ServiceUnavailableError, status.HTTP_503_SERVICE_UNAVAILABLE),
    ):
        app.add_exception_handler(error_type, _error_handler(code))
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)

    app.include_router(_public_routes())
    app.include_router(
        _api_routes(),
        dependencies=[auth.RequireKey],
        responses=_errors(400, 401, 403, 404, 422),
    )
    app.include_router(_job_read_routes(), responses=_errors(401, 403, 404, 422))
    app.include_router(
        ai.ai_routes(), dependencies=[auth.RequireKey], responses=_errors(400, 401, 403, 404, 422)
    )
    app.include_router(ai.ai_read_routes(), responses=_errors(401, 403, 404, 422))
    app.include_router(_table_route(), responses=_errors(401, 404))
    app.include_router(realtime.router)
    app.include_router(pages.router)
    return app


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error that quotes what the caller sent
    (a lone surrogate, say) is still a valid answer, never a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


ERROR_MEANING = {
    400: "A body that is not JSON (or not UTF-8) at all.",
    401: "No valid API key, session or token.",
    403: "A job token used for something it does not grant.",
    404: "An unknown table, column, row or job id (named in `detail`).",
    413: "The upload is larger than GLAZE_MAX_UPLOAD_MB.",
    415: "The upload is not multipart/form-data.",
    422: "A malformed request (`detail` lists each field) or input that cannot be used.",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut, "description": ERROR_MEANING[code]} for code in codes}


def _error_handler(code: int) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(_request: Request, error: Exception) -> Response:
        return AsciiJSONResponse({"detail": str(error)}, status_code=code)

    return handle


async def _invalid_request(_request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    return AsciiJSONResponse(
        {"detail": jsonable_encoder(error.errors())},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


async def _http_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    return AsciiJSONResponse(
        {"detail": error.detail}, status_code=error.status_code, headers=error.headers
    )


def _plain_path_ids(request: Request) -> None:
    """An id with a NUL in it cannot exist (Postgres' text cannot even hold one): 404, as
    any unknown id, before a query is made with it."""
    for name, value in request.path_params.items():
        if "\x00" in value:
            kind = name.removesuffix("_id").replace("_", " ")
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"unknown {kind} {value!r}")


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


# -- public: health, login ------------------------------------------------------------------


def _public_routes() -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=Health, tags=["meta"])
    def health() -> Health:
        return Health(status="ok")

    @router.get("/login", include_in_schema=False)
    def login(request: Request, token: str = "", next: str = "/") -> Response:
        """Trade a one-time login link's token for a session cookie (the page's sign-in)."""
        signer: auth.TokenSigner = request.app.state.signer
        try:
            signer.redeem_login(token)
        except auth.TokenError as error:
            raise HTTPException(error.status_code, detail=str(error)) from None
        # Only a path on this server: never an open redirect.
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        response = RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)
        session, expires = signer.issue_session()
        response.set_cookie(
            auth.SESSION_COOKIE,
            session,
            expires=expires,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    return router


# -- tables, rows, columns, enrich, jobs -------------------------------------------------------


def _api_routes() -> APIRouter:
    router = APIRouter()

    @router.get("/tables", response_model=Page[TableSummary], tags=["tables"])
    def list_tables(
        request: Request, page: PageNumber = 1, limit: int = _limit(50)
    ) -> Page[TableSummary]:
        records, total = _store(request).table_records(offset=(page - 1) * limit, limit=limit)
        return Page(
            items=[TableSummary.model_validate(r) for r in records],
            page=page,
            limit=limit,
            total=total,
        )

    @router.post(
        "/tables",
        response_model=TableOut,
        status_code=status.HTTP_201_CREATED,
        tags=["tables"],
        responses=_errors(413, 415),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {
                                "file": {"type": "string", "format": "binary"},
                                "name": {"type": "string", "maxLength": 200},
                                "encoding": {
                                    "type": "string",
                                    "maxLength": 40,
                                    "description": "The file's text encoding when it is not "
                                    "UTF-8 and has no byte-order mark (e.g. cp1252).",
                                },
                            },
                        }
                    }
                },
            }
        },
    )
    async def create_table(request: Request) -> TableOut:
        """Create a table from an uploaded CSV (header row = columns), streamed to disk with a
        size limit (413 beyond it); all or nothing."""
        from glaze_pipeline.core.importer import import_csv

        settings: auth.ApiSettings = request.app.state.settings
        form = await _limited_form(request, settings.max_upload_bytes)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT,
                    detail="the body needs a CSV file in the form field 'file'",
                )
            unknown = sorted(set(form.keys()) - {"file", "name", "encoding"})
            if unknown:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT,
                    detail=f"unknown form fields: {', '.join(map(repr, unknown[:5]))} "
                    "(the body takes 'file', and optionally 'name' and 'encoding')",
                )
            name, encoding = form.get("name"), form.get("encoding")
            for label, given in (("name", name), ("encoding", encoding)):
                if given is not None and not isinstance(given, str):
                    raise HTTPException(
                        status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"'{label}' must be text"
                    )
            stem = Path(upload.filename or "upload.csv").stem or "upload"
            with tempfile.TemporaryDirectory(prefix="glaze-upload-") as folder:
                path = Path(folder) / "upload.csv"
                with path.open("wb") as out:
                    await run_in_threadpool(shutil.copyfileobj, upload.file, out)
                try:
                    imported = await run_in_threadpool(
                        partial(
                            import_csv,
                            _store(request),
                            path,
                            name=name or stem,
                            encoding=encoding or None,
                        )
                    )
                except CsvImportError as error:  # named by the file the user sent, in its terms
                    detail = str(error).replace(str(path), repr(upload.filename or "the upload"))
                    for cli, form_field in UPLOAD_TERMS.items():
                        detail = detail.replace(cli, form_field)
                    raise HTTPException(
                        status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail
                    ) from None
        finally:
            await form.close()
        return await run_in_threadpool(_table_out, _store(request), imported.table.id)

    @router.post(
        "/tables/{table_id}/columns",
        response_model=ColumnOut,
        status_code=status.HTTP_201_CREATED,
        tags=["tables"],
    )
    def add_column(request: Request, table_id: str, body: ColumnBody) -> ColumnOut:
        column = _store(request).add_column(
            table_id,
            ColumnDef(
                body.key,
                body.label or "",
                field=body.field,
                data_type=body.data_type,
                prompt=body.prompt,
            ),
        )
        return _column_out(column)

    @router.get("/tables/{table_id}/rows", response_model=Page[RowOut], tags=["tables"])
    def list_rows(
        request: Request, table_id: str, page: PageNumber = 1, limit: int = _limit(100)
    ) -> Page[RowOut]:
        store = _store(request)
        record = store.table_records(table_id=table_id)[0][0]
        rows = store.row_page(table_id, offset=(page - 1) * limit, limit=limit)
        return Page(
            items=[RowOut.model_validate(r) for r in rows],
            page=page,
            limit=limit,
            total=record.row_count,
        )

    @router.put(
        "/tables/{table_id}/rows/{row_id}/cells/{column_id}",
        response_model=RowOut,
        tags=["tables"],
    )
    def edit_cell(
        request: Request, table_id: str, row_id: str, column_id: str, body: CellBody
    ) -> RowOut:
        """A user's edit of one cell: its `meta` says `source: user` (no engine outcome), and the
        row's status follows. A running job never overwrites it: the job's write is a
        compare-and-set and keeps a cell that changed since it was read."""
        store = _store(request)
        column = _column(store, table_id, column_id)
        store.full_row(table_id, row_id)  # 404 for a row of another table
        store.edit_cell(row_id, column.key, body.value, provenance=True)
        return RowOut.model_validate(store.full_row(table_id, row_id))

    @router.post(
        "/tables/{table_id}/enrich",
        response_model=EnrichResponse,
        status_code=status.HTTP_202_ACCEPTED,
        tags=["enrich"],
    )
    def enrich(request: Request, table_id: str, body: EnrichBody) -> EnrichResponse:
        """Queue an enrichment job (seed 001): grid `{columnIds, rowIds}`, explicit
        `{cellIds}` or `{wholeTable: true}`. Answers at once; the job runs in the background."""
        return _enqueue(request, table_id, body, RequestKind.ENRICH)

    @router.post(
        "/v2/tables/{table_id}/enrich",
        response_model=EnrichResponse,
        status_code=status.HTTP_202_ACCEPTED,
        tags=["enrich"],
    )
    def enrich_v2(request: Request, table_id: str, body: EnrichBody) -> EnrichResponse:
        """Seed 002's entity-first endpoint: the same job (every job here is entity-first)."""
        return _enqueue(request, table_id, body, RequestKind.ENRICH)

    @router.post(
        "/v2/tables/{table_id}/enrich/estimate",
        response_model=JobOut,
        responses={202: {"model": JobOut, "description": "Still running: poll or subscribe."}},
        tags=["enrich"],
    )
    def estimate(
        request: Request,
        response: Response,
        table_id: str,
        body: EnrichBody,
        wait: Annotated[float, Query(ge=0, le=ESTIMATE_WAIT_MAX_S)] = 10.0,
    ) -> JobOut:
        """What this selection would buy, buying nothing: unique entities, cache hits, and
        per provider its preflight verdict (`status`, `reason`), the expected calls and cost
        with their basis (observed shares, or a stated prior without history) and the upper
        bound (`maxCalls`, `maxCost`: every lookup a charged miss, which no run exceeds).
        `budgetGuidance` and `guidance` say which budget fills what share of the cells.

        Runs as an `estimate` job; answers 200 with `estimate` when it ends within `wait`
        seconds, else 202 with the job to follow."""
        queued = _enqueue(request, table_id, body, RequestKind.ESTIMATE)
        requests = RequestRepository(_store(request))
        deadline = time.monotonic() + wait
        while True:
            job = requests.get(queued.job_id)
            if RequestStatus(job.status) in TERMINAL_REQUEST_STATUSES:
                return job_out(job)
            if time.monotonic() >= deadline:
                response.status_code = status.HTTP_202_ACCEPTED
                return job_out(
                    job,
                    public_access_token=queued.public_access_token,
                    token_expires_at=queued.token_expires_at,
                )
            time.sleep(0.1)

    @router.get("/tables/{table_id}/enrich/jobs", response_model=Page[JobOut], tags=["jobs"])
    def list_jobs(
        request: Request, table_id: str, page: PageNumber = 1, limit: int = _limit(20)
    ) -> Page[JobOut]:
        store = _store(request)
        store.get_table(table_id)
        jobs, total = RequestRepository(store).for_table(
            table_id, offset=(page - 1) * limit, limit=limit
        )
        return Page(items=[job_out(j) for j in jobs], page=page, limit=limit, total=total)

    @router.get(
        "/tables/{table_id}/enrich/jobs/{job_id}/tasks",
        response_model=Page[TaskOut],
        tags=["jobs"],
    )
    def list_tasks(
        request: Request,
        table_id: str,
        job_id: str,
        status: CellStatus | None = None,
        page: PageNumber = 1,
        limit: int = _limit(50),
    ) -> Page[TaskOut]:
        """The job's cells and how each ended, read from the rows' `meta` (filter by status)."""
        store = _store(request)
        job = _job(store, table_id, job_id)
        info = store.get_table(table_id)
        by_key = {c.key: c for c in info.columns}
        row_ids = _named_rows(job)
        start, end = (page - 1) * limit, page * limit
        items: list[TaskOut] = []
        total = 0
        for row, key, cell in store.job_cells(table_id, job_id, row_ids=row_ids):
            if status is not None and cell.get("status") != status.value:
                continue
            if start <= total < end:
                column = by_key.get(key)
                items.append(
                    TaskOut(
                        row_id=row.id,
                        column_id=column.id if column else "",
                        column_key=key,
                        status=str(cell.get("status")),
                        value=row.data.get(key),
                        confidence=cell.get("confidence"),
                        source=cell.get("source"),
                        error=cell.get("error"),
                        fetched_at=cell.get("fetched_at"),
                    )
                )
            total += 1
        return Page(items=items, page=page, limit=limit, total=total)

    @router.post(
        "/tables/{table_id}/enrich/jobs/{job_id}/token",
        response_model=JobToken,
        tags=["jobs"],
    )
    def job_token(request: Request, table_id: str, job_id: str) -> JobToken:
        """A new public token for a job (e.g. a page opened while the job runs subscribes)."""
        _job(_store(request), table_id, job_id)
        signer: auth.TokenSigner = request.app.state.signer
        token, expires = signer.issue_job_token(job_id, table_id)
        return JobToken(job_id=job_id, public_access_token=token, token_expires_at=expires)

    @router.post(
        "/tables/{table_id}/enrich/jobs/{job_id}/cancel",
        response_model=JobOut,
        status_code=status.HTTP_202_ACCEPTED,
        tags=["jobs"],
    )
    def cancel(request: Request, table_id: str, job_id: str) -> JobOut:
        """Stop a job: a queued one ends at once, a running one within seconds (it writes what
        it bought; the cells it never reached stay as they were). An ended job is left as is."""
        store = _store(request)
        job = _job(store, table_id, job_id)
        if RequestStatus(job.status) not in TERMINAL_REQUEST_STATUSES:
            queue.request_cancel(store, job_id, request.app.state.publisher)
        return job_out(RequestRepository(store).get(job_id))

    return router


# -- reading one job: an API key or that job's public token ------------------------------------


def _job_read_routes() -> APIRouter:
    router = APIRouter(dependencies=[auth.ReadJob])

    @router.get("/tables/{table_id}/enrich/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    def get_job(request: Request, table_id: str, job_id: str) -> JobOut:
        """Status, progress (0-100), counters, cost, timestamps and error of one job."""
        return job_out(_job(_store(request), table_id, job_id))

    @router.get("/v2/tables/{table_id}/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    def get_job_v2(request: Request, table_id: str, job_id: str) -> JobOut:
        """Seed 002's job view (`entityCount`, `processedCount`, `cost`, `estimate`)."""
        return job_out(_job(_store(request), table_id, job_id))

    return router


def _table_route() -> APIRouter:
    """`GET /tables/{id}`: JSON for an app, the grid page for a browser (Accept: text/html)."""
    router = APIRouter()

    @router.get("/tables/{table_id}", response_model=TableOut, tags=["tables"])
    def get_table(request: Request, table_id: str) -> Response | TableOut:
        """The table and its columns; a browser asking for HTML gets the grid page (the page
        loads its data through the API, so it needs no key to be served)."""
        if _wants_html(request):
            return pages.table_page(request, table_id)
        auth.require_key(request)
        return _table_out(_store(request), table_id)

    return router


def _wants_html(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    html = accept.find("text/html")
    json_at = accept.find("application/json")
    return html >= 0 and (json_at < 0 or html < json_at)


# -- helpers ----------------------------------------------------------------------------------


def _enqueue(
    request: Request, table_id: str, body: EnrichBody, kind: RequestKind
) -> EnrichResponse:
    """Check the selection against the table (404/422 naming the problem), count its cells, and
    queue it: nothing is written for a selection that is refused."""
    store = _store(request)
    selection = body.selection()
    target = resolve_target(store, table_id, Selection.model_validate(selection))
    row_ids = _selected_rows(selection)
    if row_ids:
        store.check_rows(table_id, row_ids)
    if body.cell_ids:
        total = len({(c.row_id, c.column_id) for c in body.cell_ids})
    elif body.whole_table:  # the empty cells of every mapped column: what the job fills
        total = store.count_empty_cells(table_id, [c.key for c in target.columns])
    else:
        rows = len(set(body.row_ids)) if body.row_ids else store.count_rows(table_id)
        total = len(target.columns) * rows
    job_id = RequestRepository(store).enqueue(
        table_id,
        selection,
        kind=kind,
        budget=body.budget,
        idempotency_key=body.idempotency_key,
        cells_total=total,
    )
    job = RequestRepository(store).get(job_id)
    signer: auth.TokenSigner = request.app.state.signer
    token, expires = signer.issue_job_token(job_id, table_id)
    what = "estimate" if kind is RequestKind.ESTIMATE else "enrichment"
    return EnrichResponse(
        job_id=job_id,
        table_id=table_id,
        status=seed_status(job.status),  # an idempotent replay answers the job as it is now
        total_tasks=job.cells_total,
        message=f"Queued {what} of {job.cells_total} cells",
        run_id=job.run_id,
        public_access_token=token,
        token_expires_at=expires,
    )


def _selected_rows(selection: dict[str, Any]) -> list[str]:
    if selection.get("cells"):
        return list(dict.fromkeys(c["row_id"] for c in selection["cells"]))
    return list(selection.get("row_ids") or [])


def _named_rows(job: EnrichmentRequest) -> list[str] | None:
    selection = job.selection if isinstance(job.selection, dict) else {}
    try:
        return _selected_rows(selection) or None
    except (KeyError, TypeError):
        return None


def _job(store: Store, table_id: str, job_id: str) -> EnrichmentRequest:
    try:
        job = RequestRepository(store).get(job_id)
    except UnknownRequestError:
        job = None
    if job is None or job.table_id != table_id:
        store.get_table(table_id)  # an unknown table is named as such
        raise UnknownRequestError(f"unknown job {job_id!r} in table {table_id}")
    return job


def _column(store: Store, table_id: str, column_id: str) -> ColumnInfo:
    column = store.get_table(table_id).column_by_id().get(column_id)
    if column is None:
        raise UnknownColumnError(f"unknown column id in table {table_id}: {column_id}")
    return column


def _column_out(column: ColumnInfo) -> ColumnOut:
    spec = column.spec()
    return ColumnOut(
        id=column.id,
        key=column.key,
        label=column.label,
        data_type=column.data_type,
        field=str(spec.field) if spec.field is not None and spec.prompt is None else None,
        position=column.position,
        prompt=column.prompt,
    )


def _table_out(store: Store, table_id: str) -> TableOut:
    record = store.table_records(table_id=table_id)[0][0]
    info = store.get_table(table_id)
    return TableOut(
        **TableSummary.model_validate(record).model_dump(),
        columns=[_column_out(c) for c in info.columns],
    )


async def _limited_form(request: Request, limit: int) -> Any:
    """Parse a multipart body, refusing it (413) as soon as more than `limit` bytes arrived:
    the whole upload is never held in memory, nor read past the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            detail=f"the upload is larger than the limit of {limit // (1024 * 1024)} MB",
        )
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(
                    status.HTTP_413_CONTENT_TOO_LARGE,
                    detail=f"the upload is larger than the limit of {limit // (1024 * 1024)} MB",
                )
        return message

    limited = Request(request.scope, receive)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail="upload the CSV as multipart/form-data (field 'file')",
        )
    try:
        return await limited.form(max_files=1, max_fields=10)
    except HTTPException:
        raise
    except Exception as error:  # a malformed multipart body
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"malformed multipart body: {error}"
        ) from None
