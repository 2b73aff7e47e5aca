"""The controller's TUF repository, checked by python-tuf's own client.

Every test that involves an agent runs `tuf.ngclient.Updater` against the repository served by
a real HTTP server on 127.0.0.1, the way the controller's `/tuf/metadata/<name>` and
`/tuf/targets/<path>` routes serve it: metadata through `metadata_file`, targets through
`resolve_target` and a blob directory. An attacker on the wire is played by `overrides`.
"""

from __future__ import annotations

import hashlib
import json
import stat
import statistics
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from tuf.api import exceptions
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.ngclient import Updater, UpdaterConfig

from controller import tuf_repo
from controller.tuf_repo import (
    KeyFileError,
    RepositoryStateError,
    TargetError,
    TargetSpec,
    TufKeys,
    TufRepository,
    generate_keys,
    load_signer,
)
from sitewarden.keys import generate_key

SMALL_BINS = 16  # bin-0 ... bin-f: fast to create; the scale test uses the default


class Clock:
    """The repository's clock: real time plus an offset a test may set."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Served:
    """A repository, its blob directory, and the loopback server that serves both."""

    repo: TufRepository
    keys: TufKeys
    directory: Path  # the repository's directory (metadata/ is inside)
    key_dir: Path  # the online keys
    blobs: Path
    base_url: str
    home: Path
    overrides: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def publish(self, path: str, data: bytes, custom: dict | None = None) -> TargetSpec:
        spec = TargetSpec.for_bytes(data, custom)
        (self.blobs / spec.sha256).write_bytes(data)
        self.repo.add_targets({path: spec})
        return spec

    def updater(self, name: str = "agent", bootstrap: bytes | None = None) -> Updater:
        metadata_dir = self.home / name / "metadata"
        metadata_dir.mkdir(parents=True, exist_ok=True)
        return Updater(
            metadata_dir=str(metadata_dir),
            metadata_base_url=f"{self.base_url}/metadata/",
            target_dir=str(self.home / name / "targets"),
            target_base_url=f"{self.base_url}/targets/",
            bootstrap=bootstrap if bootstrap is not None else self.repo.root_json(),
        )

    def metadata_bytes(self, name: str) -> bytes:
        path = self.repo.metadata_file(name)
        assert path is not None, name
        return path.read_bytes()


def _handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = unquote(self.path)
            served.requests.append(path)
            body = served.overrides.get(path)
            if body is None and path.startswith("/metadata/"):
                file = served.repo.metadata_file(path.removeprefix("/metadata/"))
                body = file.read_bytes() if file is not None else None
            elif body is None and path.startswith("/targets/"):
                sha256 = served.repo.resolve_target(path.removeprefix("/targets/"))
                blob = served.blobs / sha256 if sha256 is not None else None
                body = blob.read_bytes() if blob is not None and blob.is_file() else None
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys(tmp_path: Path) -> TufKeys:
    return generate_keys(tmp_path / "keys", root_key_out=tmp_path / "offline" / "root.pem")


@contextmanager
def _serve(tmp_path: Path, keys: TufKeys, repo: TufRepository) -> Iterator[Served]:
    """Serve `repo` on 127.0.0.1 (the socket listens before this returns, so no waiting)."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    served = Served(
        repo=repo,
        keys=keys,
        directory=tmp_path / "tuf",
        key_dir=tmp_path / "keys",
        blobs=blobs,
        base_url=f"http://127.0.0.1:{server.server_port}",
        home=tmp_path / "agents",
    )
    server.RequestHandlerClass = _handler(served)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="tuf-http", daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def served(tmp_path: Path, keys: TufKeys, clock: Clock) -> Iterator[Served]:
    repo = TufRepository.create(
        tmp_path / "tuf", tmp_path / "keys", root_key_path=keys.root, bins=SMALL_BINS, clock=clock
    )
    with _serve(tmp_path, keys, repo) as served:
        yield served


def _versions(repo: TufRepository) -> dict[str, int]:
    return {role: repo.version(role) for role in ("root", "targets", "snapshot", "timestamp", *repo.bins)}


def _read_metadata(served: Served, role: str) -> Metadata:
    return Metadata.from_bytes(served.metadata_bytes(f"{served.repo.version(role)}.{role}.json"))


