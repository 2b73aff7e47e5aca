"""Which requirement each section of the report answers (section 9, "Mapping").

References are to ISO/IEC 42001:2023 Annex A, Regulation (EU) 2024/1689 (the AI Act), and
Regulation (EU) 2022/2554 (DORA) with its regulatory technical standards on the ICT risk
management framework, Commission Delegated Regulation (EU) 2024/1774. The mapping says where the
evidence is; it does not say that the evidence suffices, which is the auditor's judgement.
"""

from __future__ import annotations

# (framework, reference, requirement in short, section keys, what in the report is the evidence)
REQUIREMENTS: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    (
        "ISO/IEC 42001:2023",
        "Annex A, A.6.2.6",
        "AI system operation and monitoring",
        ("coverage", "activity", "configuration"),
        "Entries per day and gaps, restarts, audit-write failures, requests by outcome, the versions in force.",
    ),
    (
        "ISO/IEC 42001:2023",
        "Annex A, A.6.2.8",
        "AI system recording of event logs, at least while the system is in use",
        ("integrity", "coverage", "retention"),
        "Verified, witnessed logs of every request and decision; coverage per day; retention per log.",
    ),
    (
        "ISO/IEC 42001:2023",
        "Annex A, A.7.5",
        "Data provenance",
        ("configuration",),
        "Manifest digests and approvers of every version in force; federated jobs with their participants; the "
        "lineage the controller recorded when a job's result was registered.",
    ),
    (
        "EU AI Act",
        "Art. 12(1), (2)",
        "Automatic recording of events over the system's lifetime: situations of risk or substantial "
        "modification, post-market monitoring, monitoring of operation",
        ("integrity", "activity", "configuration", "coverage"),
        "Every request with its decision, purpose, data class, model and policy version; activations and refusals; "
        "the controller's changes.",
    ),
    (
        "EU AI Act",
        "Art. 14",
        "Human oversight",
        ("oversight",),
        "Requests the policy flagged for human review, listed, and the share per site and purpose.",
    ),
    (
        "EU AI Act",
        "Art. 19(1)",
        "Providers keep automatically generated logs for at least six months",
        ("retention",),
        "Earliest and latest entry of each log against the retention period given.",
    ),
    (
        "EU AI Act",
        "Art. 26(6)",
        "Deployers keep the logs under their control for at least six months",
        ("retention", "scope"),
        "As Art. 19(1), per site log.",
    ),
    (
        "DORA",
        "Reg. (EU) 2022/2554 Art. 9(3)-(4); RTS (EU) 2024/1774 Art. 12",
        "Logging: protection of logs against tampering and unauthorised deletion",
        ("integrity", "proofs"),
        "Signed checkpoints cosigned by independent witnesses under the auditor's quorum; every entry checked "
        "against the Merkle root; sampled inclusion proofs anyone can re-check.",
    ),
    (
        "DORA",
        "RTS (EU) 2024/1774 Art. 12",
        "Logging: detection of failures of logging systems",
        ("coverage",),
        "Gaps without entries or checkpoints, audit-write failures recorded by the agents, witness lag.",
    ),
    (
        "DORA",
        "RTS (EU) 2024/1774 Art. 12",
        "Logging: clocks synchronised to a reliable reference time",
        ("coverage",),
        "Entries stamped earlier than the entry before them, and entries stamped after their witness cosigned them.",
    ),
    (
        "Evidence practice",
        "Completeness and accuracy of information produced by the entity",
        "Source, scope, extraction criteria, control totals, reperformance",
        ("scope", "integrity", "proofs"),
        "Input digests and the command that reproduces the report; row counts and digests of every data file in "
        "manifest.json; sampled proofs to reperform.",
    ),
)
