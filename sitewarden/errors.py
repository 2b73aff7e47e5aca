"""Errors of the shared kernel, rooted at one base class."""

from __future__ import annotations


class SitewardenError(Exception):
    """Base class of every error the shared kernel raises on purpose."""


class CredentialError(SitewardenError, ValueError):
    """A key, join token or site token is malformed, expired or does not verify."""
