"""What the dashboard's route modules share: form parsing, redirects after an action, the runtime."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import RedirectResponse

from controller.runtime import Runtime


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


def after_action(path: str, done: str, **query: str) -> RedirectResponse:
    """303 to the page that shows the result of an action (Post/Redirect/Get), naming what was done."""
    return RedirectResponse(f"{path}?{urlencode({'done': done, **query})}", status_code=303)


def words(text: str | None) -> list[str]:
    """Items of a form field separated by commas, spaces or new lines."""
    return (text or "").replace(",", " ").split()


def pairs(text: str | None, what: str) -> dict[str, str]:
    """`k=v` items of a form field; ValueError names the first malformed one."""
    out: dict[str, str] = {}
    for item in words(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what}: {item[:100]!r} is not key=value")
        out[key] = value
    return out


def int_or_none(text: str | None, what: str) -> int | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise ValueError(f"{what}: {text[:50]!r} is not a whole number") from exc


def release_ref(text: str, what: str) -> dict[str, Any]:
    name, sep, version = text.partition("@")
    if not sep or not name or not version:
        raise ValueError(f"{what}: {text[:100]!r} is not name@version")
    return {"name": name, "version": version}
