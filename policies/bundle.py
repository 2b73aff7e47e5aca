"""Policy bundles in the OPA bundle layout: `.rego` modules, `data.json` files, a `.manifest`.

A bundle is read from a directory (what compliance engineers edit) or from the gzipped
tarball `sitewarden policy build` writes (what travels as a TUF target). Both give the same
`Bundle`: its modules by path, its data tree, and its manifest's `revision` and `roots`.
Every module's package and every data key must lie under one of the roots. Modules whose
file name ends in `_test.rego` hold the bundle's Rego unit tests (rules named `test_*`);
they are kept apart from the policy so that they never take part in a decision.

`Bundle.tarball()` is deterministic (sorted members, fixed mode, owner and mtime), so a
bundle's `digest`, the SHA-256 of that tarball, names its content whatever packed it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from policies.errors import BundleError

MANIFEST = ".manifest"
MAX_BUNDLE_BYTES = 16 << 20
MAX_FILES = 1000
BUNDLE_FILE = "bundle.tar.gz"
_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*(?:\[\"[^\"]+\"\])*)", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_\w+)\b", re.MULTILINE)


@dataclass(frozen=True)
class Module:
    path: str
    text: str
    package: str

    @property
    def is_test(self) -> bool:
        return self.path.endswith("_test.rego")

    def test_rules(self) -> list[str]:
        """Names of the `test_*` rules this module defines, in order, each once."""
        return list(dict.fromkeys(_TEST_RULE.findall(self.text)))


@dataclass(frozen=True)
class Bundle:
    revision: str
    roots: tuple[str, ...]
    modules: tuple[Module, ...]
    data: dict[str, Any] = field(default_factory=dict)

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> Bundle:
        """A bundle from a directory or from a `.tar.gz` file."""
        if path.is_dir():
            return cls.from_directory(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read {path}: {exc.strerror}") from exc
        return cls.from_tarball(raw)

    @classmethod
    def from_directory(cls, directory: Path) -> Bundle:
        """Read `.manifest`, `data.json` files and `.rego` modules under `directory` (other files are left out)."""
        files: dict[str, bytes] = {}
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory).as_posix()
            if path.is_file() and _wanted(relative):
                files[relative] = path.read_bytes()
        return cls.from_files(files, source=str(directory))

    @classmethod
    def from_tarball(cls, raw: bytes) -> Bundle:
        """Read a gzipped tarball; refuses links, devices, paths leaving the bundle, and oversized content."""
        try:
            tar_bytes = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        except (OSError, EOFError) as exc:
            raise BundleError(f"the bundle is not a gzipped tarball: {exc}") from exc
        if len(tar_bytes) > MAX_BUNDLE_BYTES * 2:
            raise BundleError(f"the bundle unpacks to more than {MAX_BUNDLE_BYTES * 2} bytes")
        files: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
                for member in tar.getmembers():
                    name = member.name.removeprefix("./").removeprefix("/") if member.name != "." else ""
                    if member.isdir() or not name:
                        continue
                    if not member.isfile():
                        raise BundleError(f"bundle member {member.name!r} is not a regular file")
                    if ".." in PurePosixPath(name).parts:
                        raise BundleError(f"bundle member {member.name!r} leaves the bundle")
                    if not _wanted(name):
                        raise BundleError(
                            f"unexpected file {name!r} in the bundle: it holds .rego modules, data.json and .manifest"
                        )
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    files[name] = extracted.read()
        except tarfile.TarError as exc:
            raise BundleError(f"the bundle is not a readable tarball: {exc}") from exc
        return cls.from_files(files, source="the bundle")

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], *, source: str) -> Bundle:
        if len(files) > MAX_FILES:
            raise BundleError(f"{source} holds more than {MAX_FILES} files")
        if sum(len(b) for b in files.values()) > MAX_BUNDLE_BYTES:
            raise BundleError(f"{source} holds more than {MAX_BUNDLE_BYTES} bytes")
        manifest: dict[str, Any] = {}
        if MANIFEST in files:
            try:
                manifest = json.loads(files[MANIFEST])
            except ValueError as exc:
                raise BundleError(f"{MANIFEST} is not valid JSON: {exc}") from exc
            if not isinstance(manifest, dict):
                raise BundleError(f"{MANIFEST} must be a JSON object")
        revision = manifest.get("revision", "")
        if not isinstance(revision, str):
            raise BundleError(f"{MANIFEST}: revision must be a string")
        roots = manifest.get("roots", [""])
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise BundleError(f"{MANIFEST}: roots must be a list of strings")
        roots_t = tuple(r.strip("/") for r in roots)
        modules = []
        data: dict[str, Any] = {}
        for name, raw in sorted(files.items()):
            if name.endswith(".rego"):
                try:
                    text = raw.decode()
                except UnicodeDecodeError as exc:
                    raise BundleError(f"{name} is not UTF-8") from exc
                found = _PACKAGE.search(text)
                if found is None:
                    raise BundleError(f"{name} has no package declaration")
                package = found.group(1)
                if not _under(package.replace(".", "/"), roots_t):
                    raise BundleError(f"{name}: package {package} is outside the bundle's roots {list(roots_t)}")
                modules.append(Module(name, text, package))
            elif PurePosixPath(name).name == "data.json":
                try:
                    value = json.loads(raw)
                except ValueError as exc:
                    raise BundleError(f"{name} is not valid JSON: {exc}") from exc
                prefix = [p for p in PurePosixPath(name).parent.parts if p not in (".", "")]
                _merge_data(data, prefix, value, name, roots_t)
        if not any(not m.is_test for m in modules):
            raise BundleError(f"{source} holds no policy module (.rego)")
        return cls(revision, roots_t, tuple(modules), data)

    # -- writing -------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        return {"revision": self.revision, "roots": list(self.roots)}

    def tarball(self) -> bytes:
        """The bundle as a gzipped tarball, byte for byte the same for the same content."""
        members = {MANIFEST: json.dumps(self.manifest(), sort_keys=True, indent=2).encode() + b"\n"}
        if self.data:
            members["data.json"] = json.dumps(self.data, sort_keys=True, indent=2).encode() + b"\n"
        members.update({m.path: m.text.encode() for m in self.modules})
        buffer = io.BytesIO()
        with (
            gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped,
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for name in sorted(members):
                content = members[name]
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(content), 0o644, 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(content))
        return buffer.getvalue()

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.tarball()).hexdigest()

    # -- parts ---------------------------------------------------------------------------

    @property
    def policy_modules(self) -> tuple[Module, ...]:
        return tuple(m for m in self.modules if not m.is_test)

    @property
    def test_modules(self) -> tuple[Module, ...]:
        return tuple(m for m in self.modules if m.is_test)

    def data_json(self) -> str:
        return json.dumps(self.data)


def _wanted(relative: str) -> bool:
    name = PurePosixPath(relative).name
    return relative == MANIFEST or name == "data.json" or name.endswith(".rego")


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(root in ("", path) or path.startswith(root + "/") for root in roots)


def _merge_data(data: dict[str, Any], prefix: list[str], value: Any, name: str, roots: tuple[str, ...]) -> None:
    if not isinstance(value, dict):
        raise BundleError(f"{name} must hold a JSON object")
    for key in value:
        path = "/".join([*prefix, key])
        if not _under(path, roots) and not any(r.startswith(path + "/") for r in roots):
            raise BundleError(f"{name}: data key {path} is outside the bundle's roots {list(roots)}")
    node = data
    for part in prefix:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BundleError(f"{name}: data at {'/'.join(prefix)} collides with another data.json")
    for key, item in value.items():
        if key in node and isinstance(node[key], dict) and isinstance(item, dict):
            raise BundleError(f"{name}: data key {key} is given by more than one data.json")
        node[key] = item
