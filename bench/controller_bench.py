"""Benchmark figures for the controller in `controller/`: how long `sitewarden release push` takes end to end
(hashing, resumable upload, registration) for a 1 GiB release against a real controller (HTTPS on loopback,
SQLite, data dir on the disk of `--workdir`), next to the baseline of `cp` plus `sha256sum` of the same file on the
same disk (and, as a fairer reference, `cp` plus `openssl dgst -sha256` and Python's hashlib), with the upload part
alone timed in-process with `Client.upload`; and how long a site's TUF client (python-tuf's ngclient `Updater`,
bootstrapped from the root enrollment hands out) takes to see a new release when the repository already holds
1,000 releases, together with the server-side time of the `POST /api/v1/releases` that publishes it (median of ten
releases added one by one). Everything reads from a warm page cache: page caches cannot be dropped without
privileges, so the file is generated (seeded AES-CTR keystream), the baseline runs right after, then the upload,
each after a `sync`. It prints a table with the targets marked PASS or MISS and ends with one JSON line of the
figures. Run it from the repository root with `.venv/bin/python bench/controller_bench.py [--quick]`; `--quick`
uses a 64 MiB file and 100 releases.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from controller.client import Client, LocalFile, sha256_file
from sitewarden import jointoken, tufclient
from sitewarden.keys import encode_public_key

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `tests` is not installed; it holds the throwaway CA and the controller launcher
from tests.controller_server import ControllerServer, start_controller  # noqa: E402
from tests.tls import make_pki  # noqa: E402

DEFAULT_WORKDIR = REPO / "bench" / ".tmp"
SEED = 20250601
MIB = 1 << 20
WRITE_CHUNK = 8 * MIB
SMALL_FILE_BYTES = 256
REPEATS = 10  # releases added one by one at each repository size; figures are their median
FILL_WORKERS = 4
PUSH_TIMEOUT_S = 3600

BIG_NAME, BIG_VERSION, BIG_FILE = "bench-model", "1.0.0", "model.bin"
FILL_NAME, PROBE_NAME, SMALL_FILE = "bench-fill", "bench-probe", "model.onnx"
CARD = {"owner": "bench", "intended_purposes": ["benchmark"], "risk_tier": "low"}
RELEASES_ROUTE = ("POST", "/api/v1/releases")
PATCH_ROUTE = ("PATCH", "/api/v1/uploads/{upload_id}")

TARGET_UPLOAD_RATIO = 2.0
TARGET_REFRESH_MS = 200.0

stderr = Console(stderr=True, log_path=False)


@dataclass(frozen=True)
class Workload:
    file_bytes: int
    releases: int  # releases the repository holds before the measured ones are added


FULL = Workload(file_bytes=1 << 30, releases=1000)
QUICK = Workload(file_bytes=64 * MIB, releases=100)


@dataclass(frozen=True)
class Baseline:
    """Seconds of each command over the generated file, run one after the other on the same disk."""

    cp_s: float
    sha256sum_s: float
    openssl_s: float
    hashlib_s: float
    fsync_s: float

    @property
    def cp_sha256sum_s(self) -> float:
        return self.cp_s + self.sha256sum_s

    @property
    def cp_openssl_s(self) -> float:
        return self.cp_s + self.openssl_s


@dataclass(frozen=True)
class Upload:
    push_s: float  # `sitewarden release push` as a process, end to end
    hash_s: float  # in-process: sha256_file, the CLI's hashing step
    upload_s: float  # in-process: Client.upload of fresh bytes of the same size
    upload_server_s: float  # server-side time of the PATCH requests of that upload


@dataclass(frozen=True)
class Refreshes:
    """One row per release added: publish and client refresh timings, what the refresh fetched."""

    releases_before: int
    publish_server_ms: list[float]
    publish_rtt_ms: list[float]
    refresh_ms: list[float]
    requests: list[int]
    fetched_bytes: list[int]

    @property
    def refresh_p50(self) -> float:
        return statistics.median(self.refresh_ms)

    @property
    def publish_p50(self) -> float:
        return statistics.median(self.publish_server_ms)

    @property
    def publish_rtt_p50(self) -> float:
        return statistics.median(self.publish_rtt_ms)


@dataclass(frozen=True)
class Figures:
    workload: Workload
    baseline: Baseline
    upload: Upload
    fill_s: float
    fill_count: int
    at_start: Refreshes
    at_size: Refreshes

    @property
    def ratio(self) -> float:
        return self.upload.push_s / self.baseline.cp_sha256sum_s

    @property
    def ratio_openssl(self) -> float:
        return self.upload.push_s / self.baseline.cp_openssl_s

    def summary(self) -> dict[str, Any]:
        b, u = self.baseline, self.upload
        return {
            "upload_1gib_s": round(u.push_s, 3),
            "cp_sha256_1gib_s": round(b.cp_sha256sum_s, 3),
            "upload_ratio": round(self.ratio, 3),
            "tuf_refresh_ms_at_1000": round(self.at_size.refresh_p50, 1),
            "tuf_publish_server_ms_at_1000": round(self.at_size.publish_p50, 1),
            "tuf_publish_rtt_ms_at_1000": round(self.at_size.publish_rtt_p50, 1),
            "tuf_refresh_ms_at_1000_max": round(max(self.at_size.refresh_ms), 1),
            "tuf_refresh_ms_at_start": round(self.at_start.refresh_p50, 1),
            "tuf_publish_server_ms_at_start": round(self.at_start.publish_p50, 1),
            "tuf_refresh_requests": statistics.median(self.at_size.requests),
            "tuf_refresh_bytes": statistics.median(self.at_size.fetched_bytes),
            "cp_openssl_1gib_s": round(b.cp_openssl_s, 3),
            "upload_ratio_openssl": round(self.ratio_openssl, 3),
            "cp_s": round(b.cp_s, 3),
            "sha256sum_s": round(b.sha256sum_s, 3),
            "openssl_sha256_s": round(b.openssl_s, 3),
            "hashlib_sha256_s": round(b.hashlib_s, 3),
            "fsync_copy_s": round(b.fsync_s, 3),
            "push_hash_only_s": round(u.hash_s, 3),
            "push_upload_only_s": round(u.upload_s, 3),
            "upload_server_s": round(u.upload_server_s, 3),
            "fill_releases_per_s": round(self.fill_count / self.fill_s, 1),
            "file_bytes": self.workload.file_bytes,
            "releases": self.workload.releases,
            "repeats": REPEATS,
        }


# -- helpers -----------------------------------------------------------------------------------------------------


def run_timed(command: Sequence[str]) -> tuple[float, str]:
    """Wall-clock seconds of a command and its stdout; exits the bench when it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {done.stderr.strip()}")
    return elapsed, done.stdout


