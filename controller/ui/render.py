"""Rendering the dashboard: Jinja2 templates, the assets they load, and what every page knows.

Every page gets the CSP nonce of its response (for its `<script>` and `<link>` tags, each also
pinned by Subresource Integrity), the signed-in person, the CSRF token for its forms, and `can`,
which asks the access table whether that person may call a route: a link or a button the person
may not use is not rendered (and its route refuses it anyway).
"""

from __future__ import annotations

import json
import mimetypes
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from controller import access
from controller.db import utcnow
from controller.ui import vendor
from controller.ui.sessions import SignedIn

HERE = Path(__file__).parent
STATIC = HERE / "static"
OWN_ASSETS = ("app.js", "app.css")


@dataclass(frozen=True)
class Asset:
    path: str  # under /ui/static/
    data: bytes
    media_type: str
    integrity: str

    @property
    def url(self) -> str:
        # The digest in the URL lets browsers cache an asset for as long as it is the same bytes.
        return f"/ui/static/{self.path}?v={self.integrity[7:19]}"


def _load_assets() -> dict[str, Asset]:
    """Every file the controller serves under /ui/static: the vendored ones (checked) and its own."""
    assets = {}
    manifest = vendor.SERVED_MANIFEST
    for package in vendor.check(manifest):
        for f in package.files:
            path = f"vendor/{f.target}"
            media = mimetypes.guess_type(f.target)[0] or "text/plain"
            assets[path] = Asset(path, (manifest.parent / f.target).read_bytes(), media, f.sha384)
    for name in OWN_ASSETS:
        data = (STATIC / name).read_bytes()
        assets[name] = Asset(name, data, mimetypes.guess_type(name)[0] or "text/plain", vendor.sri(data))
    return assets


ASSETS = _load_assets()
VENDOR = {
    "htmx": "vendor/htmx.org-2.0.11/htmx.min.js",
    "uplot_js": "vendor/uplot-1.6.32/uPlot.iife.min.js",
    "uplot_css": "vendor/uplot-1.6.32/uPlot.min.css",
    "pico": "vendor/pico-2.1.1/pico.classless.min.css",
}
# htmx without eval, inline scripts or its own inline styles (CSP), and only to this origin.
HTMX_CONFIG = json.dumps(
    {
        "allowEval": False,
        "allowScriptTags": False,
        "includeIndicatorStyles": False,
        "selfRequestsOnly": True,
        "historyCacheSize": 0,
        "defaultSwapStyle": "outerHTML",
    }
)


def age(value: datetime | None, now: datetime | None = None) -> str:
    """'12 s', '5 min', '3 h', '2 d' since `value`."""
    if value is None:
        return "never"
    seconds = max(0, int(((now or utcnow()) - value).total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _short(digest: str | None, n: int = 12) -> str:
    return "–" if not digest else digest[:n] + "…"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,
)


def _merge(query: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {**query, **{k: v for k, v in more.items() if v is not None}}


templates.filters.update(age=age, when=_when, short=_short, pretty=_pretty, size=_size, merge=_merge)

NAV = [
    ("Fleet", "/ui/fleet"),
    ("Releases", "/ui/releases"),
    ("Rollouts", "/ui/rollouts"),
    ("Jobs", "/ui/jobs"),
    ("Audit", "/ui/audit"),
    ("People and keys", "/ui/people"),
]


def _asset_tag(name: str, nonce: str) -> Markup:
    asset = ASSETS[VENDOR.get(name, name)]
    if asset.media_type == "text/css":
        return Markup('<link rel="stylesheet" href="{}" integrity="{}" nonce="{}">').format(
            asset.url, asset.integrity, nonce
        )
    return Markup('<script src="{}" integrity="{}" nonce="{}" defer></script>').format(
        asset.url, asset.integrity, nonce
    )


def page(
    request: Request, template: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any
) -> HTMLResponse:
    """Render a template with what every dashboard page knows."""
    signed_in: SignedIn | None = getattr(request.state, "signed_in", None)
    principal = getattr(request.state, "principal", None)
    role = principal.role if principal is not None else None
    nonce = request.scope.get("state", {}).get("csp_nonce", "")

    def can(method: str, path: str) -> bool:
        return access.allows(role, method, path)

    body = templates.get_template(template).render(
        request=request,
        path=request.url.path,
        principal=principal if role is not None else None,
        csrf_token=signed_in.csrf_token if signed_in else "",
        session_expires=signed_in.expires_at if signed_in else None,
        nonce=nonce,
        asset=lambda name: _asset_tag(name, nonce),
        htmx_config=HTMX_CONFIG,
        nav=[(label, href) for label, href in NAV if can("GET", href)],
        can=can,
        now=utcnow(),
        **context,
    )
    return HTMLResponse(body, status_code=status, headers=headers)


def fragment(request: Request) -> bool:
    """Whether the request is htmx's (a live update), which gets only the part of the page that changes."""
    return request.headers.get("hx-request") == "true"
