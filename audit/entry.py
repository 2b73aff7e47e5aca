"""Audit entries as canonical JSON (RFC 8785), so that equal records hash equally.

Input is checked as I-JSON (RFC 7493) before canonicalisation: one object, no duplicate
member names, no NaN or infinities, integers within IEEE 754 double precision.
"""

from __future__ import annotations

import json
import math
import re
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


_SAFE_INT = 2**53
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _plain(value: Any) -> bool:
    """Whether `json.dumps` writes `value`'s values exactly as RFC 8785 does.

    True for strings, booleans, null, integers of at most 53 bits, non-integral finite
    floats in [1e-4, 1e16) (there Python's shortest repr and ECMAScript's Number-to-string
    agree), and arrays and objects of those. Key order is checked on the output (see
    `canonicalize`). Iterative and type-exact: it runs on every audited request.
    """
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is str or t is bool or v is None:
            continue
        if t is dict:
            if any(type(k) is not str for k in v):
                return False
            stack.extend(v.values())
        elif t is list or t is tuple:
            stack.extend(v)
        elif t is int:
            if not -_SAFE_INT < v < _SAFE_INT:
                return False
        elif t is float:
            if not (math.isfinite(v) and not v.is_integer() and 1e-4 <= abs(v) < 1e16):
                return False
        else:
            return False
    return True


def canonicalize(obj: dict[str, Any]) -> bytes:
    """RFC 8785 bytes of `obj`, refused if they would not fit in one log entry."""
    data = canonical(obj)
    if len(data) > MAX_ENTRY_SIZE:
        raise EntryTooLargeError(f"canonical entry is {len(data)} bytes, over the limit of {MAX_ENTRY_SIZE}")
    return data


def canonical(obj: Any) -> bytes:
    """RFC 8785 bytes of any JSON value (FormatError when it has none), of any size.

    Audit entries are written on every request, so the common case takes a fast path:
    the standard library's JSON encoder, which for plain values (see `_plain`) produces
    the same bytes as the RFC 8785 reference; anything else goes through `rfc8785`.
    """
    data = None
    if _plain(obj):
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        # Characters beyond the Basic Multilingual Plane sort differently in UTF-16 (RFC 8785)
        # than in code points (json); lone surrogates cannot be encoded: both take the slow path.
        if not _ASTRAL.search(text):
            try:
                data = text.encode()
            except UnicodeEncodeError:
                data = None
    if data is None:
        try:
            data = rfc8785.dumps(obj)
        except rfc8785.CanonicalizationError as exc:
            raise FormatError(f"cannot canonicalise: {exc}") from exc
    return data


def encode(text: str | bytes) -> bytes:
    """Parse one JSON object and return its canonical form."""
    return canonicalize(parse_object(text))