def server_seconds(client: Client, route: tuple[str, str]) -> float:
    """The controller's own running total of seconds spent on `route` (its Prometheus latency histogram)."""
    method, template = route
    prefix = f'sitewarden_http_request_seconds_sum{{method="{method}",route="{template}"}} '
    for line in client.request("GET", "/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def write_random_file(path: Path, size: int, seed: int) -> str:
    """Write `size` seeded pseudo-random bytes (an AES-256-CTR keystream, incompressible); returns their SHA-256."""
    key = hashlib.sha256(f"sitewarden-bench-{seed}".encode()).digest()
    keystream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(WRITE_CHUNK)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for offset in range(0, size, WRITE_CHUNK):
            chunk = keystream.update(zeros[: min(WRITE_CHUNK, size - offset)])
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def upload_small(client: Client, data: bytes) -> dict[str, Any]:
    """Upload `data` as one blob (one POST and one PATCH); the file entry a release lists for it."""
    sha256 = hashlib.sha256(data).hexdigest()
    info = client.post("/api/v1/uploads", {"sha256": sha256, "size": len(data)})
    if not info["complete"]:
        client.request(
            "PATCH",
            f"/api/v1/uploads/{info['id']}",
            content=data,
            headers={"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        )
    return {"path": SMALL_FILE, "sha256": sha256, "size": len(data)}


def register(client: Client, name: str, version: str, files: list[dict[str, Any]]) -> dict[str, Any]:
    body = {"name": name, "version": version, "kind": "model", "runtime": "onnx", "files": files, "metadata": CARD}
    return client.post("/api/v1/releases", body)


def small_bytes(name: str, version: str, rng: random.Random) -> bytes:
    """Distinct tiny file contents for each release."""
    return f"{name} {version}\n".encode() + rng.randbytes(SMALL_FILE_BYTES)


class CountingFetcher(tufclient.HttpxFetcher):
    """The agent's fetcher (a fresh site JWT per request), counting requests and bytes received."""

    def __init__(self, ca_cert: str, site: Site) -> None:
        super().__init__(ca_cert, credential=site.credential, origin=site.controller_url)
        self.requests = 0
        self.received = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.requests += 1
        return self._counted(super()._fetch(url))

    def _counted(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.received += len(chunk)
            yield chunk


# -- upload ------------------------------------------------------------------------------------------------------


def measure_baseline(source: Path, expected: str, scratch: Path) -> Baseline:
    """`cp` to a new file on the same disk, then hash the copy with sha256sum, openssl and hashlib."""
    copy = scratch / "copy.bin"
    os.sync()
    stderr.log(f"baseline: cp {source.name} to a new file")
    cp_s, _ = run_timed(["cp", str(source), str(copy)])
    stderr.log("baseline: sha256sum, openssl dgst -sha256, hashlib over the copy")
    sha256sum_s, out = run_timed(["sha256sum", str(copy)])
    openssl_s, out_openssl = run_timed(["openssl", "dgst", "-sha256", "-r", str(copy)])
    start = time.perf_counter()
    hashed = sha256_file(copy)
    hashlib_s = time.perf_counter() - start
    for tool, digest in (("sha256sum", out.split()[0]), ("openssl", out_openssl.split()[0]), ("hashlib", hashed)):
        if digest != expected:
            raise RuntimeError(f"{tool} says the copy hashes to {digest}, the file written hashes to {expected}")
    start = time.perf_counter()
    fsync_path(copy)
    fsync_s = time.perf_counter() - start
    copy.unlink()
    return Baseline(cp_s, sha256sum_s, openssl_s, hashlib_s, fsync_s)


def push_release(server: ControllerServer, token: str, release_dir: Path, card: Path) -> float:
    """Seconds `sitewarden release push` takes as a process, from start to exit."""
    command = [sys.executable, "-m", "sitewarden", "release", "push", str(release_dir)]
    command += ["--name", BIG_NAME, "--version", BIG_VERSION, "--metadata", str(card)]
    os.sync()
    stderr.log(f"sitewarden release push {release_dir.name} --name {BIG_NAME} --version {BIG_VERSION}")
    start = time.perf_counter()
    done = subprocess.run(
        command,
        env={**os.environ, **server.cli_env(token)},
        capture_output=True,
        text=True,
        timeout=PUSH_TIMEOUT_S,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"release push exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return elapsed


def measure_upload(server: ControllerServer, token: str, run_dir: Path, size: int) -> tuple[Baseline, Upload]:
    release_dir = run_dir / "release"
    release_dir.mkdir()
    source = release_dir / BIG_FILE
    card = run_dir / "card.json"  # outside the release directory: push sends every file in it
    card.write_text(json.dumps(CARD))
    stderr.log(f"writing {size / MIB:,.0f} MiB of seeded pseudo-random bytes")
    expected = write_random_file(source, size, SEED)
    baseline = measure_baseline(source, expected, run_dir)

    push_s = push_release(server, token, release_dir, card)
    with server.client(token) as client:
        release = client.get(f"/api/v1/releases/{BIG_NAME}/{BIG_VERSION}")
        if [(f["path"], f["sha256"], f["size"]) for f in release["files"]] != [(BIG_FILE, expected, size)]:
            raise RuntimeError(f"release push registered {release['files']}, not {BIG_FILE} {expected} {size}")

        # The controller now stores these bytes, so a second upload would be skipped: change the first bytes
        # (one page; the file stays in the page cache) and time hashing and uploading them in this process.
        with open(source, "r+b") as f:
            f.write(b"sitewarden bench: upload alone")
        os.sync()
        stderr.log("in-process: sha256_file, then Client.upload of the changed file")
        start = time.perf_counter()
        digest = sha256_file(source)
        hash_s = time.perf_counter() - start
        before = server_seconds(client, PATCH_ROUTE)
        start = time.perf_counter()
        client.upload(LocalFile(BIG_FILE, source, digest, size))
        upload_s = time.perf_counter() - start
        upload_server_s = server_seconds(client, PATCH_ROUTE) - before
        if not client.post("/api/v1/uploads", {"sha256": digest, "size": size})["complete"]:
            raise RuntimeError("Client.upload returned but the controller does not hold the blob")
    source.unlink()
    return baseline, Upload(push_s, hash_s, upload_s, upload_server_s)


# -- TUF ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """The enrolled site whose TUF client the bench times: the controller serves TUF to enrolled sites only."""

    root: bytes
    controller_url: str
    credential: tufclient.Credential


def enroll(server: ControllerServer) -> Site:
    """Create a site, issue a join token and enroll; the TUF root enrollment returns, checked against the token."""
    with server.client(server.admin_token) as admin:
        site = admin.post("/api/v1/sites", {"name": "bench-site", "labels": {}})
        token = admin.post(f"/api/v1/sites/{site['name']}/join-tokens", {"ttl_seconds": 600})["token"]
    key = Ed25519PrivateKey.generate()
    with server.client() as anonymous:
        enrolled = anonymous.post("/api/v1/enroll", {"token": token, "public_key": encode_public_key(key)})
    root = base64.b64decode(enrolled["root"])
    if hashlib.sha256(root).hexdigest() != jointoken.parse(token).root_sha256:
        raise RuntimeError("enrollment returned a root whose SHA-256 differs from the join token's")
    return Site(root, server.url, tufclient.site_credential(key, enrolled["site_id"], server.url))


def refresh(
    server: ControllerServer, site: Site, metadata_dir: Path, target: str | None = None, sha256: str | None = None
) -> tuple[float, int, int]:
    """A new Updater over the cached metadata, as an agent does when woken: refresh, then look `target` up.

    Returns milliseconds, requests and bytes fetched.
    """
    fetcher = CountingFetcher(str(server.pki.ca_cert), site)
    try:
        start = time.perf_counter()
        updater = tufclient.updater(metadata_dir, server.url, ca_cert=str(server.pki.ca_cert), fetcher=fetcher)
        updater.refresh()
        info = updater.get_targetinfo(target) if target else None
        elapsed_ms = (time.perf_counter() - start) * 1000
    finally:
        fetcher.close()
    if target is not None and (info is None or info.hashes.get("sha256") != sha256):
        raise RuntimeError(f"the TUF client does not see {target} with sha256 {sha256}: {info}")
    return elapsed_ms, fetcher.requests, fetcher.received


def measure_refreshes(
    server: ControllerServer,
    client: Client,
    site: Site,
    metadata_dir: Path,
    *,
    releases_before: int,
    major: int,
    rng: random.Random,
) -> Refreshes:
    """Add REPEATS releases one by one; time each publication and the client refresh that finds it."""
    os.sync()
    refresh(server, site, metadata_dir)  # catch up first: the agent has followed every earlier release
    rows: list[tuple[float, float, float, int, int]] = []
    for i in range(REPEATS):
        version = f"{major}.0.{i}"
        data = small_bytes(PROBE_NAME, version, rng)
        files = [upload_small(client, data)]
        before = server_seconds(client, RELEASES_ROUTE)
        start = time.perf_counter()
        register(client, PROBE_NAME, version, files)
        rtt_ms = (time.perf_counter() - start) * 1000
        server_ms = (server_seconds(client, RELEASES_ROUTE) - before) * 1000
        target = f"releases/{PROBE_NAME}/{version}/files/{SMALL_FILE}"
        refresh_ms, requests, received = refresh(server, site, metadata_dir, target, files[0]["sha256"])
        rows.append((server_ms, rtt_ms, refresh_ms, requests, received))
    columns = list(zip(*rows, strict=True))
    return Refreshes(
        releases_before,
        publish_server_ms=list(columns[0]),
        publish_rtt_ms=list(columns[1]),
        refresh_ms=list(columns[2]),
        requests=list(columns[3]),
        fetched_bytes=list(columns[4]),
    )


def fill(client: Client, count: int, rng: random.Random) -> float:
    """Register `count` one-file releases (distinct tiny blobs), FILL_WORKERS at a time; seconds taken."""
    work = [(f"1.0.{i}", small_bytes(FILL_NAME, f"1.0.{i}", rng)) for i in range(count)]
    start = time.perf_counter()
    with Progress(console=stderr, transient=True) as progress, ThreadPoolExecutor(FILL_WORKERS) as pool:
        task = progress.add_task(f"registering {count:,} releases", total=count)

        def one(item: tuple[str, bytes]) -> None:
            version, data = item
            register(client, FILL_NAME, version, [upload_small(client, data)])
            progress.advance(task)

        for _ in pool.map(one, work):
            pass
    elapsed = time.perf_counter() - start
    stderr.log(f"registered {count:,} releases in {elapsed:.1f} s")
    return elapsed


# -- running -----------------------------------------------------------------------------------------------------


def measure(run_dir: Path, workload: Workload) -> Figures:
    rng = random.Random(SEED)
    pki = make_pki(run_dir / "pki")
    stderr.log("starting a controller (TLS, SQLite)")
    server = start_controller(run_dir, pki)
    try:
        token = server.token("operator", "bench-operator")
        baseline, upload = measure_upload(server, token, run_dir, workload.file_bytes)
        held = 1  # the release just pushed

        metadata_dir = run_dir / "agent-metadata"
        site = enroll(server)
        fetcher = tufclient.HttpxFetcher(str(pki.ca_cert), credential=site.credential, origin=site.controller_url)
        try:  # the agent's first refresh, trusting the root enrollment returned
            tufclient.updater(metadata_dir, server.url, root=site.root, fetcher=fetcher).refresh()
        finally:
            fetcher.close()
        with server.client(token) as client:
            stderr.log(f"adding {REPEATS} releases to a repository of {held}, refreshing after each")
            at_start = measure_refreshes(server, client, site, metadata_dir, releases_before=held, major=0, rng=rng)
            held += REPEATS
            count = max(workload.releases - held, 0)
            fill_s = fill(client, count, rng)
            held += count
            stderr.log(f"adding {REPEATS} releases to a repository of {held:,}, refreshing after each")
            at_size = measure_refreshes(server, client, site, metadata_dir, releases_before=held, major=2, rng=rng)
    except BaseException:
        stderr.print(f"controller log (last lines):\n{server.log()[-4000:]}", markup=False)
        raise
    finally:
        server.stop()
    return Figures(workload, baseline, upload, fill_s, count, at_start, at_size)


def filesystem_of(path: Path) -> str:
    """'<device> <type>' of the mount holding `path`, from /proc/mounts (or 'unknown')."""
    best = ("", "unknown")
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best[1]
    resolved = str(path.resolve())
    for line in mounts:
        device, mount_point, fs_type = line.split()[:3]
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best[0]):
            best = (mount_point, f"{device} {fs_type}")
    return best[1]


def status(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def rate(size: int, seconds: float) -> str:
    return f"{size / MIB / seconds:,.0f} MiB/s"


def render(figures: Figures, disk: str) -> Table:
    w, b, u = figures.workload, figures.baseline, figures.upload
    size = f"{w.file_bytes / MIB:,.0f} MiB"
    table = Table(title=f"Sitewarden controller ({os.cpu_count()} cores, {disk}, warm page cache)")
    table.add_column("Measure")
    table.add_column("Value", justify="right")
    table.add_column("Rate", justify="right")
    table.add_column("Target", justify="right")
    table.add_column("", justify="center")

    table.add_row(f"cp of the {size} file to a new file", f"{b.cp_s:.2f} s", rate(w.file_bytes, b.cp_s))
    table.add_row("sha256sum of the copy", f"{b.sha256sum_s:.2f} s", rate(w.file_bytes, b.sha256sum_s))
    table.add_row("openssl dgst -sha256 of the copy", f"{b.openssl_s:.2f} s", rate(w.file_bytes, b.openssl_s))
    table.add_row("hashlib SHA-256 of the copy (sha256_file)", f"{b.hashlib_s:.2f} s", rate(w.file_bytes, b.hashlib_s))
    table.add_row("fsync of the copy (not in the baselines)", f"{b.fsync_s:.2f} s")
    table.add_row("Baseline: cp + sha256sum", f"{b.cp_sha256sum_s:.2f} s", rate(w.file_bytes, b.cp_sha256sum_s))
    table.add_row("Reference: cp + openssl", f"{b.cp_openssl_s:.2f} s", rate(w.file_bytes, b.cp_openssl_s))
    table.add_section()
    limit = TARGET_UPLOAD_RATIO * b.cp_sha256sum_s
    table.add_row(
        "sitewarden release push, end to end",
        f"{u.push_s:.2f} s",
        rate(w.file_bytes, u.push_s),
        f"≤ {limit:.2f} s",
        status(u.push_s <= limit),
    )
    table.add_row(
        "  push / (cp + sha256sum)",
        f"{figures.ratio:.2f}x",
        "",
        f"≤ {TARGET_UPLOAD_RATIO:g}x",
        status(figures.ratio <= TARGET_UPLOAD_RATIO),
    )
    table.add_row("  push / (cp + openssl)", f"{figures.ratio_openssl:.2f}x")
    table.add_row("In-process: hashing (sha256_file)", f"{u.hash_s:.2f} s", rate(w.file_bytes, u.hash_s))
    table.add_row("In-process: Client.upload alone", f"{u.upload_s:.2f} s", rate(w.file_bytes, u.upload_s))
    table.add_row("  of which server-side PATCH time", f"{u.upload_server_s:.2f} s")
    table.add_row("  Client.upload / (cp + openssl)", f"{u.upload_s / b.cp_openssl_s:.2f}x")
    table.add_section()

    fill_rate = f"{figures.fill_count / figures.fill_s:,.1f}/s" if figures.fill_s else ""
    table.add_row(
        f"Register {figures.fill_count:,} one-file releases ({FILL_WORKERS} at a time)",
        f"{figures.fill_s:.1f} s",
        fill_rate,
    )
    for refreshes in (figures.at_start, figures.at_size):
        held = f"{refreshes.releases_before:,} release{'s' if refreshes.releases_before > 1 else ''}"
        is_target = refreshes is figures.at_size
        table.add_row(f"With {held} held, p50 of {REPEATS} added:", "")
        table.add_row("  POST /api/v1/releases, server-side", f"{refreshes.publish_p50:.1f} ms")
        table.add_row("  POST /api/v1/releases, round trip", f"{refreshes.publish_rtt_p50:.1f} ms")
        target = (
            (f"≤ {TARGET_REFRESH_MS:g} ms", status(refreshes.refresh_p50 <= TARGET_REFRESH_MS)) if is_target else ()
        )
        table.add_row("  Updater refresh + get_targetinfo", f"{refreshes.refresh_p50:.1f} ms", "", *target)
        table.add_row(
            "    max; requests, bytes fetched (p50)",
            f"{max(refreshes.refresh_ms):.1f} ms",
            f"{statistics.median(refreshes.requests):g} req, {statistics.median(refreshes.fetched_bytes):,.0f} B",
        )
    table.caption = (
        "Baselines and upload on the same disk, each after a sync, page cache warm (caches cannot be dropped). "
        "The controller fsyncs every blob it stores; cp does not. "
        "Refresh: a new Updater on the cached metadata dir, new HTTPS connection, refresh() and get_targetinfo() "
        "of the new release's file."
    )
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return _common.parse_args(
        __doc__,
        argv,
        quick="a 64 MiB file and 100 releases",
        workdir_help="directory on the disk to measure, for the controller's data dir and the files",
        default=DEFAULT_WORKDIR,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workload = QUICK if args.quick else FULL
    with _common.scratch_dir(args.workdir, "controller-bench-") as run_dir:
        disk = filesystem_of(args.workdir)
        figures = measure(run_dir, workload)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # rich assumes 80 columns when piped; the table needs more
    console.print(render(figures, disk))
    print(json.dumps(figures.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
