"""Rényi-DP accounting of the Gaussian mechanism, against closed forms."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.privacy import epsilon, epsilon_per_round


def closed_form(sigma: float, rounds: int, delta: float) -> float:
    """The minimum over real orders a > 1 of T a / 2 sigma^2 + log(1/delta) / (a - 1)."""
    a = rounds / (2 * sigma**2)
    b = math.log(1 / delta)
    alpha = 1 + math.sqrt(b / a)
    return a * alpha + b / (alpha - 1)


def test_one_round_of_sigma_one_matches_the_textbook_value() -> None:
    assert epsilon(1.0, 1, 1e-5) == pytest.approx(5.30, abs=0.01)


@given(
    sigma=st.floats(0.5, 5.0),
    rounds=st.integers(1, 50),
    delta=st.sampled_from([1e-3, 1e-5, 1e-7]),
)
def test_the_grid_of_orders_is_within_a_few_percent_of_the_exact_minimum(
    sigma: float, rounds: int, delta: float
) -> None:
    exact = closed_form(sigma, rounds, delta)
    assert exact <= epsilon(sigma, rounds, delta) + 1e-9
    assert epsilon(sigma, rounds, delta) <= exact * 1.03


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    spent = epsilon_per_round(1.1, 5, 1e-5)
    assert list(spent) == [1, 2, 3, 4, 5]
    assert all(spent[r] < spent[r + 1] for r in range(1, 5))
    assert epsilon(2.0, 5, 1e-5) < epsilon(1.1, 5, 1e-5)
    assert epsilon(1.0, 0, 1e-5) == 0.0 and epsilon(0.0, 3, 1e-5) == math.inf
    with pytest.raises(ValueError, match="delta"):
        epsilon(1.0, 1, 0.0)