# --- agents verify what they fetch -------------------------------------------------------------


def test_agent_bootstraps_from_root_json_and_downloads_a_verified_target(served: Served) -> None:
    data = b"onnx weights\x00\x01" * 100
    served.publish("releases/fraud/1.0.0/files/model.onnx", data)

    root = served.repo.root_json()
    assert served.repo.root_sha256() == hashlib.sha256(root).hexdigest()
    assert served.metadata_bytes("1.root.json") == root

    updater = served.updater()
    info = updater.get_targetinfo("releases/fraud/1.0.0/files/model.onnx")
    assert info is not None and info.length == len(data)
    downloaded = updater.download_target(info)
    assert Path(downloaded).read_bytes() == data
    assert updater.get_targetinfo("releases/fraud/1.0.0/files/missing.onnx") is None
    # Consistent snapshots: the target was asked for by its hash-prefixed name.
    assert f"/targets/releases/fraud/1.0.0/files/{hashlib.sha256(data).hexdigest()}.model.onnx" in served.requests


def test_agent_receives_custom_metadata_and_paths_with_spaces_and_unicode(served: Served) -> None:
    path = unicodedata.normalize("NFC", "releases/kundenberatung/2.0.0/files/tokenizer config ü.json")
    served.publish(path, b"{}", custom={"kind": "model", "files": 3})
    agent = served.updater()
    info = agent.get_targetinfo(path)
    assert info is not None and info.custom == {"kind": "model", "files": 3}
    assert Path(agent.download_target(info)).read_bytes() == b"{}"


def test_agent_refuses_a_target_whose_bytes_changed_on_disk(served: Served) -> None:
    spec = served.publish("sites/branch-17/desired.json", b'{"release": "fraud/1.0.0"}')
    (served.blobs / spec.sha256).write_bytes(b'{"release": "evil/6.6.6"}')  # same length, other bytes

    updater = served.updater()
    info = updater.get_targetinfo("sites/branch-17/desired.json")
    assert info is not None
    with pytest.raises(exceptions.LengthOrHashMismatchError):
        updater.download_target(info)
    assert updater.find_cached_target(info) is None


def test_agent_refuses_a_target_longer_than_its_signed_length(served: Served) -> None:
    spec = served.publish("releases/fraud/1.0.0/files/model.onnx", b"x" * 1000)
    (served.blobs / spec.sha256).write_bytes(b"x" * 1000 + b"y" * 100_000)  # endless data

    updater = served.updater()
    info = updater.get_targetinfo("releases/fraud/1.0.0/files/model.onnx")
    assert info is not None
    with pytest.raises(exceptions.DownloadLengthMismatchError):
        updater.download_target(info)


def test_agent_refuses_a_rolled_back_timestamp(served: Served) -> None:
    old_timestamp = served.metadata_bytes("timestamp.json")
    served.publish("sites/branch-17/desired.json", b"{}")
    served.updater().refresh()  # the agent has now seen timestamp version 2

    served.overrides["/metadata/timestamp.json"] = old_timestamp
    with pytest.raises(exceptions.BadVersionNumberError):
        served.updater().refresh()


def test_agent_refuses_an_older_snapshot_served_for_the_current_version(served: Served) -> None:
    served.publish("sites/branch-17/desired.json", b"{}")
    version = served.repo.version("snapshot")
    served.overrides[f"/metadata/{version}.snapshot.json"] = served.metadata_bytes(f"{version - 1}.snapshot.json")
    with pytest.raises(exceptions.BadVersionNumberError):
        served.updater().refresh()


def test_agent_refuses_snapshot_rollback_even_from_a_validly_signed_timestamp(served: Served) -> None:
    served.publish("a", b"1")
    served.publish("b", b"2")
    served.updater().refresh()  # trusts snapshot version 3

    # Whoever holds the online timestamp key still cannot point agents back to snapshot 2.
    forged = Metadata(
        Timestamp(
            version=served.repo.version("timestamp") + 1,
            expires=datetime.now(UTC) + timedelta(days=1),
            snapshot_meta=MetaFile(version=served.repo.version("snapshot") - 1),
        )
    )
    forged.sign(load_signer(served.keys.timestamp))
    served.overrides["/metadata/timestamp.json"] = forged.to_bytes()
    with pytest.raises(exceptions.BadVersionNumberError):
        served.updater().refresh()


