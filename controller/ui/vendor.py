"""The dashboard's front-end assets, vendored from their npm packages at pinned versions.

A manifest (`static/vendor/manifest.json`, and the tests' own for axe-core) names each package,
its exact version, the npm registry's `sha512` integrity of the package tarball, and the files
taken from it with the SHA-384 of each (the value of the `integrity` attribute the templates put
on `<script>` and `<link>`). Nothing is fetched at run time and nothing is built: the controller
serves these files as they came out of the tarball.

    python -m controller.ui.vendor check [MANIFEST ...]   # the files on disk are the recorded ones
    python -m controller.ui.vendor fetch [MANIFEST ...]   # npm pack, check the tarball, extract

`fetch` needs the `npm` client and the npm registry; it refuses a tarball whose integrity differs
from the one recorded (a re-published or tampered package) and rewrites only the file hashes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
SERVED_MANIFEST = HERE / "static" / "vendor" / "manifest.json"


class VendorError(Exception):
    """A vendored file or package does not match its manifest."""


@dataclass(frozen=True)
class VendoredFile:
    source: str  # path inside the package tarball, under `package/`
    target: str  # path under the manifest's directory
    sha384: str  # base64, as in a Subresource Integrity value


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    integrity: str  # sha512-<base64> of the tarball, as the npm registry publishes it
    files: tuple[VendoredFile, ...]


def sri(data: bytes) -> str:
    """The Subresource Integrity value of some bytes (SHA-384)."""
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


def load(manifest: Path) -> list[Package]:
    raw = json.loads(manifest.read_text())
    return [
        Package(
            name=p["name"],
            version=p["version"],
            integrity=p["integrity"],
            files=tuple(VendoredFile(f["source"], f["target"], f["sha384"]) for f in p["files"]),
        )
        for p in raw["packages"]
    ]


def check(manifest: Path) -> list[Package]:
    """Every vendored file exists and has its recorded SHA-384; VendorError names the first that does not."""
    packages = load(manifest)
    for package in packages:
        for f in package.files:
            path = manifest.parent / f.target
            if not path.is_file():
                raise VendorError(f"{package.name}@{package.version}: {f.target} is missing")
            if sri(path.read_bytes()) != f.sha384:
                raise VendorError(f"{package.name}@{package.version}: {f.target} differs from the recorded {f.sha384}")
    return packages


def _tarball_integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch(manifest: Path) -> None:
    """Fetch each package with `npm pack`, check its tarball's integrity, extract its files, record their hashes."""
    raw = json.loads(manifest.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for package in raw["packages"]:
            spec = f"{package['name']}@{package['version']}"
            done = subprocess.run(
                ["npm", "pack", spec, "--json", "--pack-destination", tmp],
                capture_output=True,
                text=True,
                check=True,
            )
            filename = json.loads(done.stdout)[0]["filename"]
            data = (Path(tmp) / filename).read_bytes()
            integrity = _tarball_integrity(data)
            if package.get("integrity") and package["integrity"] != integrity:
                raise VendorError(
                    f"{spec}: the tarball's integrity {integrity} is not the recorded {package['integrity']}"
                )
            package["integrity"] = integrity
            with tarfile.open(Path(tmp) / filename) as tar:
                for f in package["files"]:
                    member = tar.extractfile(f"package/{f['source']}")
                    if member is None:
                        raise VendorError(f"{spec}: {f['source']} is not a file of the package")
                    content = member.read()
                    target = manifest.parent / f["target"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(content)
                    f["sha384"] = sri(content)
    manifest.write_text(json.dumps(raw, indent=2) + "\n")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"check", "fetch"}:
        print(__doc__)
        return 2
    manifests = [Path(a) for a in argv[1:]] or [SERVED_MANIFEST]
    try:
        for manifest in manifests:
            if argv[0] == "fetch":
                fetch(manifest)
            for package in check(manifest):
                print(f"{package.name}@{package.version} {package.integrity}: {len(package.files)} files match")
    except (VendorError, OSError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
