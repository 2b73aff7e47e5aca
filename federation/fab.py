"""Flower App Bundles (FABs): the app package a federated job runs, released and approved like a model.

A Flower App is released as a release of kind `app`, runtime `flower`, whose one file is its FAB
(a zip: the app's files, its `pyproject.toml` with `[tool.flwr.app]`, and `.info/CONTENT`, the
SHA-256 of every file, as `flwr build` writes it). Approvers sign it like any release; a site runs
a job only with the FAB whose SHA-256 is that of the app release it verified (`federation.runner`).

- `build` makes the FAB of an app directory with Flower's own builder (deterministic: sorted
  entries, fixed timestamps), `write` stores it under Flower's file name;
- `inspect` reads what a FAB says it is without running or unpacking anything, and refuses what
  is not a FAB (`FabError`): the registry checks every app release with it.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FabError", "FabInfo", "build", "inspect", "write"]

FAB_SUFFIX = ".fab"
MAX_FAB = 10 << 20  # Flower's own limit (flwr.common.constant.FAB_MAX_SIZE)
MAX_ENTRIES = 10_000
MAX_MANIFEST = 1 << 20


class FabError(ValueError):
    """The bytes are not a Flower App Bundle; the message says why."""


@dataclass(frozen=True)
class FabInfo:
    """What a FAB says it is: Flower's app id (`publisher/name`), its version, and its SHA-256."""

    fab_id: str
    version: str
    sha256: str

    def describe(self) -> dict[str, str]:
        return {"fab_id": self.fab_id, "version": self.version, "sha256": self.sha256}


def build(app_dir: Path) -> bytes:
    """The FAB of the Flower App in `app_dir`, as `flwr build` / `flwr run` make it."""
    from flwr.cli.build import build_fab_from_disk  # noqa: PLC0415 - Flower loads slowly

    return build_fab_from_disk(app_dir)


def write(app_dir: Path, out_dir: Path) -> Path:
    """Build the FAB of `app_dir` into `out_dir` under Flower's name (`<publisher>.<name>.<version>.<hash8>.fab`)."""
    content = build(app_dir)
    info = inspect(content)
    publisher, name = info.fab_id.split("/", 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{publisher}.{name}.{info.version.replace('.', '-')}.{info.sha256[:8]}{FAB_SUFFIX}"
    path.write_bytes(content)
    return path


def inspect(content: bytes) -> FabInfo:
    """Read a FAB's app id and version from its `pyproject.toml`; FabError if it is not a FAB."""
    if len(content) > MAX_FAB:
        raise FabError(f"a FAB is at most {MAX_FAB} bytes; this one has {len(content)}")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            entries = archive.infolist()
            if len(entries) > MAX_ENTRIES:
                raise FabError(f"a FAB holds at most {MAX_ENTRIES} files")
            by_name = {entry.filename: entry for entry in entries}
            for required in ("pyproject.toml", ".info/CONTENT"):
                if required not in by_name:
                    raise FabError(f"not a Flower App Bundle: it has no {required}")
                if by_name[required].file_size > MAX_MANIFEST:
                    raise FabError(f"{required} of the FAB is over {MAX_MANIFEST} bytes")
            config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise FabError(f"not a Flower App Bundle (a zip file): {exc}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FabError(f"the FAB's pyproject.toml cannot be read: {exc}") from exc
    try:
        publisher = config["tool"]["flwr"]["app"]["publisher"]
        name, version = config["project"]["name"], config["project"]["version"]
    except (KeyError, TypeError) as exc:
        raise FabError(f"the FAB's pyproject.toml lacks [project] name/version or [tool.flwr.app] {exc}") from exc
    if not all(isinstance(v, str) and v for v in (publisher, name, version)):
        raise FabError("the FAB's publisher, name and version must be non-empty strings")
    return FabInfo(f"{publisher}/{name}", version, hashlib.sha256(content).hexdigest())
