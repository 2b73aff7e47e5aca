"""How every `sitewarden` list and status command prints: a table sized to the terminal when a person reads it,
the whole table (no column cut, no ellipsis) when the output goes to a pipe or a file, and `--json` for programs.

rich sizes a table to the console and, off a terminal, assumes 80 columns, cutting cells to fit; a script that
greps a site name or a refusal reason would then miss it. `print_table` lifts that limit whenever standard
output is not a terminal; `print_json` writes one JSON document (sorted keys, no colour).
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide enough for any row: a table is only as wide as its longest cells (tables do not expand by default).
UNLIMITED = 1_000_000


def print_table(console: Console, table: Table) -> None:
    """The table, cut to the terminal's width on a terminal, whole otherwise."""
    if console.is_terminal:
        console.print(table)
        return
    # A console's width caps what it prints, so a pipe gets a console of its own, as wide as any table.
    wide = Console(file=console.file, width=UNLIMITED, highlight=False, color_system=None, soft_wrap=True)
    wide.print(table)


def print_json(console: Console, data: Any) -> None:
    """One JSON document, indented, with keys sorted; datetimes and other values as text."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
