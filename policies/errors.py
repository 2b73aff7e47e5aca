"""The policy engine's errors."""

from __future__ import annotations


class PolicyError(Exception):
    """Base class of the policy engine's errors."""


class BundleError(PolicyError):
    """A bundle cannot be read, or does not compile; the message names the file and the problem."""
