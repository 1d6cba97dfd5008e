"""HTML for clinicians and patients: jinja2 with autoescape, no CDN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    enable_async=False,
    # Templates ship with the code: no stat() of the file on every page.
    auto_reload=False,
)


def page(template: str, status: int = 200, **context: Any) -> web.Response:
    body = TEMPLATES.get_template(template).render(**context)
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": (
                "default-src 'self'; style-src 'self' 'unsafe-inline';"
                " script-src 'self' 'unsafe-inline'; media-src 'self' blob: mediastream:;"
                " frame-ancestors *"
            ),
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        },
    )


def problem_page(status: int, title: str, message: str) -> web.Response:
    return page("problem.html", status=status, title=title, message=message)


def redirect(location: str) -> web.Response:
    """A 302, returned rather than raised. `web.HTTPFound` writes a text body, parses its
    location again with yarl (14 us for an authorize URL) and, raised, goes through every
    middleware's exception path: about 40 us of the two redirects of a launch. `location`
    must already be a valid header value: one of our paths, or a URL yarl normalised."""
    return web.Response(status=302, headers={"Location": location})
