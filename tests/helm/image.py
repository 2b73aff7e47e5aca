"""The image under test: a Debian 12 base made with debootstrap, then `make wheelhouse` and `make image-offline`.

No base image can be pulled here, so the base is built the way the issue asks: `debootstrap
--variant=minbase` of bookworm with only what the Containerfile needs of a Python 3.11 base
(`python3-venv` for `python3 -m venv`, `libatomic1` for regopy), imported into podman. It is kept
under a tag derived from that recipe, so a second run on the same machine reuses it; CI builds it
once per run. The wheelhouse is built at the same time (two threads), then the image is built by
the Makefile with `--network none`: the build reaches no index, as in an air-gapped bank.

podman runs as this machine needs it: `--runtime runc --cgroup-manager cgroupfs` and explicit
ulimits below the hard limits.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]
SUITE = "bookworm"
MIRROR = os.environ.get("SITEWARDEN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the Containerfile needs of its base beyond minbase: `python3 -m venv` and regopy's libatomic.
BASE_PACKAGES = ("python3-venv", "libatomic1")
# Left out of the base: documentation, manuals and translations, and apt's caches.
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt", "var/lib/apt/lists")
RECIPE = f"{SUITE} minbase {','.join(BASE_PACKAGES)} trim={','.join(TRIM)} v1"
BASE_TAG = f"localhost/sitewarden-test-base:{SUITE}-{hashlib.sha256(RECIPE.encode()).hexdigest()[:12]}"


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def _run(command: list[str], *, cwd: Path | None = None, timeout: float = 900) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        raise AssertionError(f"{' '.join(command[:4])} ... exited {done.returncode}:\n{output}")


def base_image(workdir: Path) -> str:
    """The Debian 12 base (debootstrap, minbase + Python 3.11), built unless this machine has it."""
    if podman("image", "exists", BASE_TAG, check=False).returncode == 0:
        return BASE_TAG
    rootfs = workdir / "rootfs"
    command = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs), MIRROR]
    _run(command)
    for part in TRIM:
        target = rootfs / part
        if target.is_dir():
            shutil.rmtree(target)
            target.mkdir()
    archive = workdir / "rootfs.tar"
    _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(archive), "."])
    podman("import", "--change", 'CMD ["/bin/sh"]', str(archive), BASE_TAG)
    archive.unlink()
    shutil.rmtree(rootfs, ignore_errors=True)
    return BASE_TAG


@dataclass(frozen=True)
class BuiltImage:
    reference: str  # localhost/sitewarden:<tag>
    repository: str  # sitewarden
    tag: str
    size_bytes: int
    seconds: dict[str, float]


# What a build takes at its peak in podman's storage and the work dir, measured: 2.5 GB (the base,
# the wheelhouse, the image), with room for what the suite's other worker writes meanwhile.
BUILD_SPACE = 4 * 2**30


def _require_space() -> None:
    """A full disk fails deep inside buildah's copier; say so before starting, naming the numbers."""
    for where in (Path(podman("info", "--format", "{{.Store.GraphRoot}}").stdout.strip()), Path(tempfile.gettempdir())):
        free = shutil.disk_usage(where).free
        if free < BUILD_SPACE:
            raise AssertionError(
                f"building the image needs about {BUILD_SPACE / 2**30:.0f} GiB free; "
                f"{where} has {free / 2**30:.1f} GiB free"
            )


def build(workdir: Path, tag: str) -> BuiltImage:
    """Base and wheelhouse side by side, then `make image-offline` with podman (no network in the build)."""
    _require_space()
    seconds: dict[str, float] = {}

    def timed(name: str, work):
        started = time.monotonic()
        try:
            return work()
        finally:
            seconds[name] = round(time.monotonic() - started, 1)

    context = workdir / "context"
    wheelhouse = context / "wheelhouse"
    make = ["make", "--no-print-directory", "-C", str(REPO), "-o", ".venv/.installed"]
    with ThreadPoolExecutor(2) as pool:
        base = pool.submit(timed, "base image (debootstrap)", lambda: base_image(workdir))
        wheels = pool.submit(timed, "make wheelhouse", lambda: _run([*make, "wheelhouse", f"WHEELHOUSE={wheelhouse}"]))
        base_tag = base.result()
        wheels.result()
    repository = "localhost/sitewarden"
    reference = f"{repository}:{tag}"
    tool = " ".join(PODMAN)
    # --layers=false: no intermediate images are left behind; each run builds from a new wheelhouse anyway.
    flags = " ".join(["--network", "none", "--layers=false", *ULIMITS])
    timed(
        "make image-offline",
        lambda: _run(
            [
                *make,
                "image-offline",
                f"WHEELHOUSE={wheelhouse}",
                f"IMAGE={reference}",
                f"BASE_IMAGE={base_tag}",
                f"CONTAINER_TOOL={tool}",
                f"BUILD_FLAGS={flags}",
            ]
        ),
    )
    size = int(podman("image", "inspect", reference, "--format", "{{.Size}}").stdout.strip())
    return BuiltImage(reference, repository.removeprefix("localhost/"), tag, size, seconds)


def remove(reference: str) -> None:
    """Remove the image (the base stays: the next run on this machine reuses it)."""
    podman("rmi", "--force", reference, check=False)
