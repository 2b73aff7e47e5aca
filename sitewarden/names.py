"""The naming rules of Sitewarden's identifiers, defined once for both sides.

The controller applies them when it accepts a name, the agent again when a name reaches it
in a desired state or a manifest (a hostile controller is the threat model), and the approver's
CLI before it writes anything a controller sent. Each `check_*` returns its argument unchanged
or raises `InvalidName`, whose message names the kind of identifier, the value and the rule.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePosixPath

RELEASE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,98}[a-z0-9])?")
# semver.org's recommended regular expression (2.0.0).
SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
MAX_VERSION = 128
SITE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Sites, jobs, rollouts: the controller's ids are canonical lowercase UUIDs (controller.db.new_id).
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_PATH = 400
# People and services (API token names, approvers): what the controller's API accepts.
PERSON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,199}")
# Rollouts and jobs, named by operators.
OBJECT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
# The data set name a job asks each site to map to local data.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Which runtimes each kind of release may name.
RUNTIMES = {
    "model": frozenset({"onnx", "transformers"}),
    "adapter": frozenset({"transformers"}),
    "policy": frozenset({"rego"}),
    "app": frozenset({"flower"}),
}


class InvalidName(ValueError):
    """An identifier that breaks its naming rule."""


def check_release_name(name: str) -> str:
    if not isinstance(name, str) or not RELEASE_NAME.fullmatch(name):
        raise InvalidName(f"release name {name!r} must be 1-100 of a-z, 0-9, '.', '_', '-', alphanumeric at both ends")
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or len(version) > MAX_VERSION or not SEMVER.fullmatch(version):
        raise InvalidName(f"version {version!r} is not a semantic version (semver.org 2.0.0)")
    return version


def check_site_name(name: str) -> str:
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name):
        raise InvalidName(f"site name {name!r} must be a DNS label (1-63 of a-z, 0-9, '-')")
    return name


def check_id(value: str, what: str = "id") -> str:
    """A controller-assigned id (site, job, rollout): a canonical lowercase UUID."""
    if not isinstance(value, str) or not UUID.fullmatch(value):
        raise InvalidName(f"{what} {value!r} is not a canonical lowercase UUID")
    return value


def check_sha256(value: str, what: str = "digest") -> str:
    """A SHA-256 as 64 lowercase hex digits (file digests, manifest digests, key fingerprints)."""
    if not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
        raise InvalidName(f"{what} {value!r} is not 64 lowercase hex digits")
    return value


def check_fingerprint(value: str) -> str:
    """An approver key fingerprint: SHA-256 of its DER SubjectPublicKeyInfo, 64 lowercase hex digits."""
    return check_sha256(value, "key fingerprint")


def check_person_name(name: str, what: str = "approver") -> str:
    """The name of a person or service (API tokens, approvers)."""
    if not isinstance(name, str) or not PERSON_NAME.fullmatch(name):
        raise InvalidName(f"{what} {name!r} must be 1-200 of A-Z, a-z, 0-9, '.', '_', '@', '-', alphanumeric first")
    return name


def check_object_name(name: str, what: str) -> str:
    """The name of a rollout or a job."""
    if not isinstance(name, str) or not OBJECT_NAME.fullmatch(name):
        raise InvalidName(f"{what} name {name!r} must be 1-100 of a-z, 0-9, '.', '_', '-', alphanumeric first")
    return name


def check_dataset_name(name: str) -> str:
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        raise InvalidName(f"data set name {name!r} must be 1-100 of A-Z, a-z, 0-9, '.', '_', '-', alphanumeric first")
    return name


def check_kind_runtime(kind: str, runtime: str) -> tuple[str, str]:
    """A release kind and a runtime that kind may name."""
    if kind not in RUNTIMES:
        raise InvalidName(f"kind {kind!r} must be one of {', '.join(sorted(RUNTIMES))}")
    if runtime not in RUNTIMES[kind]:
        raise InvalidName(f"runtime {runtime!r} is not valid for kind {kind}: use {', '.join(sorted(RUNTIMES[kind]))}")
    return kind, runtime


def check_release_path(path: str) -> str:
    """A file path inside a release: relative POSIX, NFC, no '.', '..', empty segments, backslash,
    control characters, or the URL-significant '?', '#', '%' (TUF clients put paths in URLs)."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH:
        raise InvalidName(f"file path {path!r} must be 1 to {MAX_PATH} characters")
    if unicodedata.normalize("NFC", path) != path:
        raise InvalidName(f"file path {path!r} must be NFC-normalised")
    if "\\" in path or "\x00" in path or path.startswith("/"):
        raise InvalidName(f"file path {path!r} must be a relative POSIX path")
    parts = PurePosixPath(path).parts
    if any(p in {"", ".", ".."} for p in parts) or "/".join(parts) != path:
        raise InvalidName(f"file path {path!r} must not contain '.', '..' or empty segments")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise InvalidName(f"file path {path!r} contains control characters")
    if any(c in path for c in "?#%"):
        raise InvalidName(f"file path {path!r} must not contain '?', '#' or '%'")
    return path
