"""Audit entries as canonical JSON (RFC 8785), so that equal records hash equally.

Input is checked as I-JSON (RFC 7493) before canonicalisation: one object, no duplicate
member names, no NaN or infinities, integers within IEEE 754 double precision.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785

from audit.errors import EntryTooLargeError, FormatError
from audit.tiles import MAX_ENTRY_SIZE


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise FormatError(f"duplicate member name {key!r}")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise FormatError(f"{name} is not valid JSON")


def parse_object(text: str | bytes) -> dict[str, Any]:
    """Parse one JSON object, refusing what RFC 8785 cannot canonicalise."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise FormatError(f"invalid JSON: {exc.msg} at column {exc.colno}") from exc
    except UnicodeDecodeError as exc:
        raise FormatError("invalid JSON: not UTF-8") from exc
    except RecursionError as exc:
        raise FormatError("invalid JSON: nested too deeply") from exc
    if not isinstance(value, dict):
        raise FormatError(f"want a JSON object, got {type(value).__name__}")
    return value


def canonicalize(obj: dict[str, Any]) -> bytes:
    """RFC 8785 bytes of `obj`, refused if they would not fit in one log entry."""
    try:
        data = rfc8785.dumps(obj)
    except rfc8785.CanonicalizationError as exc:
        raise FormatError(f"cannot canonicalise: {exc}") from exc
    if len(data) > MAX_ENTRY_SIZE:
        raise EntryTooLargeError(f"canonical entry is {len(data)} bytes, over the limit of {MAX_ENTRY_SIZE}")
    return data


def encode(text: str | bytes) -> bytes:
    """Parse one JSON object and return its canonical form."""
    return canonicalize(parse_object(text))
