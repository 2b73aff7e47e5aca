"""Witness policies in the C2SP `tlog-policy` format (c2sp.org/tlog-policy).

A policy names the trusted logs (`log <vkey> [<url>]`), the known witnesses
(`witness <name> <vkey> [<url>]`), groups of them with a threshold
(`group <name> all|any|<k> <member>...`) and exactly one `quorum <name>` (or
`quorum none`). A checkpoint is valid under the policy when a listed log signed it and the
witnesses that cosigned it satisfy the quorum.

`parse` follows the specification's rules ("Policy file syntax and structure"): names are
defined before they are used, each name is a member of a group at most once, a key listed
twice as a log or twice as a witness is refused, `1 <= k <= n`. One key may be both a log
and a witness: a Sitewarden site signs its own log and cosigns the controller's with one
Ed25519 key, under two key names and two signature types, so the roles cannot be confused.
`from_keys` builds the same object from the command line's shorthand (`--key`, `--witness`,
`--quorum K`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from audit.errors import FormatError
from audit.note import Verifier

NONE = "none"
# The specification recommends supporting at least 32 of each; a fleet of sites needs more witnesses.
MAX_LOGS = 256
MAX_WITNESSES = 4096
MAX_GROUPS = 256
_ALLOWED = frozenset(range(0x20, 0x7F)) | frozenset(range(0x80, 0x100)) | {0x09, 0x0A}


@dataclass(frozen=True)
class Witness:
    name: str
    verifier: Verifier
    url: str | None = None

    @property
    def key(self) -> str:
        """`<key name>+<key id hex>`, as signature lines and `Cosignature.witness` name it."""
        return f"{self.verifier.name}+{self.verifier.key_id:08x}"


@dataclass(frozen=True)
class Group:
    name: str
    threshold: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Verdict:
    """Whether a set of cosigning witnesses satisfies the quorum, and in words why."""

    met: bool
    cosigned: tuple[str, ...]
    """Names (in the policy) of the witnesses that cosigned."""
    explanation: str


@dataclass(frozen=True)
class Policy:
    logs: tuple[Verifier, ...]
    witnesses: dict[str, Witness]
    groups: dict[str, Group]
    quorum: str
    log_urls: tuple[str | None, ...] = ()

    def witness_verifiers(self) -> list[Verifier]:
        return [w.verifier for w in self.witnesses.values()]

    def names_for(self, keys: Iterable[str]) -> tuple[str, ...]:
        """Policy names of the witnesses whose `<name>+<key id>` is in `keys`, in policy order."""
        wanted = set(keys)
        return tuple(w.name for w in self.witnesses.values() if w.key in wanted)

    def evaluate(self, cosigned_keys: Iterable[str]) -> Verdict:
        """The verdict for a checkpoint cosigned (validly) by the witness keys `cosigned_keys`."""
        names = self.names_for(cosigned_keys)
        done = set(names)
        if self.quorum == NONE:
            return Verdict(True, names, "quorum none: no cosignature required")
        met = self._satisfied(self.quorum, done)
        return Verdict(met, names, self._explain(self.quorum, done))

    def _satisfied(self, name: str, done: set[str]) -> bool:
        group = self.groups.get(name)
        if group is None:
            return name in done
        return sum(self._satisfied(m, done) for m in group.members) >= group.threshold

    def _explain(self, name: str, done: set[str]) -> str:
        group = self.groups.get(name)
        if group is None:
            return f"witness {name}: {'cosigned' if name in done else 'no cosignature'}"
        have = [m for m in group.members if self._satisfied(m, done)]
        missing = [m for m in group.members if m not in have]
        state = "met" if len(have) >= group.threshold else "not met"
        text = f"group {name} needs {group.threshold} of {len(group.members)}, has {len(have)}: {state}"
        if have:
            text += f" (by {', '.join(have)})"
        if missing and len(have) < group.threshold:
            text += f"; missing {', '.join(missing)}"
        return text

    def format(self) -> str:
        """The policy as a tlog-policy file."""
        lines = []
        for log, url in zip(self.logs, self.log_urls or (None,) * len(self.logs), strict=True):
            lines.append(f"log {log.vkey}" + (f" {url}" if url else ""))
        for w in self.witnesses.values():
            lines.append(f"witness {w.name} {w.verifier.vkey}" + (f" {w.url}" if w.url else ""))
        for g in self.groups.values():
            lines.append(f"group {g.name} {g.threshold} {' '.join(g.members)}")
        lines.append(f"quorum {self.quorum}")
        return "\n".join(lines) + "\n"


def parse(text: str | bytes) -> Policy:
    """Parse a tlog-policy file; FormatError names the line and what is wrong with it."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if bad := next((b for b in raw if b not in _ALLOWED), None):
        raise FormatError(f"tlog-policy: control character 0x{bad:02x} is not allowed")
    logs: list[Verifier] = []
    log_urls: list[str | None] = []
    witnesses: dict[str, Witness] = {}
    groups: dict[str, Group] = {}
    quorum: str | None = None
    seen_keys: dict[str, set[bytes]] = {"log": set(), "witness": set()}
    for number, line in enumerate(raw.decode("utf-8", errors="surrogateescape").split("\n"), start=1):
        fields = line.replace("\t", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"tlog-policy line {number}"
        keyword, args = fields[0], fields[1:]
        if keyword == "log":
            if len(args) not in (1, 2):
                raise FormatError(f"{where}: want 'log <vkey> [<url>]'")
            verifier = _vkey(args[0], where, cosigner=False)
            if verifier.public_key in seen_keys["log"]:
                raise FormatError(f"{where}: duplicate key {args[0]}")
            seen_keys["log"].add(verifier.public_key)
            logs.append(verifier)
            log_urls.append(args[1] if len(args) == 2 else None)
        elif keyword == "witness":
            if len(args) not in (2, 3):
                raise FormatError(f"{where}: want 'witness <name> <vkey> [<url>]'")
            name = _new_name(args[0], witnesses, groups, where)
            verifier = _vkey(args[1], where, cosigner=True)
            if verifier.public_key in seen_keys["witness"]:
                raise FormatError(f"{where}: duplicate key {args[1]}")
            seen_keys["witness"].add(verifier.public_key)
            witnesses[name] = Witness(name, verifier, args[2] if len(args) == 3 else None)
        elif keyword == "group":
            if len(args) < 3:
                raise FormatError(f"{where}: want 'group <name> all|any|<k> <name>...'")
            name = _new_name(args[0], witnesses, groups, where)
            members = tuple(args[2:])
            for member in members:
                if member == NONE:
                    raise FormatError(f"{where}: 'none' cannot be a group member")
                if member not in witnesses and member not in groups:
                    raise FormatError(f"{where}: {member!r} is not a witness or group defined on an earlier line")
            if len(set(members)) != len(members):
                raise FormatError(f"{where}: a name is listed more than once")
            groups[name] = Group(name, _threshold(args[1], len(members), where), members)
        elif keyword == "quorum":
            if quorum is not None:
                raise FormatError(f"{where}: a policy has exactly one quorum line")
            if len(args) != 1:
                raise FormatError(f"{where}: want 'quorum <name>'")
            if args[0] != NONE and args[0] not in witnesses and args[0] not in groups:
                raise FormatError(f"{where}: quorum {args[0]!r} is not a witness or group defined on an earlier line")
            quorum = args[0]
        else:
            raise FormatError(f"{where}: unknown keyword {keyword!r} (want log, witness, group or quorum)")
        if len(logs) > MAX_LOGS or len(witnesses) > MAX_WITNESSES or len(groups) > MAX_GROUPS:
            raise FormatError(f"{where}: the policy is larger than this verifier's limits")
    if quorum is None:
        raise FormatError("tlog-policy: no quorum line")
    return Policy(tuple(logs), witnesses, groups, quorum, tuple(log_urls))


def from_keys(logs: Iterable[Verifier], witnesses: Iterable[Verifier], quorum: int | None = None) -> Policy:
    """The policy the shorthand `--key … --witness … [--quorum K]` means: K of the witnesses
    (all of them when K is None), each named after its key."""
    log_list = tuple(logs)
    named: dict[str, Witness] = {}
    for v in witnesses:
        if not v.is_cosigner:
            raise FormatError(f"witness key {v.name}+{v.key_id:08x} is not a cosigner key (type 0x04)")
        name = f"{v.name}+{v.key_id:08x}"
        if name in named:
            raise FormatError(f"witness key {name} is given twice")
        named[name] = Witness(name, v)
    count = len(named)
    k = count if quorum is None else quorum
    if not 0 <= k <= count:
        raise FormatError(f"--quorum {quorum} needs at least that many witness keys; {count} were given")
    if k == 0:
        return Policy(log_list, named, {}, NONE, (None,) * len(log_list))
    group = Group("witnesses", k, tuple(named))
    return Policy(log_list, named, {group.name: group}, group.name, (None,) * len(log_list))


def _vkey(text: str, where: str, *, cosigner: bool) -> Verifier:
    try:
        verifier = Verifier(text)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from exc
    if verifier.is_cosigner != cosigner:
        want = "a witness (cosigner) key, type 0x04" if cosigner else "a log key, type 0x01"
        raise FormatError(f"{where}: {verifier.name}+{verifier.key_id:08x} is not {want}")
    return verifier


def _new_name(name: str, witnesses: dict[str, Witness], groups: dict[str, Group], where: str) -> str:
    if name == NONE:
        raise FormatError(f"{where}: 'none' is predefined and cannot be redefined")
    if name in witnesses or name in groups:
        raise FormatError(f"{where}: {name!r} is already defined")
    return name


def _threshold(text: str, members: int, where: str) -> int:
    if text == "all":
        return members
    if text == "any":
        return 1
    if not text.isdigit() or text.startswith("0"):
        raise FormatError(f"{where}: threshold {text!r} is not all, any or a decimal number")
    k = int(text)
    if not 1 <= k <= members:
        raise FormatError(f"{where}: threshold {k} is outside 1..{members}")
    return k