def test_agent_refuses_a_bin_from_another_snapshot(served: Served) -> None:
    path = "releases/fraud/1.0.0/files/model.onnx"
    served.publish(path, b"weights")
    bin_name = served.repo.bin_for(path)
    assert served.repo.version(bin_name) == 2
    # Mix and match: version 1 of the bin (without the target) served as version 2.
    served.overrides[f"/metadata/2.{bin_name}.json"] = served.metadata_bytes(f"1.{bin_name}.json")
    with pytest.raises(exceptions.BadVersionNumberError):
        served.updater().get_targetinfo(path)


def test_agent_refuses_an_expired_timestamp(tmp_path: Path, keys: TufKeys, clock: Clock) -> None:
    clock.offset = -timedelta(days=2)  # signed two days ago, with a one-day timestamp lifetime
    repo = TufRepository.create(tmp_path / "tuf", tmp_path / "keys", root_key_path=keys.root, bins=2, clock=clock)
    assert repo.expires("timestamp") < datetime.now(UTC)
    with _serve(tmp_path, keys, repo) as served, pytest.raises(exceptions.ExpiredMetadataError):
        served.updater().refresh()


def test_refresh_resigns_an_expired_timestamp_and_agents_keep_working(
    tmp_path: Path, keys: TufKeys, clock: Clock
) -> None:
    clock.offset = -timedelta(days=2)
    repo = TufRepository.create(tmp_path / "tuf", tmp_path / "keys", root_key_path=keys.root, bins=2, clock=clock)
    with _serve(tmp_path, keys, repo) as served:
        served.publish("sites/branch-17/desired.json", b"{}")  # signed "two days ago" too
        with pytest.raises(exceptions.ExpiredMetadataError):
            served.updater("frozen").refresh()

        clock.offset = timedelta(0)
        assert repo.refresh() == ["timestamp"]  # snapshot still has 5 of its 7 days
        assert repo.refresh() == []  # idempotent
        assert repo.expires("timestamp") > datetime.now(UTC) + timedelta(hours=23)
        assert served.updater("frozen").get_targetinfo("sites/branch-17/desired.json") is not None


def test_refresh_resigns_roles_past_half_their_lifetime(served: Served) -> None:
    served.publish("sites/branch-17/desired.json", b"{}")
    agent = served.updater()
    agent.refresh()
    before = _versions(served.repo)

    later = datetime.now(UTC) + timedelta(days=4)  # past half of snapshot's 7 days, not of targets' 90
    assert served.repo.refresh(now=later) == ["snapshot", "timestamp"]
    assert served.repo.refresh(now=later) == []
    after = _versions(served.repo)
    assert {role for role in after if after[role] != before[role]} == {"snapshot", "timestamp"}

    much_later = datetime.now(UTC) + timedelta(days=50)  # now the targets role and every bin too
    resigned = served.repo.refresh(now=much_later)
    assert resigned == ["targets", *sorted(served.repo.bins), "snapshot", "timestamp"]
    assert served.updater().get_targetinfo("sites/branch-17/desired.json") is not None


# --- publishing --------------------------------------------------------------------------------


def test_adding_a_target_bumps_only_its_bin_snapshot_and_timestamp(served: Served) -> None:
    repo = served.repo
    before = _versions(repo)
    path = "releases/fraud/1.0.0/files/model.onnx"
    bin_name = repo.bin_for(path)

    assert served.publish(path, b"weights v1") == repo.get_target(path)
    after = _versions(repo)
    changed = {role: (before[role], after[role]) for role in after if after[role] != before[role]}
    assert changed == {bin_name: (1, 2), "snapshot": (1, 2), "timestamp": (1, 2)}

    # Publishing the same target again is a no-op.
    assert repo.add_targets({path: repo.get_target(path)}) == []
    assert _versions(repo) == after

    # A path's content may change (desired state does): a new bin version, and agents see it.
    agent = served.updater()
    assert agent.get_targetinfo(path).hashes["sha256"] == hashlib.sha256(b"weights v1").hexdigest()
    served.publish(path, b"weights v2")
    assert repo.version(bin_name) == 3
    info = served.updater().get_targetinfo(path)
    assert Path(served.updater("fresh").download_target(info)).read_bytes() == b"weights v2"


