"""What the controller publishes to TUF, and when: only what its database committed, and all of it.

In-process, on a data dir made by `sitewarden controller init`: a desired state whose commit
fails is never published; one whose publication fails after its commit is published by the
background step; one committed by a controller that stopped before publishing is published at
the next start. Revocations are checked against the release they name and the approver's key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session

from controller import registry, rollouts, sites
from controller.db import Rollout
from controller.errors import Conflict, Forbidden, Unprocessable
from controller.runtime import Runtime
from sitewarden import revocation
from sitewarden.desired import revocation_target, target_path


def _release(runtime: Runtime, session: Session, version: str) -> None:
    data = f"weights {version}".encode()
    sha256 = runtime.blobs.put_bytes(data)
    registry.record_blob(session, sha256, len(data))
    session.commit()
    registry.create_release(
        session,
        runtime.blobs,
        runtime.publisher,
        name="fraud-scorer",
        version=version,
        kind="model",
        runtime="onnx",
        files=[registry.FileSpec("model.onnx", sha256, len(data))],
        metadata={"owner": "risk"},
        uploaded_by="bob",
    )


def _rollout(runtime: Runtime, session: Session, name: str, version: str, label: str) -> tuple[str, Rollout]:
    site = sites.create(session, f"site-{name}", {"fleet": label}, "admin")
    session.commit()
    rollout = rollouts.create(
        session, rollouts.RolloutSpec(name, [("fraud-scorer", version)], selector={"fleet": label}), "bob"
    )
    session.commit()
    return site.id, rollout


def test_a_desired_state_whose_commit_fails_is_never_published(runtime: Runtime) -> None:
    with runtime.session() as session:
        _release(runtime, session, "1.0.0")
        site_id, rollout = _rollout(runtime, session, "a", "1.0.0", "a")
        real_commit = session.commit

        def failing_commit() -> None:
            raise RuntimeError("the database went away")

        session.commit = failing_commit  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            runtime.reconcile(session, rollout)
        assert runtime.tuf.get_target(target_path(site_id)) is None, "published before its commit"
        session.commit = real_commit  # type: ignore[method-assign]
        session.rollback()
    with runtime.session() as session:
        rollout = rollouts.get(session, "a")
        runtime.reconcile(session, rollout)
        held = rollouts.current_desired(session, site_id)
        assert held is not None and held.version == 1
        assert runtime.tuf.get_target(target_path(site_id)).sha256 == held.sha256


def test_a_publication_that_fails_after_its_commit_is_published_by_the_background_step(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_targets = runtime.tuf.add_targets
    calls = []

    def full_disk(targets: object) -> list[str]:
        calls.append(targets)
        raise OSError(28, "No space left on device")

    with runtime.session() as session:
        site_id, rollout = _rollout(runtime, session, "b", "1.0.0", "b")
        monkeypatch.setattr(runtime.tuf, "add_targets", full_disk)
        assert runtime.reconcile(session, rollout) == [site_id], "the request that committed does not fail"
        held = rollouts.current_desired(session, site_id)
    assert calls and runtime.tuf.get_target(target_path(site_id)) is None
    assert target_path(site_id) in runtime.publisher.pending
    runtime.reconcile_all()  # still failing: kept
    assert target_path(site_id) in runtime.publisher.pending
    monkeypatch.setattr(runtime.tuf, "add_targets", add_targets)
    runtime.reconcile_all()
    assert not runtime.publisher.pending
    assert runtime.tuf.get_target(target_path(site_id)).sha256 == held.sha256


def test_what_a_stopped_controller_committed_but_did_not_publish_is_published_at_start(data_dir: Path) -> None:
    runtime = Runtime.open(data_dir)
    try:
        with runtime.session() as session:
            site_id, rollout = _rollout(runtime, session, "c", "1.0.0", "c")
            rollouts.reconcile(session, rollout, runtime.blobs, lambda _publication: None)  # stopped before publishing
            held = rollouts.current_desired(session, site_id)
        assert runtime.tuf.get_target(target_path(site_id)) is None
    finally:
        runtime.close()
    restarted = Runtime.open(data_dir)
    try:
        assert restarted.tuf.get_target(target_path(site_id)).sha256 == held.sha256
        assert restarted.ensure_published() == 0
    finally:
        restarted.close()


def _approver(runtime: Runtime, session: Session, name: str) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    registry.register_approver_key(session, name, pem.decode(), "admin")
    return key


def test_a_revocation_must_name_the_release_and_be_signed_by_the_callers_key(runtime: Runtime) -> None:
    with runtime.session() as session:
        _release(runtime, session, "2.0.0")
        release = registry.get_release(session, "fraud-scorer", "2.0.0")
        alice, mallory = _approver(runtime, session, "alice"), _approver(runtime, session, "mallory")

        def signed(key: ec.EllipticCurvePrivateKey, **changes: str) -> bytes:
            fields = {"name": "fraud-scorer", "version": "2.0.0", "manifest_sha256": release.manifest_sha256}
            return revocation.sign_revocation(key, reason="drift", **{**fields, **changes})

        with pytest.raises(Unprocessable, match=r"not fraud-scorer 2\.0\.0"):
            registry.add_revocation(
                session,
                runtime.blobs,
                runtime.publisher,
                release,
                document=signed(alice, version="1.0.0"),
                approver="alice",
            )
        with pytest.raises(Unprocessable, match="manifest"):
            registry.add_revocation(
                session,
                runtime.blobs,
                runtime.publisher,
                release,
                document=signed(alice, manifest_sha256="0" * 64),
                approver="alice",
            )
        with pytest.raises(Unprocessable, match="does not verify"):  # mallory's signature, sent as alice
            registry.add_revocation(
                session, runtime.blobs, runtime.publisher, release, document=signed(mallory), approver="alice"
            )
        with pytest.raises(Forbidden):
            registry.add_revocation(
                session, runtime.blobs, runtime.publisher, release, document=signed(alice), approver="eve"
            )
        record = registry.add_revocation(
            session, runtime.blobs, runtime.publisher, release, document=signed(alice), approver="alice"
        )
        target = revocation_target("fraud-scorer", "2.0.0", record.key_fingerprint)
        assert runtime.tuf.get_target(target).sha256 == record.bundle_sha256
        with pytest.raises(Conflict, match="already revoked"):
            registry.add_revocation(
                session, runtime.blobs, runtime.publisher, release, document=signed(alice), approver="alice"
            )
        sites.create(session, "site-d", {"fleet": "d"}, "admin")
        session.commit()
        with pytest.raises(Conflict, match="revoked by alice"):
            rollouts.create(
                session, rollouts.RolloutSpec("d", [("fraud-scorer", "2.0.0")], selector={"fleet": "d"}), "bob"
            )
