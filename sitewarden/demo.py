"""`sitewarden demo`: the main job, end to end, with real files and real signatures.

Today it shows the audit trail a site keeps: concurrent writers append inference records
to a durable log, the log signs a checkpoint, the log is exported in the C2SP tlog-tiles
layout and verified offline with nothing but the site's public key; then a copy of the
export is tampered with and verification names the altered entry.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from audit import Log, verify_export
from audit import proof as tlog_proof
from audit.entry import canonicalize
from audit.note import write_key_pair
from audit.tiles import bundle_path

WRITERS = 8
ENTRIES_PER_WRITER = 2_500
TAMPERED_ENTRY = 7_777

console = Console(highlight=False)


def _record(rng: random.Random, secret: bytes, writer: int, seq: int) -> bytes:
    """An inference record as the agent will write it: digests, never raw content."""
    prompt = f"transaction {rng.randrange(10**9)} amount {rng.randrange(10**6)} EUR".encode()
    score = rng.random()
    return canonicalize(
        {
            "type": "inference",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "site": "demo-site",
            "caller": f"fraud-app-{writer}",
            "purpose": "fraud",
            "data_class": "confidential",
            "decision": {"allow": True, "reasons": ["purpose fraud allowed for model"]},
            "obligations": [],
            "model": {"name": "fraud-scorer", "version": "1.0.0"},
            "input_digest": hmac.new(secret, prompt, hashlib.sha256).hexdigest(),
            "output_digest": hmac.new(secret, f"{score:.6f}".encode(), hashlib.sha256).hexdigest(),
            "latency_ms": round(rng.uniform(0.4, 3.0), 3),
            "trace_id": uuid.UUID(int=rng.getrandbits(128)).hex,
            "seq": [writer, seq],
        }
    )


def _flip_byte_of_entry(export: Path, size: int, index: int) -> None:
    """Change one bit inside entry `index` of an export's entry bundles."""
    n, pos = divmod(index, 256)
    path = export / bundle_path(n, min(256, size - n * 256))
    data = bytearray(path.read_bytes())
    off = 0
    for _ in range(pos):
        off += 2 + int.from_bytes(data[off : off + 2], "big")
    data[off + 2 + 10] ^= 0x01
    path.write_bytes(bytes(data))


def run(workdir: Path | None = None) -> int:
    own_tmp = workdir is None
    base = Path(tempfile.mkdtemp(prefix="sitewarden-demo-")) if own_tmp else workdir
    assert base is not None
    base.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        console.rule("[bold]Sitewarden demo: a site's tamper-evident audit log")
        key_path, vkey = write_key_pair("sitewarden/demo-site", base / "keys")
        console.print(f"site key created; the auditor receives only the vkey:\n  [cyan]{vkey}[/]")

        log = Log.open(base / "log", key_path)
        secret = hashlib.sha256(b"demo per-site HMAC secret").digest()
        acknowledged: list[list[int]] = [[] for _ in range(WRITERS)]

        records = []
        for w in range(WRITERS):
            rng = random.Random(w)  # noqa: S311 - synthetic demo data, not secrets
            records.append([_record(rng, secret, w, seq) for seq in range(ENTRIES_PER_WRITER)])

        def writer(w: int) -> None:
            for record in records[w]:
                acknowledged[w].append(log.append(record))

        started = time.perf_counter()
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        total = WRITERS * ENTRIES_PER_WRITER
        indices = sorted(i for acks in acknowledged for i in acks)
        ok &= indices == list(range(total))
        console.print(
            f"{WRITERS} concurrent writers appended {total:,} records, each acknowledged only once on disk: "
            f"{total / elapsed:,.0f} durable appends/s"
        )

        signed = log.checkpoint()
        console.print("signed checkpoint (C2SP tlog-checkpoint in a signed note):")
        console.print(f"[dim]{signed.rstrip()}[/]", soft_wrap=True)
        export = log.export(base / "export")
        sample = 4_242
        made = log.tlog_proof(sample)
        entry = log.entry(sample)
        log.close()
        console.print(f"exported in the C2SP tlog-tiles layout to {export}")

        report = verify_export(export, [vkey])
        ok &= report.valid
        status = "[green]valid[/]" if report.valid else f"[red]INVALID: {report.reason}[/]"
        console.print(f"offline verification with only the vkey: {status} ({report.size:,} entries)")

        cp, _ = tlog_proof.verify(tlog_proof.parse(made.format()), entry, [vkey])
        console.print(f"tlog-proof: entry {sample} is included in the checkpoint of size {cp.size:,}: [green]valid[/]")

        tampered = base / "export-tampered"
        shutil.copytree(export, tampered)
        _flip_byte_of_entry(tampered, cp.size, TAMPERED_ENTRY)
        bad = verify_export(tampered, [vkey])
        ok &= (not bad.valid) and bad.entry == TAMPERED_ENTRY
        console.print(
            f"one bit flipped in entry {TAMPERED_ENTRY} of a copy: "
            + (f"[red]INVALID[/] — {bad.reason}" if not bad.valid else "[red]not detected![/]")
        )

        table = Table(title="Summary")
        table.add_column("step")
        table.add_column("result")
        table.add_row("durable appends", f"{total:,} from {WRITERS} threads, {total / elapsed:,.0f}/s")
        table.add_row("checkpoint", f"size {cp.size:,}, root {cp.root.hex()[:16]}…")
        table.add_row("offline verification", "valid" if report.valid else "INVALID")
        table.add_row("inclusion proof", f"entry {sample}: valid")
        table.add_row("tampered copy", f"rejected at entry {bad.entry}" if not bad.valid else "NOT DETECTED")
        console.print(table)
        console.print("[bold green]demo passed[/]" if ok else "[bold red]demo FAILED[/]")
        return 0 if ok else 1
    finally:
        if own_tmp:
            shutil.rmtree(base, ignore_errors=True)
        else:
            console.print(f"files kept in {base}")