def test_removed_targets_disappear_for_agents(served: Served) -> None:
    served.publish("approvals/a.json", b"a")
    served.publish("approvals/b.json", b"b")
    assert served.repo.remove_targets(["approvals/a.json", "approvals/never-published.json"]) == [
        served.repo.bin_for("approvals/a.json"),
        "snapshot",
        "timestamp",
    ]
    assert served.repo.remove_targets(["approvals/a.json"]) == []
    agent = served.updater()
    assert agent.get_targetinfo("approvals/a.json") is None
    assert agent.get_targetinfo("approvals/b.json") is not None


def test_thousand_targets_spread_across_bins_and_adding_one_stays_fast(
    tmp_path: Path, keys: TufKeys, capsys: pytest.CaptureFixture[str], record_property
) -> None:
    repo = TufRepository.create(tmp_path / "tuf", tmp_path / "keys", root_key_path=keys.root)
    assert len(repo.bins) == tuf_repo.DEFAULT_BINS
    releases = {
        f"releases/model-{i:04d}/1.0.0/files/model.onnx": TargetSpec(1000 + i, hashlib.sha256(b"%d" % i).hexdigest())
        for i in range(1000)
    }
    started = time.perf_counter()
    published = repo.add_targets(releases)
    bulk_seconds = time.perf_counter() - started
    assert published == [*sorted(repo.bins), "snapshot", "timestamp"]  # one publication for all 1,000

    with _serve(tmp_path, keys, repo) as served:
        per_bin = [len(_read_metadata(served, name).signed.targets) for name in repo.bins]
        assert sum(per_bin) == 1000 and min(per_bin) > 0
        top = _read_metadata(served, "targets").signed
        assert top.targets == {}
        assert top.delegations.succinct_roles.name_prefix == "bin"
        assert top.delegations.succinct_roles.bit_length == 6
        assert top.delegations.succinct_roles.keyids == [load_signer(keys.targets).public_key.keyid]

        agent = served.updater()
        agent.refresh()
        add_ms, refresh_ms = [], []
        for i in range(7):
            path = f"releases/new-{i}/1.0.0/files/model.onnx"
            data = b"new release %d" % i
            (served.blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
            started = time.perf_counter()
            roles = repo.add_targets({path: TargetSpec.for_bytes(data)})
            add_ms.append((time.perf_counter() - started) * 1000)
            assert roles == [repo.bin_for(path), "snapshot", "timestamp"]

            started = time.perf_counter()  # an agent with a warm cache notices the new release
            agent = served.updater()
            info = agent.get_targetinfo(path)
            refresh_ms.append((time.perf_counter() - started) * 1000)
            assert info is not None

    figures = {
        "targets": 1000,
        "bins": len(repo.bins),
        "targets_per_bin_min": min(per_bin),
        "targets_per_bin_max": max(per_bin),
        "add_1000_ms": round(bulk_seconds * 1000, 1),
        "add_one_at_1000_median_ms": round(statistics.median(add_ms), 1),
        "add_one_at_1000_max_ms": round(max(add_ms), 1),
        "agent_refresh_after_add_median_ms": round(statistics.median(refresh_ms), 1),
    }
    for name, value in figures.items():
        record_property(name, value)
    with capsys.disabled():
        print("\n\nTUF repository at 1,000 targets")
        for name, value in figures.items():
            print(f"  {name:<36} {value:>8}")
        print(json.dumps(figures))


def test_concurrent_publishers_lose_no_target(served: Served) -> None:
    repo = served.repo
    errors: list[BaseException] = []

    def publish(worker: int) -> None:
        try:
            for i in range(10):
                repo.add_targets({f"sites/site-{worker}-{i}/desired.json": TargetSpec(2, "ab" * 32)})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert repo.version("snapshot") == 1 + 4 * 10  # one snapshot per publication, none lost
    reopened = TufRepository.open(served.directory, served.key_dir)
    assert all(reopened.get_target(f"sites/site-{w}-{i}/desired.json") for w in range(4) for i in range(10))


def test_crash_before_timestamp_leaves_the_previous_snapshot_in_use(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    served.publish("a", b"1")
    before = _versions(served.repo)
    write_file = tuf_repo._write_file

    def crash_at_timestamp(path: Path, data: bytes, *, replace: bool) -> None:
        if path.name == "timestamp.json":
            raise OSError(28, "No space left on device")
        write_file(path, data, replace=replace)

    monkeypatch.setattr(tuf_repo, "_write_file", crash_at_timestamp)
    with pytest.raises(OSError, match="No space"):
        served.publish("b", b"2")
    monkeypatch.undo()

    # New bin and snapshot files are on disk, but nothing refers to them.
    assert _versions(served.repo) == before and served.repo.get_target("b") is None
    assert served.repo.metadata_file(f"{before['snapshot'] + 1}.snapshot.json") is not None
    agent = served.updater()
    assert agent.get_targetinfo("a") is not None and agent.get_targetinfo("b") is None

    reopened = TufRepository.open(served.directory, served.key_dir)
    assert _versions(reopened) == before
    served.repo = reopened
    served.publish("b", b"2")  # overwrites the orphans
    assert served.updater("after").get_targetinfo("b") is not None


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "a/../b",
        "../a",
        "a//b",
        "a/./b",
        "a/",
        "a?b",
        "a#b",
        "a%2e%2e/b",
        "a\\b",
        "a\x00b",
        "a\nb",
        "cafe\u0301",
        "x" * 1025,
    ],
)
def test_add_targets_rejects_paths_that_are_not_clean_relative_urls(served: Served, path: str) -> None:
    before = _versions(served.repo)
    with pytest.raises(TargetError):
        served.repo.add_targets({path: TargetSpec(1, "ab" * 32)})
    assert _versions(served.repo) == before


