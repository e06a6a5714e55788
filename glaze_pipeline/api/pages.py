"""The Glaze grid page: `GET /` (the tables), `GET /tables/{tableId}` (one table), `/static/*`.

The pages are static shells: every byte of data reaches them through the same JSON API an app
uses (the session cookie or an open server), so a shell needs no auth and holds no secret. The
table page reads its table id from its own URL. Nothing loads from the internet: the Content
Security Policy allows this origin only, so a stray CDN link fails loudly in development.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).parent / "static"

# The only files served from STATIC_DIR, with their types: a fixed list, so no path a caller
# sends can name another file.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a page URL never carries a token, but be sure
    "Cache-Control": "no-cache",  # revalidate: a new version of the page shows at once
}

router = APIRouter(include_in_schema=False)


def _page(name: str) -> HTMLResponse:
    """One of the HTML shells, read at request time (small; edits show without a restart)."""
    html = (STATIC_DIR / name).read_text(encoding="utf-8")
    return HTMLResponse(html, headers=SECURITY_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
def tables_page() -> HTMLResponse:
    """The tables list: name, rows, created, a link to each grid, a CSV upload form."""
    return _page("index.html")


def table_page(request: Request, table_id: str) -> HTMLResponse:
    """The grid of one table (called by the JSON route when the browser prefers text/html).

    The shell is the same for every table, known or not: the script asks the API for the
    table and shows the API's answer (a 404 names the missing table).
    """
    del request, table_id  # the script reads both from the page's own URL and the API
    return _page("table.html")


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
def static_asset(name: str) -> FileResponse:
    """The page's script and stylesheet."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no static file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=SECURITY_HEADERS)
