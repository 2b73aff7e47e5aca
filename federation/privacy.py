"""Privacy accounting for central differential privacy with fixed clipping (the Gaussian mechanism).

Each round adds Gaussian noise of standard deviation `noise_multiplier` times the clipping norm to
the sum of the sites' clipped updates, and every site takes part in every round (no sampling). The
privacy loss is tracked in Renyi DP (Mironov 2017): a Gaussian mechanism with noise multiplier s is
(a, a / 2s^2)-RDP for every order a > 1, and RDP adds up over rounds. After T rounds it is converted
to (epsilon, delta)-DP with epsilon = min over a of [T a / 2s^2 + log(1/delta) / (a - 1)], the
standard, conservative conversion. The guarantee is per site (a site's whole dataset), as updates
are clipped per site.
"""

from __future__ import annotations

import math

# Orders searched for the tightest conversion: fine near 1, wide for small noise.
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε spent after `rounds` rounds at `delta`; infinite without noise."""
    if rounds < 0:
        raise ValueError("rounds must not be negative")
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    per_order = rounds / (2.0 * noise_multiplier**2)
    return min(alpha * per_order + math.log(1.0 / delta) / (alpha - 1.0) for alpha in ORDERS)


def epsilon_per_round(noise_multiplier: float, rounds: int, delta: float) -> dict[int, float]:
    """ε spent after each round 1..rounds (what a job's status reports)."""
    return {r: epsilon(noise_multiplier, r, delta) for r in range(1, rounds + 1)}