@pytest.mark.parametrize(
    "spec",
    [
        (-1, "ab" * 32),
        (True, "ab" * 32),
        (1, "AB" * 32),
        (1, "ab" * 31),
        (1,),
        TargetSpec(1, "ab" * 32, {"score": 0.5}),  # canonical JSON has no floats
        TargetSpec(1, "ab" * 32, ["not", "an", "object"]),
    ],
)
def test_add_targets_rejects_bad_specs_and_publishes_nothing(served: Served, spec: object) -> None:
    before = _versions(served.repo)
    with pytest.raises(TargetError):
        served.repo.add_targets({"ok/path": TargetSpec(1, "cd" * 32), "bad/path": spec})
    assert _versions(served.repo) == before and served.repo.get_target("ok/path") is None


def test_plain_length_and_hash_tuples_are_target_specs(served: Served) -> None:
    served.repo.add_targets({"releases/x/1.0.0/release.json": (12, "ef" * 32)})
    assert served.repo.get_target("releases/x/1.0.0/release.json") == TargetSpec(12, "ef" * 32)


# --- root --------------------------------------------------------------------------------------


def test_rotate_root_agents_with_root_v1_follow_the_chain(served: Served, tmp_path: Path) -> None:
    served.publish("sites/branch-17/desired.json", b"{}")
    root_v1 = served.repo.root_json()
    served.updater("early").refresh()  # an agent that has seen the repository before rotation

    second, third = tmp_path / "offline" / "root-2.pem", tmp_path / "offline" / "root-3.pem"
    generate_key(second)
    generate_key(third)
    assert served.repo.rotate_root(second, served.keys.root) == 2
    assert served.repo.rotate_root(third, second) == 3

    root_v3 = Metadata[Root].from_bytes(served.repo.root_json())
    assert root_v3.signed.version == 3
    assert root_v3.signed.roles["root"].keyids == [load_signer(third).public_key.keyid]
    assert set(root_v3.signatures) == {load_signer(second).public_key.keyid, load_signer(third).public_key.keyid}
    assert served.repo.root_sha256() == hashlib.sha256(served.repo.root_json()).hexdigest()

    for name in ("early", "enrolled-with-v1"):
        agent = served.updater(name, bootstrap=root_v1)
        info = agent.get_targetinfo("sites/branch-17/desired.json")
        assert Path(agent.download_target(info)).read_bytes() == b"{}"
        trusted = served.home / name / "metadata" / "root.json"
        assert trusted.read_bytes() == served.repo.root_json()

    # The old root key can no longer sign a rotation, and a reopened repository is at root 3.
    with pytest.raises(KeyFileError):
        served.repo.rotate_root(served.keys.root, served.keys.root)
    assert TufRepository.open(served.directory, served.key_dir).version("root") == 3


