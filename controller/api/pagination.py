"""Keyset pagination: `?limit=N&after=<cursor>`, where the cursor is the last item's sort key."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from sqlalchemy import Select

from controller.errors import BadRequest

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


def decode_cursor(after: str | None) -> str | None:
    if after is None:
        return None
    try:
        cursor = base64.b64decode(after + "=" * (-len(after) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("after: not a cursor returned by this API") from exc
    if not cursor:
        raise BadRequest("after: not a cursor returned by this API")
    return cursor


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()


def page(query: Select[Any], key_column: Any, after: str | None, limit: int) -> Select[Any]:
    cursor = decode_cursor(after)
    if cursor is not None:
        query = query.where(key_column > cursor)
    return query.order_by(key_column).limit(limit + 1)


def next_cursor(rows: list[Any], limit: int, key: Any) -> tuple[list[Any], str | None]:
    """Trim the extra row fetched to learn whether another page exists."""
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor(key(rows[-1]))
    return rows, None
