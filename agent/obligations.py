"""Obligations the agent enforces on an allowed inference request (`policies.decision.Obligations`).

Before the model runs: `max_batch` (more rows is a 403) and `rate_limit` (requests per app
per minute, a token bucket per app and limit; more is a 429 with Retry-After). After it
runs: `redact` (named outputs are removed from the response, pattern matches in text outputs
become `[REDACTED]`) and `max_output_tokens` (text outputs are cut to that many
whitespace-separated tokens). `human_review` goes back to the caller as
`parameters.human_review`; `log_content` puts the raw request and outputs into the audit
entry; `sampling` is recorded with the decision (the language-model runtime uses it).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.errors import InferenceError
from policies import Obligations

REDACTED = "[REDACTED]"


class RateLimiter:
    """Token buckets: per app and limit, `limit` requests a minute, bursts up to `limit`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, int], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, app: str, per_minute: int) -> float:
        """Spend one request; 0 when allowed, else the seconds until the next one is."""
        now = self._clock()
        rate = per_minute / 60.0
        with self._lock:
            tokens, stamp = self._buckets.get((app, per_minute), (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - stamp) * rate)
            if tokens < 1.0:
                self._buckets[(app, per_minute)] = (tokens, now)
                return (1.0 - tokens) / rate
            self._buckets[(app, per_minute)] = (tokens - 1.0, now)
            return 0.0


def before(obligations: Obligations, *, app: str, batch: int, limiter: RateLimiter) -> None:
    """Refuse what the obligations forbid before the model runs (InferenceError 403 or 429)."""
    if obligations.max_batch is not None and batch > obligations.max_batch:
        raise InferenceError(
            403,
            "denied by policy",
            [f"the request carries {batch} rows; the policy allows at most {obligations.max_batch} (max_batch)"],
        )
    if obligations.rate_limit is not None:
        wait = limiter.take(app, obligations.rate_limit)
        if wait > 0:
            raise InferenceError(
                429,
                f"rate limit exceeded: app {app} may send {obligations.rate_limit} requests per minute",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )


def after(obligations: Obligations, outputs: list[dict[str, Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """The response's outputs with redactions and token limits applied; notes what changed in `parameters`."""
    if obligations.redact_outputs:
        removed = [o["name"] for o in outputs if o["name"] in obligations.redact_outputs]
        if removed:
            outputs = [o for o in outputs if o["name"] not in obligations.redact_outputs]
            parameters["redacted_outputs"] = ",".join(removed)
    patterns = obligations.patterns
    limit = obligations.max_output_tokens
    if not patterns and limit is None:
        return outputs
    redactions = truncated = 0
    for output in outputs:
        if output["datatype"] != "BYTES":
            continue
        data = output["data"]
        for index, original in enumerate(data):
            text = original
            for pattern in patterns:
                text, count = pattern.subn(REDACTED, text)
                redactions += count
            if limit is not None:
                words = text.split()
                if len(words) > limit:
                    text = " ".join(words[:limit])
                    truncated += 1
            data[index] = text
    if redactions:
        parameters["redactions"] = redactions
    if truncated:
        parameters["truncated_outputs"] = truncated
    return outputs
