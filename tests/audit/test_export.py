"""Exports in the C2SP tlog-tiles layout and their offline verification, including tampering."""

from __future__ import annotations

import base64
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from audit import FormatError, Log, merkle, tiles, verify_export
from audit import export as export_module
from audit.checkpoint import Checkpoint, parse
from audit.note import Signer, generate_key, note_text, sign
from tests.conftest import make_entries, run_cli

SIZE = 70_000 // 100  # 700: two full bundles and a partial one, two tile levels


@pytest.fixture
def exported(tmp_path: Path, keypair: tuple[str, str]) -> Path:
    with Log.open(tmp_path / "log", keypair[0]) as log:
        log.append_many(make_entries(SIZE))
        log.checkpoint()
        log.append_many(make_entries(10, start=SIZE))  # after the checkpoint: not exported
        return log.export(tmp_path / "export")


def _bundle_entries(path: Path) -> list[bytes]:
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 2], "big")
        out.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return out


def _write_bundle(path: Path, entries: list[bytes]) -> None:
    path.write_bytes(b"".join(len(e).to_bytes(2, "big") + e for e in entries))


def test_index_paths_follow_tlog_tiles() -> None:
    assert tiles.encode_index(0) == "000"
    assert tiles.encode_index(1234067) == "x001/x234/067"
    assert tiles.tile_path(0, 1, 5) == "tile/0/001.p/5"
    assert tiles.bundle_path(1000) == "tile/entries/x001/000"
    # A tree of 70,000 leaves, as in the specification's example.
    widths = {(lv, n): w for lv, n, w in tiles.tiles(70_000) if w < 256}
    assert widths == {(0, 273): 112, (1, 1): 17, (2, 0): 1}
    assert sum(1 for lv, _, w in tiles.tiles(70_000) if lv == 0 and w == 256) == 273


def test_export_has_the_tlog_tiles_layout_and_verifies(exported: Path, keypair: tuple[str, str]) -> None:
    files = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    assert files == [
        "checkpoint",
        "checkpoints.jsonl",
        "manifest.json",
        "tile/0/000",
        "tile/0/001",
        "tile/0/002.p/188",
        "tile/1/000.p/2",
        "tile/entries/000",
        "tile/entries/001",
        "tile/entries/002.p/188",
        "vkeys",
    ]
    assert (exported / "vkeys").read_text().strip() == keypair[1]
    # The history holds every checkpoint the log signed, the export's last.
    history = [json.loads(line)["note"] for line in (exported / "checkpoints.jsonl").read_text().splitlines()]
    assert history[-1] == (exported / "checkpoint").read_text()
    report = verify_export(exported, [keypair[1]])
    assert report.valid, report.reason
    assert (report.size, report.origin) == (SIZE, "sitewarden/test-site")
    assert report.signers == ("+".join(keypair[1].split("+")[:2]),)


def test_flipped_byte_in_an_entry_is_reported_at_that_entry(exported: Path, keypair: tuple[str, str]) -> None:
    bundle = exported / "tile/entries/001"
    entries = _bundle_entries(bundle)
    entries[45] = entries[45][:5] + bytes([entries[45][5] ^ 1]) + entries[45][6:]
    _write_bundle(bundle, entries)
    report = verify_export(exported, [keypair[1]])
    assert not report.valid
    assert report.entry == 256 + 45
    assert "entry 301 does not match the checkpoint" in report.reason


def test_flipped_byte_in_a_hash_tile_is_reported_at_that_tile(exported: Path, keypair: tuple[str, str]) -> None:
    for rel in ("tile/0/001", "tile/1/000.p/2", "tile/0/002.p/188"):
        tile = exported / rel
        original = tile.read_bytes()
        at = len(original) // 2 + 3
        tile.write_bytes(original[:at] + bytes([original[at] ^ 0x80]) + original[at + 1 :])
        report = verify_export(exported, [keypair[1]])
        assert not report.valid
        assert report.tile == rel
        assert report.entry is None
        tile.write_bytes(original)
    assert verify_export(exported, [keypair[1]]).valid


def test_flipped_byte_in_the_checkpoint_is_reported(exported: Path, keypair: tuple[str, str]) -> None:
    cp = exported / "checkpoint"
    cp.write_text(cp.read_text().replace(f"\n{SIZE}\n", f"\n{SIZE - 1}\n"))
    report = verify_export(exported, [keypair[1]])
    assert not report.valid
    assert report.tile == "checkpoint"
    assert "invalid signature" in report.reason