def test_agent_refuses_a_root_signed_only_by_the_new_key(served: Served, tmp_path: Path) -> None:
    new_key = tmp_path / "offline" / "stolen-rotation.pem"
    generate_key(new_key)
    signer = load_signer(new_key)
    forged = Metadata[Root].from_bytes(served.repo.root_json())
    forged.signed.version = 2
    forged.signed.add_key(signer.public_key, "root")
    forged.signed.revoke_key(load_signer(served.keys.root).public_key.keyid, "root")
    forged.sign(signer)  # the old root key did not sign
    served.overrides["/metadata/2.root.json"] = forged.to_bytes()

    with pytest.raises(exceptions.UnsignedMetadataError):
        served.updater().refresh()


def test_rotating_to_the_same_key_renews_root(served: Served, clock: Clock) -> None:
    old_expiry = served.repo.expires("root")
    clock.offset = timedelta(days=10)
    assert served.repo.rotate_root(served.keys.root, served.keys.root) == 2
    assert served.repo.expires("root") - old_expiry >= timedelta(days=9)
    assert served.updater(bootstrap=served.metadata_bytes("1.root.json")).get_targetinfo("x") is None


# --- serving -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../keys/tuf-targets.pem",
        "..%2Fkeys%2Ftuf-targets.pem",
        "/etc/passwd",
        "1.root.json/../../keys/tuf-root.pem",
        "keys/tuf-timestamp.pem",
        "root.json",
        "snapshot.json",
        "targets.json",
        "1.timestamp.json",
        "0.root.json",
        "01.root.json",
        "1.root.json\n",
        " 1.root.json",
        "1.ROOT.json",
        "1.bin-g.json",
        "1.bin-00.json",
        "1.bins-0.json",
        "1.unknown.json",
        "1.root.json.tmp",
        ".tuf-tmp-abc",
        "2.root.json",
        "",
        "١.root.json",
    ],
)
def test_metadata_file_serves_nothing_but_published_metadata(served: Served, name: str) -> None:
    assert served.repo.metadata_file(name) is None


def test_metadata_file_serves_every_role_name_ngclient_asks_for(served: Served) -> None:
    metadata_dir = served.directory / "metadata"
    for name in ("timestamp.json", "1.root.json", "1.snapshot.json", "1.targets.json", "1.bin-0.json", "1.bin-f.json"):
        assert served.repo.metadata_file(name) == metadata_dir / name


def test_resolve_target_maps_only_hash_prefixed_paths_of_known_targets(served: Served) -> None:
    repo = served.repo
    v1 = served.publish("sites/branch-17/desired.json", b'{"v": 1}')
    assert repo.resolve_target(f"sites/branch-17/{v1.sha256}.desired.json") == v1.sha256
    assert repo.resolve_target("sites/branch-17/desired.json") is None
    assert repo.resolve_target(f"sites/branch-18/{v1.sha256}.desired.json") is None
    assert repo.resolve_target(f"sites/branch-17/{'0' * 64}.desired.json") is None
    assert repo.resolve_target(f"sites/branch-17/{v1.sha256.upper()}.desired.json") is None
    assert repo.resolve_target(f"../{v1.sha256}.desired.json") is None
    assert repo.resolve_target(f"sites/../sites/branch-17/{v1.sha256}.desired.json") is None

    # An agent that read the previous bin version may still fetch the previous content.
    v2 = served.publish("sites/branch-17/desired.json", b'{"v": 2}')
    assert repo.resolve_target(f"sites/branch-17/{v2.sha256}.desired.json") == v2.sha256
    assert repo.resolve_target(f"sites/branch-17/{v1.sha256}.desired.json") == v1.sha256
    v3 = served.publish("sites/branch-17/desired.json", b'{"v": 3}')
    assert repo.resolve_target(f"sites/branch-17/{v1.sha256}.desired.json") is None
    repo.remove_targets(["sites/branch-17/desired.json"])
    assert repo.resolve_target(f"sites/branch-17/{v3.sha256}.desired.json") == v3.sha256
    assert repo.resolve_target(f"sites/branch-17/{v2.sha256}.desired.json") is None


