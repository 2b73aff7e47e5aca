"""A site's data directory and its enrollment with the controller.

Enrollment: the agent generates the site's Ed25519 key and a per-site HMAC secret on site
(mode 0600; neither ever leaves), presents the one-time join token and the public key to
the controller, and stores the TUF `root.json` it receives only after checking it against
the SHA-256 the token carries: no trust on first use.

    <data>/identity.json        site id and name, controller URL, root hash, the controller's witness
                                and audit-log keys (pinned at enrollment)
    <data>/keys/site.pem        Ed25519 site key (signs JWTs and audit checkpoints)
    <data>/keys/hmac.key        secret for digests of regulated content in audit entries
    <data>/tuf/metadata/        python-tuf client metadata, bootstrapped from root.json
    <data>/releases/            staged, verified releases (<name>/<version>/)
    <data>/state.json           what is active (the atomic switch)
    <data>/audit/               the site's audit log
    <data>/apps.json            local app keys (hashes)
    <data>/witness.json         the size of the site's log the controller last cosigned
    <data>/controller-witness.json  the controller's checkpoint this site last cosigned (it witnesses that log)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import shutil
import ssl
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import ConfigError, EnrollmentError
from audit.errors import AuditError
from audit.note import Verifier
from sitewarden import __version__, jointoken
from sitewarden.errors import CredentialError
from sitewarden.files import make_private_dirs, tighten_dir, write_atomically, write_new_file
from sitewarden.keys import encode_public_key, generate_key, load_private_key


@dataclass(frozen=True)
class Identity:
    site_id: str
    site_name: str
    controller_url: str
    root_sha256: str
    enrolled_at: str
    witness_vkey: str
    # The controller's own audit-log key, pinned at enrollment: the site witnesses that log. Empty for
    # sites enrolled before it was pinned (`[controller] audit_vkey` in the site configuration then).
    controller_audit_vkey: str = ""

    @property
    def origin(self) -> str:
        """The site's audit log origin (C2SP checkpoint origin line)."""
        return f"sitewarden/{self.site_id}"


class DataDir:
    def __init__(self, root: Path) -> None:
        root = root.resolve()
        self.root = root
        self.identity_file = root / "identity.json"
        self.keys = root / "keys"
        self.site_key_file = self.keys / "site.pem"
        self.hmac_file = self.keys / "hmac.key"
        self.tuf_dir = root / "tuf" / "metadata"
        self.releases = root / "releases"
        self.state_file = root / "state.json"
        self.audit_dir = root / "audit"
        self.apps_file = root / "apps.json"
        self.witness_file = root / "witness.json"
        self.controller_witness_file = root / "controller-witness.json"

    def identity(self) -> Identity:
        if not self.identity_file.is_file():
            raise ConfigError(f"{self.root} is not an enrolled site: run `sitewarden agent enroll --data {self.root}`")
        try:
            return Identity(**json.loads(self.identity_file.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read {self.identity_file}: {exc}") from exc

    def site_key(self) -> Ed25519PrivateKey:
        try:
            return load_private_key(self.site_key_file)
        except CredentialError as exc:
            raise ConfigError(str(exc)) from exc

    def hmac_secret(self) -> bytes:
        try:
            return bytes.fromhex(self.hmac_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the site's HMAC secret {self.hmac_file}: {exc}") from exc


def _checked_log_vkey(vkey: object) -> str:
    """The controller's audit-log vkey from its enrollment answer, refused unless it is a log key (type 0x01)."""
    if vkey is None:
        return ""
    try:
        verifier = Verifier(str(vkey))
    except AuditError as exc:
        raise EnrollmentError(f"the controller's audit-log key is malformed: {exc}") from exc
    if verifier.is_cosigner:
        raise EnrollmentError("the controller's audit-log key is a cosigner key, not a log key")
    return verifier.vkey


def _ssl(ca_cert: Path | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True


def enroll(token_text: str, data: DataDir, ca_cert: Path | None = None) -> Identity:
    """Enroll this site; on any failure nothing is left behind, so enrollment can be retried."""
    try:
        token = jointoken.parse(token_text)
    except CredentialError as exc:
        raise EnrollmentError(f"the join token is malformed: {exc}") from exc
    if token.expired():
        raise EnrollmentError(f"the join token for {token.site} expired at {token.expires_at:%Y-%m-%d %H:%M} UTC")
    if data.identity_file.exists():
        raise EnrollmentError(f"{data.root} is already enrolled as a site; use a new data dir")
    created = not data.root.exists()
    tighten_dir(data.root)  # 0700, also when an operator made it wider beforehand
    try:
        key = generate_key(data.site_key_file)
        write_new_file(data.hmac_file, secrets.token_hex(32).encode())
        body = {"token": token_text.strip(), "public_key": encode_public_key(key), "agent_version": __version__}
        try:
            with httpx.Client(verify=_ssl(ca_cert), timeout=30) as http:
                response = http.post(f"{token.controller_url.rstrip('/')}/api/v1/enroll", json=body)
        except httpx.HTTPError as exc:
            raise EnrollmentError(f"cannot reach the controller at {token.controller_url}: {exc}") from exc
        if response.status_code != 200:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text[:200]
            raise EnrollmentError(f"the controller refused enrollment ({response.status_code}): {detail}")
        enrolled = response.json()
        try:
            root = base64.b64decode(enrolled["root"], validate=True)
        except (KeyError, binascii.Error, ValueError) as exc:
            raise EnrollmentError("the controller's answer carries no valid root") from exc
        if hashlib.sha256(root).hexdigest() != token.root_sha256:
            raise EnrollmentError(
                "the TUF root the controller sent does not match the hash in the join token: refusing to trust it"
            )
        make_private_dirs(data.tuf_dir)
        write_atomically(data.tuf_dir / "root.json", root)
        identity = Identity(
            site_id=enrolled["site_id"],
            site_name=enrolled["site_name"],
            controller_url=enrolled["controller_url"],
            root_sha256=token.root_sha256,
            enrolled_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            witness_vkey=enrolled["witness_vkey"],
            controller_audit_vkey=_checked_log_vkey(enrolled.get("audit_vkey")),
        )
        write_atomically(data.identity_file, json.dumps(asdict(identity), indent=2).encode())
        return identity
    except BaseException:
        if created:
            shutil.rmtree(data.root, ignore_errors=True)
        else:
            for leftover in (data.site_key_file, data.hmac_file, data.tuf_dir / "root.json", data.identity_file):
                leftover.unlink(missing_ok=True)
        raise
