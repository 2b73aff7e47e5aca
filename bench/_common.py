"""What every benchmark script shares: its command line and its scratch directory."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


def parse_args(
    doc: str | None, argv: Sequence[str] | None, *, quick: str, workdir_help: str, default: Path
) -> argparse.Namespace:
    """`--quick` (what it shrinks: `quick`) and `--workdir` (where the scratch directory goes)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--workdir", type=Path, default=default, help=f"{workdir_help}; default %(default)s")
    return parser.parse_args(argv)


@contextlib.contextmanager
def scratch_dir(workdir: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory under `workdir` (created if missing), removed afterwards with `workdir` if made here."""
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(dir=workdir, prefix=prefix))
    try:
        yield run_dir
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                workdir.rmdir()
