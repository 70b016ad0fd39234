"""The dashboard's page: static files served by the ingress, no build step, nothing fetched from elsewhere.

`/` is the page, `/dashboard/...` its scripts, styles and the libraries it uses (ingress/static/vendor, each with
its version and licence in ingress/static/vendor/README.md). They hold no data, so anyone reaching the port gets
them; everything the page shows comes from /v1 routes behind the API key (ingress/live.py, ingress/audit.py and
the OpenAI ones), which the page calls with the key the user typed.

The Content-Security-Policy lets the page load scripts, styles and data only from this server, and be framed by
nobody. `'unsafe-eval'` is there for Alpine.js, which compiles its `x-` expressions with `new Function`; no inline
script runs, and the page puts what it receives into the document as text, never as HTML.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag) on each load: a new version is seen at once
}


class DashboardFiles(StaticFiles):
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


async def page(request):
    return FileResponse(STATIC / "index.html", headers=HEADERS)


def routes() -> list:
    return [Route("/", page, methods=["GET", "HEAD"]),
            Mount("/dashboard", app=DashboardFiles(directory=STATIC), name="dashboard")]
