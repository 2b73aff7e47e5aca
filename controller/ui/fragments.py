"""The fleet table's rows, written by hand instead of by Jinja: the one fragment on a hot path.

Every viewer of the fleet page asks for 50 rows every two seconds; a Jinja loop spends most of the
page's time on one generator step and one escape per value. Here each row is one format string
over escaped values (`html.escape`, quotes included, as the templates escape), so the page costs little more than the
REST list of the same sites. The markup is the template's: `_fleet_table.html` keeps the table
around it, and the browser tests check the result like any other page (axe, CSP).
"""

from __future__ import annotations

from datetime import datetime
from html import escape as _escape

from markupsafe import Markup

from controller.ui.fleet import FleetRow
from controller.ui.render import age

_ROW = (
    '<tr><td class="nowrap"><a href="/ui/sites/{name}">{name}</a></td>'
    '<td><mark data-state="{state}">{state}</mark></td>'
    "<td>{labels}</td><td>{agent}</td><td>{heartbeat}</td><td>{runs}</td><td>{should}</td>"
    "<td>{audit}</td><td>{witness}</td></tr>\n"
)


def escape(value: object) -> str:
    """HTML-escaped text (quotes too), as plain `str`: one Markup for the whole row, not one per value."""
    return _escape(str(value), quote=True)


def _mark(state: str, text: object) -> str:
    return f'<mark data-state="{escape(state)}">{escape(text)}</mark>'


def fleet_row(r: FleetRow, now: datetime) -> Markup:
    labels = " ".join(_mark("label", f"{k}={v}") for k, v in sorted(r.labels.items()))
    runs = []
    for a in r.runs:
        cell = escape(a.key)
        if a.state != "active":
            cell += " " + _mark(a.state, a.state)
        if a.state in ("refused", "failed"):
            cell += f"<br><small>{escape(a.reason)}</small>"
        runs.append(f"<div>{cell}</div>")
    should = "–"
    if r.desired_version:
        should = f"v{r.desired_version}"
        if r.observed_version is not None and r.observed_version < r.desired_version:
            should += f" (site at v{r.observed_version})"
        if r.rollout:
            should += f"<br><small>rollout {escape(r.rollout)}: {escape(', '.join(r.should_run) or 'nothing')}</small>"
    witness = "none yet"
    if r.cosigned_size is not None:
        witness = f"size {r.cosigned_size}, {age(r.cosigned_at, now)} ago"
        if r.witness_lag:
            witness += "<br>" + _mark("behind", f"{r.witness_lag} entries behind")
    return Markup(  # noqa: S704 - every value above is escaped or a number
        _ROW.format(
            name=escape(r.name),
            state=escape(r.state),
            labels=labels,
            agent=escape(r.agent_version or "–"),
            heartbeat=f"{age(r.heartbeat_at, now)} ago" if r.heartbeat_at else "never",
            runs="".join(runs) or "–",
            should=should,
            audit=f"{r.audit_size} entries" if r.audit_size is not None else "–",
            witness=witness,
        )
    )