def test_checkpoint_resigned_by_another_key_is_rejected(exported: Path, keypair: tuple[str, str]) -> None:
    cp = exported / "checkpoint"
    forger, _ = generate_key("sitewarden/test-site")
    cp.write_text(sign(note_text(cp.read_text()), Signer(forger)))
    report = verify_export(exported, [keypair[1]])
    assert not report.valid
    assert report.tile == "checkpoint"
    assert "no signature by a trusted key" in report.reason


def test_truncated_bundle_is_reported_at_the_first_missing_entry(exported: Path, keypair: tuple[str, str]) -> None:
    bundle = exported / "tile/entries/002.p/188"
    entries = _bundle_entries(bundle)
    data = bundle.read_bytes()
    keep = sum(2 + len(e) for e in entries[:100]) + 7  # 100 whole entries and a piece of the next
    bundle.write_bytes(data[:keep])
    report = verify_export(exported, [keypair[1]])
    assert not report.valid
    assert report.entry == 512 + 100
    assert "truncated" in report.reason


def test_two_swapped_entries_are_reported_at_the_first(exported: Path, keypair: tuple[str, str]) -> None:
    bundle = exported / "tile/entries/000"
    entries = _bundle_entries(bundle)
    entries[10], entries[20] = entries[20], entries[10]
    _write_bundle(bundle, entries)
    report = verify_export(exported, [keypair[1]])
    assert not report.valid
    assert report.entry == 10


def test_removed_entry_is_reported_where_it_was(exported: Path, keypair: tuple[str, str]) -> None:
    bundle = exported / "tile/entries/001"
    entries = _bundle_entries(bundle)
    del entries[200]
    _write_bundle(bundle, entries)
    report = verify_export(exported, [keypair[1]])
    assert not report.valid
    assert report.entry == 256 + 200
    assert "255 of 256 entries" in report.reason


def test_entry_altered_together_with_its_level0_tile_is_still_found(exported: Path, keypair: tuple[str, str]) -> None:
    """An attacker who rewrites an entry and its leaf hash in the tile is caught by the level above."""
    bundle = exported / "tile/entries/001"
    entries = _bundle_entries(bundle)
    entries[3] = b'{"forged":true}'
    _write_bundle(bundle, entries)
    tile = bytearray((exported / "tile/0/001").read_bytes())
    tile[3 * 32 : 4 * 32] = merkle.leaf_hash(entries[3])
    (exported / "tile/0/001").write_bytes(bytes(tile))
    report = verify_export(exported, [keypair[1]])
    assert not report.valid
    assert report.entry == 256
    assert "[256, 512)" in report.reason


def test_missing_bundle_and_missing_tile_are_reported(exported: Path, keypair: tuple[str, str]) -> None:
    (exported / "tile/1/000.p/2").unlink()
    report = verify_export(exported, [keypair[1]])
    assert (report.valid, report.tile) == (False, "tile/1/000.p/2")
    (exported / "tile/entries/000").unlink()
    report = verify_export(exported, [keypair[1]])
    assert not report.valid
    assert report.entry == 0
    assert "tile/entries/000 is missing" in report.reason


def test_tarball_export_verifies_and_tampering_inside_it_is_found(tmp_path: Path, keypair: tuple[str, str]) -> None:
    with Log.open(tmp_path / "log", keypair[0]) as log:
        log.append_many(make_entries(300))
        log.checkpoint()
        tgz = log.export(tmp_path / "export.tar.gz")
    assert verify_export(tgz, [keypair[1]]).valid
    # Repack with one entry changed, under a top-level directory as `tar czf x.tgz dir/` would.
    unpacked = tmp_path / "unpacked"
    with tarfile.open(tgz) as tar:
        tar.extractall(unpacked / "audit-export", filter="data")
    bundle = unpacked / "audit-export/tile/entries/000"
    entries = _bundle_entries(bundle)
    entries[0] = b"{}"
    _write_bundle(bundle, entries)
    repacked = tmp_path / "repacked.tgz"
    with tarfile.open(repacked, "w:gz") as tar:
        tar.add(unpacked / "audit-export", arcname="audit-export")
    report = verify_export(repacked, [keypair[1]])
    assert (report.valid, report.entry) == (False, 0)


