"""The terms a site accepted for a federated job, as its ClientApp enforces them.

A site decides on a job from its desired state (`agent.federation`); what it accepted must then
hold whatever the SuperLink's messages say, since the controller, and so the ServerApp and its run
configuration, is not trusted. The agent therefore hands the accepted terms to its SuperNode in
the node config (`--node-config`, set by the agent alone), the ClientApp reads them from there and
never from a message, and refuses what they do not cover (`terms_mod` in
`federation/app/sitewarden_fedapp/client_app.py`):

- a message that is neither a train nor an evaluate message;
- with secure aggregation accepted: any training message that is not a stage of SecAgg+ (a plain
  one would send the update in the clear), and a SecAgg+ round among fewer sites than the accepted
  minimum;
- a training round beyond the accepted number (counted from the site's own report spool, where
  every update that left is recorded, so neither run ids nor the server's round numbers, which
  the server chooses, can reset the count), and an evaluation beyond the rounds the site trained in.

And it clips every update to the accepted clipping norm itself (or to the server's, if smaller).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Terms", "TermsError", "rounds_taken"]

KEYS = {
    "job_id": "accepted-job-id",
    "rounds": "accepted-rounds",
    "min_sites": "accepted-min-sites",
    "secure_aggregation": "accepted-secure-aggregation",
    "clipping_norm": "accepted-clipping-norm",
}
ConfigValue = str | int | float | bool


class TermsError(ValueError):
    """The node config carries no usable terms: the ClientApp refuses to train without them."""


@dataclass(frozen=True)
class Terms:
    """What the site accepted: at most `rounds` rounds, SecAgg+ among at least `min_sites` sites when
    `secure_aggregation`, updates clipped to `clipping_norm` (None: the job has no DP)."""

    job_id: str
    rounds: int
    min_sites: int
    secure_aggregation: bool
    clipping_norm: float | None

    def __post_init__(self) -> None:
        if not self.job_id:
            raise TermsError("the accepted terms name no job")
        if self.rounds < 1 or self.min_sites < 1:
            raise TermsError(f"accepted rounds ({self.rounds}) and min_sites ({self.min_sites}) must be at least 1")
        if self.clipping_norm is not None and not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise TermsError(f"the accepted clipping norm {self.clipping_norm} must be a positive number")

    def to_node_config(self) -> dict[str, ConfigValue]:
        """The `--node-config` entries that carry the terms (a clipping norm of 0 means no DP)."""
        return {
            KEYS["job_id"]: self.job_id,
            KEYS["rounds"]: self.rounds,
            KEYS["min_sites"]: self.min_sites,
            KEYS["secure_aggregation"]: self.secure_aggregation,
            KEYS["clipping_norm"]: float(self.clipping_norm or 0.0),
        }

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Terms:
        missing = [key for key in KEYS.values() if key not in node_config]
        if missing:
            raise TermsError(f"the node config carries no accepted terms ({', '.join(missing)} missing)")
        try:
            norm = float(node_config[KEYS["clipping_norm"]])
            if not (math.isfinite(norm) and norm >= 0):
                raise ValueError(f"the accepted clipping norm {norm} must be a positive number (0: no DP)")
            return cls(
                job_id=str(node_config[KEYS["job_id"]]),
                rounds=int(node_config[KEYS["rounds"]]),
                min_sites=int(node_config[KEYS["min_sites"]]),
                secure_aggregation=_boolean(node_config[KEYS["secure_aggregation"]]),
                clipping_norm=norm if norm > 0 else None,
            )
        except (TypeError, ValueError) as exc:
            raise TermsError(f"the accepted terms in the node config are malformed: {exc}") from exc

    def effective_clipping_norm(self, requested: float | None) -> float | None:
        """The norm updates are clipped to: the accepted one, or the server's when it is smaller."""
        norms = [n for n in (self.clipping_norm, requested) if n is not None and n > 0]
        return min(norms) if norms else None


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError(f"{KEYS['secure_aggregation']} must be true or false, not {value!r}")


def rounds_taken(report_path: str) -> Counter[str]:
    """How many train and evaluate replies the site's report spool records (refusals are not counted)."""
    taken: Counter[str] = Counter()
    try:
        with open(report_path, "rb") as spool:
            for line in spool:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if isinstance(entry, dict) and "event" not in entry and entry.get("phase") in ("train", "evaluate"):
                    taken[entry["phase"]] += 1
    except FileNotFoundError:
        pass
    return taken