# --- keys and lifecycle ------------------------------------------------------------------------


def test_key_files_are_private_and_never_overwritten(tmp_path: Path, keys: TufKeys) -> None:
    for path in (keys.root, keys.targets, keys.snapshot, keys.timestamp):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert keys.root == tmp_path / "offline" / "root.pem"
    assert not (tmp_path / "keys" / "tuf-root.pem").exists()
    before = keys.targets.read_bytes()
    with pytest.raises(KeyFileError):
        generate_keys(tmp_path / "keys")
    assert keys.targets.read_bytes() == before


def test_open_restores_the_repository_and_refuses_keys_it_does_not_trust(served: Served, tmp_path: Path) -> None:
    served.publish("a", b"1")
    directory = served.directory
    reopened = TufRepository.open(directory, served.key_dir)
    assert _versions(reopened) == _versions(served.repo)
    assert reopened.get_target("a") == served.repo.get_target("a")
    assert reopened.root_json() == served.repo.root_json()

    with pytest.raises(RepositoryStateError):
        TufRepository.create(directory, served.key_dir)
    generate_keys(tmp_path / "other-keys")
    with pytest.raises(KeyFileError):
        TufRepository.open(directory, tmp_path / "other-keys")
    with pytest.raises(RepositoryStateError):
        TufRepository.open(tmp_path / "nowhere", served.key_dir)


def test_open_refuses_metadata_that_does_not_verify(served: Served) -> None:
    served.publish("a", b"1")
    name = f"{served.repo.version('snapshot')}.snapshot.json"
    path = served.repo.metadata_file(name)
    md = Metadata[Snapshot].from_bytes(path.read_bytes())
    md.signed.meta["targets.json"] = MetaFile(version=1)
    md.signed.expires += timedelta(days=1)  # changed after signing
    path.write_bytes(md.to_bytes())
    with pytest.raises(RepositoryStateError):
        TufRepository.open(served.directory, served.key_dir)


def test_create_writes_a_complete_consistent_snapshot(served: Served) -> None:
    names = sorted(p.name for p in (served.directory / "metadata").iterdir())
    bins = [f"1.bin-{i:x}.json" for i in range(SMALL_BINS)]
    assert names == sorted(["1.root.json", "1.targets.json", "1.snapshot.json", "timestamp.json", *bins])
    root = Metadata[Root].from_bytes(served.repo.root_json()).signed
    assert root.consistent_snapshot is True
    assert all(key.keytype == "ed25519" for key in root.keys.values())
    snapshot = _read_metadata(served, "snapshot").signed
    assert set(snapshot.meta) == {"targets.json", *(f"bin-{i:x}.json" for i in range(SMALL_BINS))}
    assert isinstance(_read_metadata(served, "targets").signed, Targets)


# --- metadata limits: one release cannot break TUF for the others -----------------------------


def _paths_in_bin(repo: TufRepository, bin_name: str, prefix: str, count: int, pad: int = 60) -> list[str]:
    """`count` target paths under `prefix` that hash into `bin_name`: what an attacker crafts to flood it."""
    found, i = [], 0
    while len(found) < count:
        path = f"{prefix}/files/{i:0{pad}d}"
        if repo.bin_for(path) == bin_name:
            found.append(path)
        i += 1
    return found


def test_a_release_crafted_to_flood_one_bin_is_refused_and_publishes_nothing(served: Served) -> None:
    repo = served.repo
    site = "sites/3f1c2b8e-5d7a-4e0b-9c6f-1a2b3c4d5e6f/desired.json"
    served.publish(site, b'{"version": 1}')
    target_bin = repo.bin_for(site)
    flood = _paths_in_bin(repo, target_bin, "releases/flood/1.0.0", 1500)
    spec = TargetSpec.for_bytes(b"x")
    before = _versions(repo)
    with pytest.raises(tuf_repo.MetadataLimitError, match=f"hash bin {target_bin}") as refused:
        repo.add_targets(dict.fromkeys(flood, spec))
    assert refused.value.status == 413
    with pytest.raises(tuf_repo.MetadataLimitError):
        repo.check_targets(dict.fromkeys(flood, spec))
    assert _versions(repo) == before, "nothing was published"
    # The same number of files spread over the bins, as a real release's paths are, is fine.
    spread = {f"releases/big/1.0.0/files/{i:060d}": spec for i in range(1500)}
    repo.check_targets(spread)
    repo.add_targets(spread)


