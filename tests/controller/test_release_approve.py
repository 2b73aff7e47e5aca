"""`sitewarden release approve` against a hostile controller: what an approver signs is what they meant to sign.

The real controller never serves these answers (it validates every name), so the controller here
is a stand-in that plays the attacker who took it over: a real HTTP server on loopback that
answers the release listing, the files and the approval upload as each test scripts it. The
CLI runs as a real process with the approver's real key. Each attack must end with exit 1,
a message that names what is wrong, no approval uploaded and no file left anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rfc8785
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sitewarden import approval
from tests.agent_harness import wait_for
from tests.controller_server import free_port, sitewarden

NAME, VERSION = "fraud-scorer", "1.0.0"
PASSPHRASE = "correct horse battery staple"


class HostileController:
    """Serves one release, or whatever a test puts in `listing`, `manifest` and `files` instead."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.approvals: list[bytes] = []
        self.files: dict[str, bytes] = {}
        self.manifest: bytes = b""
        self.listing: Any = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def honest(self, files: dict[str, bytes], card: dict[str, Any] | None = None) -> None:
        """The release as the real controller would describe it."""
        entries = [{"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for p, d in files.items()]
        card = card or {"owner": "risk-team", "intended_purposes": ["fraud"], "risk_tier": "medium"}
        manifest = {
            "name": NAME,
            "version": VERSION,
            "kind": "model",
            "runtime": "onnx",
            "files": entries,
            "metadata": card,
            "uploaded_by": "bob",
            "created_at": "2026-12-01T10:00:00Z",
        }
        self.files = dict(files)
        self.manifest = rfc8785.dumps(manifest)
        self.listing = {
            **{k: manifest[k] for k in ("name", "version", "kind", "runtime", "files", "uploaded_by")},
            "metadata": card,
            "manifest_sha256": hashlib.sha256(self.manifest).hexdigest(),
            "created_at": manifest["created_at"],
            "approvals": [],
        }

    async def _release(self, request: Request) -> Response:
        return JSONResponse(self.listing)

    async def _file(self, request: Request) -> Response:
        path = request.path_params["path"]
        if path == "release.json":
            return Response(self.manifest)
        if path not in self.files:
            return JSONResponse({"detail": "no such file"}, status_code=404)
        return Response(self.files[path])

    async def _approve(self, request: Request) -> Response:
        self.approvals.append(await request.body())
        return JSONResponse({"approver": "alice", "key_fingerprint": "f" * 64}, status_code=201)

    def start(self) -> None:
        app = Starlette(
            routes=[
                Route("/api/v1/releases/{name}/{version}", self._release),
                Route("/api/v1/releases/{name}/{version}/files/{path:path}", self._file),
                Route("/api/v1/releases/{name}/{version}/approvals", self._approve, methods=["POST"]),
            ]
        )
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve()), daemon=True)
        self._thread.start()
        wait_for(lambda: self._server is not None and self._server.started, 20, "the hostile controller to start")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def server() -> Iterator[HostileController]:
    started = HostileController()
    started.start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("approver")
    approval.generate_approver_key(directory / "plain.pem", directory / "plain.pub.pem")
    approval.generate_approver_key(directory / "locked.pem", directory / "locked.pub.pem", PASSPHRASE.encode())
    return {
        "plain": directory / "plain.pem",
        "locked": directory / "locked.pem",
        "plain.pub": directory / "plain.pub.pem",
        "locked.pub": directory / "locked.pub.pem",
    }


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """TMPDIR of the CLI: whatever it writes lands here, so that a test can see nothing stayed."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    return directory


def approve(server: HostileController, key: Path, scratch: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    server.approvals.clear()
    return sitewarden(
        "release",
        "approve",
        NAME,
        VERSION,
        "--key",
        str(key),
        *extra,
        env={"SITEWARDEN_URL": server.url, "SITEWARDEN_TOKEN": "swt_x_y", "TMPDIR": str(scratch), **(env or {})},
    )


def _left_behind(scratch: Path) -> list[Path]:
    return [p for p in scratch.parent.rglob("*") if p != scratch and p.name != "tmp"]


WEIGHTS = {"model.onnx": b"onnx weights " * 100, "config/labels.json": b'["ok","fraud"]'}


def test_an_honest_release_is_shown_then_signed_and_the_signature_covers_exactly_it(
    server: HostileController, keys: dict[str, Path], scratch: Path
) -> None:
    server.honest(WEIGHTS, card={"owner": "risk-team", "intended_purposes": ["fraud"], "risk_tier": "medium"})
    digest = server.listing["manifest_sha256"]
    done = approve(server, keys["plain"], scratch, "--expect-manifest-sha256", digest)
    assert done.returncode == 0, done.stderr
    # Shown before signing: the manifest digest, the files and the model card.
    assert f"manifest sha256: {digest}" in done.stderr
    assert "risk-team" in done.stderr and '"intended_purposes"' in done.stderr and "config/labels.json" in done.stderr
    assert len(server.approvals) == 1
    layout = {"release.json": digest} | {f"files/{p}": hashlib.sha256(d).hexdigest() for p, d in WEIGHTS.items()}
    signed = approval.verify_approval(server.approvals[0], layout, {"alice": keys["plain.pub"].read_bytes()})
    assert signed.approver == "alice"
    assert not list(scratch.iterdir()), "the download directory must be gone"


def test_a_release_other_than_the_one_reviewed_is_not_signed(
    server: HostileController, keys: dict[str, Path], scratch: Path
) -> None:
    server.honest(WEIGHTS)
    reviewed = server.listing["manifest_sha256"]
    server.honest({**WEIGHTS, "model.onnx": b"other weights " * 100})  # swapped after the review
    done = approve(server, keys["plain"], scratch, "--expect-manifest-sha256", reviewed)
    assert done.returncode == 1
    assert f"not the {reviewed} you reviewed; nothing was signed" in done.stderr
    assert server.approvals == []
    bad = approve(server, keys["plain"], scratch, "--expect-manifest-sha256", "not-a-digest")
    assert bad.returncode == 2 and "--expect-manifest-sha256" in bad.stderr


@pytest.mark.parametrize(
    "path",
    ["../../escaped.txt", "/tmp/escaped.txt", "files/../../escaped.txt", "a\\..\\..\\escaped.txt", "a//b", "./a"],
)
def test_a_listed_path_that_could_leave_the_download_directory_is_refused_before_any_write(
    server: HostileController, keys: dict[str, Path], scratch: Path, path: str
) -> None:
    server.honest({path: b"planted"})
    done = approve(server, keys["plain"], scratch)
    assert done.returncode == 1, done.stderr
    assert "unusable" in done.stderr and "nothing was signed" in done.stderr
    assert server.approvals == []
    assert _left_behind(scratch) == [] and not Path("/tmp/escaped.txt").exists()


def test_a_file_whose_bytes_do_not_match_is_deleted_and_nothing_is_signed(
    server: HostileController, keys: dict[str, Path], scratch: Path
) -> None:
    server.honest(WEIGHTS)
    server.files["model.onnx"] = b"tampered weights" + b" " * (len(WEIGHTS["model.onnx"]) - 16)  # same size
    done = approve(server, keys["plain"], scratch)
    assert done.returncode == 1
    assert "model.onnx: the bytes do not match the registered SHA-256" in done.stderr and "deleted" in done.stderr
    assert server.approvals == [] and _left_behind(scratch) == []
    server.files["model.onnx"] = WEIGHTS["model.onnx"] + b"an endless tail" * 1000  # more than listed
    done = approve(server, keys["plain"], scratch)
    assert done.returncode == 1 and "more than the" in done.stderr and server.approvals == []


def test_a_manifest_naming_another_release_or_other_files_is_refused(
    server: HostileController, keys: dict[str, Path], scratch: Path
) -> None:
    server.honest(WEIGHTS)
    other = json.loads(server.manifest)
    other["version"] = "9.9.9"  # an approval of 1.0.0's request that is really one of 9.9.9
    server.manifest = rfc8785.dumps(other)
    server.listing["manifest_sha256"] = hashlib.sha256(server.manifest).hexdigest()
    done = approve(server, keys["plain"], scratch)
    assert done.returncode == 1 and "release.json describes" in done.stderr and "9.9.9" in done.stderr
    assert server.approvals == []

    server.honest(WEIGHTS)
    extra = json.loads(server.manifest)
    extra["files"].append({"path": "backdoor.py", "sha256": "0" * 64, "size": 1})
    server.manifest = rfc8785.dumps(extra)
    server.listing["manifest_sha256"] = hashlib.sha256(server.manifest).hexdigest()
    done = approve(server, keys["plain"], scratch)
    assert done.returncode == 1 and "release.json lists other files" in done.stderr
    assert server.approvals == []

    server.honest(WEIGHTS)
    server.listing["name"] = "another-model"
    done = approve(server, keys["plain"], scratch)
    assert done.returncode == 1 and "not fraud-scorer 1.0.0" in done.stderr
    server.listing = ["not", "a", "release"]
    done = approve(server, keys["plain"], scratch)
    assert done.returncode == 1 and "not a release" in done.stderr and server.approvals == []


def test_an_encrypted_key_signs_with_its_passphrase_and_only_with_it(
    server: HostileController, keys: dict[str, Path], scratch: Path
) -> None:
    server.honest(WEIGHTS)
    locked = keys["locked"]
    assert locked.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert os.stat(locked).st_mode & 0o777 == 0o600
    done = approve(server, locked, scratch, env={"SITEWARDEN_APPROVER_PASSPHRASE": PASSPHRASE})
    assert done.returncode == 0, done.stderr
    assert approval.verify_approval(
        server.approvals[0],
        {"release.json": server.listing["manifest_sha256"]}
        | {f"files/{p}": hashlib.sha256(d).hexdigest() for p, d in WEIGHTS.items()},
        {"alice": keys["locked.pub"].read_bytes()},
    )
    wrong = approve(server, locked, scratch, env={"SITEWARDEN_APPROVER_PASSPHRASE": "not the passphrase"})
    assert wrong.returncode == 2 and "wrong passphrase" in wrong.stderr and server.approvals == []
    # No terminal to ask at and no variable: it says how to give it, and signs nothing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEWARDEN_APPROVER_PASSPHRASE")}
    missing = approve(server, locked, scratch, env=env)
    assert missing.returncode == 2 and "SITEWARDEN_APPROVER_PASSPHRASE" in missing.stderr
    passfile = scratch.parent / "passphrase"
    passfile.write_text(PASSPHRASE + "\n")
    from_file = approve(server, locked, scratch, env={"SITEWARDEN_APPROVER_PASSPHRASE_FILE": str(passfile)})
    assert from_file.returncode == 0, from_file.stderr


def test_keygen_writes_an_encrypted_key_0600_that_opens_only_with_its_passphrase(tmp_path: Path) -> None:
    env = {"SITEWARDEN_APPROVER_PASSPHRASE": PASSPHRASE}
    done = sitewarden("approver", "keygen", "--out", str(tmp_path / "k"), "--encrypt", env=env)
    assert done.returncode == 0, done.stderr
    private = tmp_path / "k" / "approver.pem"
    assert os.stat(private).st_mode & 0o777 == 0o600 and os.stat(private.parent).st_mode & 0o777 == 0o700
    key = approval.load_approver_key(private, PASSPHRASE.encode())
    assert approval.key_fingerprint((tmp_path / "k" / "approver.pub.pem").read_bytes()) == done.stdout.strip()
    assert key.curve.name == "secp256r1"
    short = sitewarden("approver", "keygen", "--out", str(tmp_path / "s"), "--encrypt", env={
        "SITEWARDEN_APPROVER_PASSPHRASE": "short"
    })  # fmt: skip
    assert short.returncode == 2 and "at least 12 characters" in short.stderr
    assert not (tmp_path / "s" / "approver.pem").exists()


def test_download_keeps_nothing_of_a_release_that_does_not_check(
    server: HostileController, scratch: Path, tmp_path: Path
) -> None:
    server.honest(WEIGHTS)
    server.files["config/labels.json"] = b'["ok","FRAUD"]'
    out = tmp_path / "downloaded"
    done = sitewarden(
        "release", "download", NAME, VERSION, "--out", str(out),
        env={"SITEWARDEN_URL": server.url, "SITEWARDEN_TOKEN": "swt_x_y"},
    )  # fmt: skip
    assert done.returncode == 1 and "config/labels.json" in done.stderr and "nothing was kept" in done.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".downloaded")]
    server.honest(WEIGHTS)
    done = sitewarden(
        "release", "download", NAME, VERSION, "--out", str(out),
        env={"SITEWARDEN_URL": server.url, "SITEWARDEN_TOKEN": "swt_x_y"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "files" / "config" / "labels.json").read_bytes() == WEIGHTS["config/labels.json"]
    assert (out / "release.json").read_bytes() == server.manifest
