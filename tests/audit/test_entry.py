"""Canonical JSON for audit entries: the fast path writes exactly what RFC 8785 does."""

from __future__ import annotations

import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.entry import canonicalize

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
    | st.text()
)
documents = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20
)


@settings(max_examples=2000, deadline=None)
@given(st.dictionaries(st.text(), documents, max_size=6))
def test_canonical_entries_are_byte_for_byte_rfc8785(document: dict) -> None:
    try:
        want = rfc8785.dumps(document)
    except (rfc8785.CanonicalizationError, UnicodeEncodeError):
        return  # not representable: canonicalize refuses it too
    assert canonicalize(document) == want


def test_typical_inference_entry_matches_the_reference() -> None:
    entry = {
        "type": "inference",
        "time": "2026-11-29T03:00:39.713Z",
        "caller": "fraud-app",
        "decision": {"allow": True, "reasons": ["purpose fraud allowed"], "obligations": {}},
        "latency_ms": 1.708,
        "score": 0.00012,
        "batch": 1,
        "request_id": None,
        "unicode": "IBAN DE89 3704 0044 0532 0130 00 – zürich\\u2028",
    }
    assert canonicalize(entry) == rfc8785.dumps(entry)