def test_unusable_input_raises_format_error(tmp_path: Path, keypair: tuple[str, str]) -> None:
    with pytest.raises(FormatError, match="does not exist"):
        verify_export(tmp_path / "nope", [keypair[1]])
    (tmp_path / "garbage.tar").write_bytes(b"not a tar archive at all" * 100)
    with pytest.raises(FormatError, match="neither a directory nor a readable tar"):
        verify_export(tmp_path / "garbage.tar", [keypair[1]])
    with pytest.raises(FormatError, match="vkey"):
        verify_export(tmp_path, ["not-a-vkey"])


def _independent_export(dest: Path, entries: list[bytes], skey: str, origin: str) -> None:
    """A minimal tlog-tiles writer written from the specification, sharing no code with audit.export.

    It serves full tiles in place of partial ones where the tree has grown past the
    checkpoint (allowed by tlog-tiles), and writes no manifest or vkeys file.
    """

    def mth(leaves: list[bytes]) -> bytes:
        if len(leaves) == 1:
            return leaves[0]
        k = 1 << ((len(leaves) - 1).bit_length() - 1)
        return merkle.node_hash(mth(leaves[:k]), mth(leaves[k:]))

    def index_path(n: int) -> str:
        parts = [f"{n % 1000:03d}"]
        while n >= 1000:
            n //= 1000
            parts.append(f"x{n % 1000:03d}")
        return "/".join(reversed(parts))

    checkpoint_size = len(entries) - 40  # the log grew after its last checkpoint
    leaves = [merkle.leaf_hash(e) for e in entries]
    level, hashes = 0, leaves
    while hashes:
        for n in range(0, len(hashes), 256):
            chunk = hashes[n : n + 256]
            name = index_path(n // 256) + ("" if len(chunk) == 256 else f".p/{len(chunk)}")
            (dest / f"tile/{level}/{name}").parent.mkdir(parents=True, exist_ok=True)
            (dest / f"tile/{level}/{name}").write_bytes(b"".join(chunk))
        hashes = [mth(hashes[i : i + 256]) for i in range(0, len(hashes) - 255, 256)]
        level += 1
    for n in range(0, len(entries), 256):
        chunk = entries[n : n + 256]
        name = index_path(n // 256) + ("" if len(chunk) == 256 else f".p/{len(chunk)}")
        (dest / f"tile/entries/{name}").parent.mkdir(parents=True, exist_ok=True)
        (dest / f"tile/entries/{name}").write_bytes(b"".join(len(e).to_bytes(2, "big") + e for e in chunk))
    body = f"{origin}\n{checkpoint_size}\n" + base64.b64encode(mth(leaves[:checkpoint_size])).decode()
    (dest / "checkpoint").write_text(sign(body + "\n", Signer(skey)))


def test_export_from_an_independent_spec_following_writer_verifies(tmp_path: Path, keypair: tuple[str, str]) -> None:
    entries = make_entries(256 * 3 + 40 + 7)  # checkpoint at 775: full tiles stand in for the partial ones
    dest = tmp_path / "other"
    _independent_export(dest, entries, keypair[0], "sitewarden/test-site")
    assert not list(dest.rglob("*.p/7"))  # the partial tile the checkpoint needs is absent
    report = verify_export(dest, [keypair[1]])
    assert report.valid, report.reason
    assert report.size == 256 * 3 + 7
    assert parse(note_text((dest / "checkpoint").read_text())) == Checkpoint(
        "sitewarden/test-site", report.size, report.root
    )


def test_large_export_is_verified_in_parallel_with_the_same_result(tmp_path: Path, keypair: tuple[str, str]) -> None:
    """Above the threshold a single-threaded verifier (the CLI) hashes entries in worker processes."""
    size = export_module._PARALLEL_MIN_ENTRIES + 1000
    with Log.open(tmp_path / "log", keypair[0]) as log:
        for start in range(0, size, 20_000):
            log.append_many(make_entries(min(20_000, size - start), start=start, size=20))
        log.checkpoint()
        export = log.export(tmp_path / "export")
    done = run_cli("audit", "verify", str(export), "--key", keypair[1])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"valid: {size} entries".encode() in done.stdout
    bundle = export / tiles.bundle_path(300)
    entries = _bundle_entries(bundle)
    entries[7] = b"{}"
    _write_bundle(bundle, entries)
    done = run_cli("audit", "verify", str(export), "--key", keypair[1])
    assert done.returncode == 1
    assert f"INVALID at entry {300 * 256 + 7}".encode() in done.stdout
    # In process (this test runner has threads, so no fork): the same verdict.
    report = verify_export(export, [keypair[1]])
    assert (report.valid, report.entry) == (False, 300 * 256 + 7)
    shutil.rmtree(export)
