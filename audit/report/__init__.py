"""The auditor's evidence report (`sitewarden audit report`): from exported audit logs alone,
offline, an integrity verdict and the evidence an AI governance audit asks for.

It verifies every export against the auditor's witness policy (C2SP tlog-policy) as
`audit verify` does, reads every entry once (`scan`), and writes a report directory: a
self-contained `report.html`, a tagged PDF/A-3b `report.pdf` with the data attached, every table
as `data/*.csv` and `data/*.json`, sampled entries with C2SP tlog-proofs in `proofs/`, and a
`manifest.json` of every file's SHA-256 and row count (signed as a C2SP signed note on request).
The sections (`sections`) answer scope, integrity, coverage and gaps, activity, human oversight,
the configuration in force, retention, sampled proofs, and which requirement each answers
(`mapping`: ISO/IEC 42001 Annex A, the EU AI Act, DORA). The same inputs and seed give the same
bytes.
"""

from audit.report.build import EntryRef, Outcome, ReportOptions, make_report

__all__ = ["EntryRef", "Outcome", "ReportOptions", "make_report"]