def test_a_full_bin_still_takes_every_sites_desired_state_and_refreshes_under_default_limits(served: Served) -> None:
    """Releases fill one bin up to MAX_BIN_BYTES, each within its own share: then the bin refuses more
    release targets, still takes desired states and revocations, and python-tuf's client, with its
    default limits, refreshes and finds the site's desired state."""
    repo = served.repo
    site = "sites/3f1c2b8e-5d7a-4e0b-9c6f-1a2b3c4d5e6f/desired.json"
    target_bin = repo.bin_for(site)
    spec = TargetSpec.for_bytes(b"x")
    release = 0
    while True:
        paths = _paths_in_bin(repo, target_bin, f"releases/filler/{release}.0.0", 800, pad=80)
        try:
            repo.add_targets(dict.fromkeys(paths, spec))
        except tuf_repo.MetadataLimitError as exc:
            assert "pass its limit" in str(exc)
            break
        release += 1
    assert release >= 5
    full = len(served.metadata_bytes(f"{repo.version(target_bin)}.{target_bin}.json"))
    assert tuf_repo.MAX_BIN_BYTES - tuf_repo.MAX_PUBLICATION_BIN_BYTES < full <= tuf_repo.MAX_BIN_BYTES
    # Sites' desired states and revocations are never refused.
    sites = _paths_in_bin(repo, target_bin, "sites", 200, pad=36)
    served.publish(site, b'{"version": 2}')
    repo.add_targets({f"{p}/desired.json": spec for p in sites})
    served.publish("releases/filler/0.0.0/revocations/" + "ab" * 32 + ".json", b"{}")
    size = len(served.metadata_bytes(f"{repo.version(target_bin)}.{target_bin}.json"))
    assert size < UpdaterConfig().targets_max_length
    agent = served.updater()  # python-tuf's default UpdaterConfig
    agent.refresh()
    info = agent.get_targetinfo(site)
    assert info is not None and Path(agent.download_target(info)).read_bytes() == b'{"version": 2}'


def test_superseded_metadata_files_are_pruned_and_clients_still_refresh(served: Served, clock: Clock) -> None:
    repo, metadata = served.repo, served.directory / "metadata"
    for i in range(5):
        served.publish(f"releases/r/1.0.{i}/release.json", f"manifest {i}".encode())
    agent = served.updater()
    agent.refresh()
    names_before = {p.name for p in metadata.iterdir()}
    assert repo.prune() == [], "superseded files stay for the grace period"
    clock.offset = tuf_repo.PRUNE_AFTER + timedelta(seconds=1)
    pruned = repo.prune()
    assert pruned and set(pruned) <= names_before
    left = {p.name for p in metadata.iterdir()}
    current = {f"{repo.version(role)}.{role}.json" for role in ("root", "targets", "snapshot", *repo.bins)}
    assert current | {"timestamp.json", "1.root.json"} <= left
    assert all(repo.version("snapshot") == int(name.split(".")[0]) for name in left if name.endswith(".snapshot.json"))
    served.publish("releases/r/2.0.0/release.json", b"manifest 2")
    assert served.updater().get_targetinfo("releases/r/2.0.0/release.json") is not None  # the same client, later
    assert served.updater("fresh-from-root-1").get_targetinfo("releases/r/1.0.4/release.json") is not None


def test_reopening_a_repository_prunes_what_earlier_runs_superseded(served: Served, clock: Clock) -> None:
    for i in range(3):
        served.publish(f"releases/r/1.0.{i}/release.json", f"manifest {i}".encode())
    reopened = TufRepository.open(served.directory, served.key_dir, clock=clock)
    clock.offset = tuf_repo.PRUNE_AFTER + timedelta(seconds=1)
    assert any(name.endswith(".snapshot.json") for name in reopened.prune())
    served.repo = reopened
    assert served.updater("after-reopen").get_targetinfo("releases/r/1.0.2/release.json") is not None
