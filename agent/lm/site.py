"""What the site runs of language models, and the leases that let a swap never cut a request short.

`LanguageModels` holds the active base (its `Engine`), the active adapters by name, and the
embedding model. Every identity is a manifest digest: an adapter is attached to the engine
under a name made of its digest, and two versions of one adapter are two attachments.

Sync drives it (from its worker thread):
1. `check` a verified, staged release: its directory (`artifacts`), and for an adapter that its
   card names the active base by manifest digest (else refused, whatever the controller says);
2. `activate` it: a base loads an engine (adapters of another base are dropped); an adapter is
   attached (refused if it does not attach to every module it names) and becomes the one its
   name serves; the embedding model loads;
3. `retain` the releases the desired state names: adapters it no longer names stop serving.

Requests `acquire` a lease on what their `model` names and `release` it when their answer is
complete. An adapter replaced or withdrawn is detached only when its last lease ends, and a
replaced engine is closed the same way, so a request finishes on the version it started with.
`lm.json` in the data dir records what is active (written atomically after every change), and
`start` reloads it after a restart, re-verifying every release.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.lm import artifacts
from agent.lm.errors import APIError, ArtifactError
from sitewarden.files import write_atomically

# Given a staged release directory: (manifest bytes' SHA-256, manifest, trusted approvers), or RefusedError.
Verifier = Callable[[Path], tuple[str, dict[str, Any], list[str]]]


@dataclass(frozen=True)
class LMRelease:
    """A verified transformers release: a base model, an adapter or an embedding model."""

    name: str
    version: str
    kind: str
    directory: Path  # the release directory; the model's files are under files/
    manifest_sha256: str
    card: dict[str, Any]
    approvers: tuple[str, ...]

    @property
    def files(self) -> Path:
        return self.directory / "files"

    @property
    def task(self) -> str:
        return "adapter" if self.kind == "adapter" else artifacts.task(self.card)

    @property
    def engine_name(self) -> str:
        """The adapter's name inside the engine: its digest, never its release name."""
        return f"d{self.manifest_sha256}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "runtime": "transformers",
            "task": self.task,
            "manifest_sha256": self.manifest_sha256,
            "approvers": list(self.approvers),
        }

    def brief(self) -> dict[str, str]:
        """What an answer and an audit entry name: name, version, digest."""
        return {"name": self.name, "version": self.version, "digest": self.manifest_sha256}

    @functools.cached_property
    def policy_input(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "runtime": "transformers",
            "digest": self.manifest_sha256,
            "approvers": list(self.approvers),
            "card": self.card,
        }


@dataclass(frozen=True)
class Lease:
    """What one request runs on, held until its answer is complete."""

    base: LMRelease
    engine: Any
    adapter: LMRelease | None

    @property
    def engine_adapter(self) -> str | None:
        return self.adapter.engine_name if self.adapter else None


@dataclass(frozen=True)
class Settings:
    max_batch: int = 16
    batch_window_ms: float = 50.0

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Settings:
        unknown = set(raw) - {"max_batch", "batch_window_ms"}
        if unknown:
            raise ValueError(f"lm: unknown key(s) {', '.join(sorted(unknown))}")
        settings = cls(int(raw.get("max_batch", 16)), float(raw.get("batch_window_ms", 50.0)))
        if not 1 <= settings.max_batch <= 256 or not 0 <= settings.batch_window_ms <= 1000:
            raise ValueError("lm: max_batch must be 1-256 and batch_window_ms 0-1000")
        return settings


class LanguageModels:
    def __init__(self, state_file: Path, settings: Settings, record: Callable[[dict[str, Any]], Any]) -> None:
        self.state_file = state_file
        self.settings = settings
        self.record = record
        self.base: LMRelease | None = None
        self.engine: Any = None
        self.adapters: dict[str, LMRelease] = {}  # name -> the version it serves
        self.embedding: LMRelease | None = None
        self.embedder: Any = None
        self._lock = threading.Lock()
        self._leases: Counter[str] = Counter()  # digest -> requests running on it (bases and adapters)
        self._attached: dict[str, tuple[Any, LMRelease]] = {}  # adapter digest -> (engine, release)
        self._engines: dict[str, Any] = {}  # base digest -> engine still in use

    # -- sync's side -------------------------------------------------------------------------------

    def check(self, release: LMRelease) -> None:
        """Refuse a staged release whose files or base do not fit (ArtifactError, a RefusedError)."""
        if release.kind == "adapter":
            artifacts.check_adapter_dir(release.files)
            base = artifacts.adapter_base(release.card)
            active = self.base
            if active is None:
                raise ArtifactError(
                    f"adapter {release.name} {release.version} is for base {base.name} {base.version}, "
                    "and no base model is active at this site"
                )
            if base.digest != active.manifest_sha256:
                raise ArtifactError(
                    f"adapter {release.name} {release.version} names base {base.name} {base.version} with manifest "
                    f"digest {base.digest[:12]}…, not the active base {active.name} {active.version} "
                    f"({active.manifest_sha256[:12]}…)"
                )
        elif release.task == artifacts.EMBEDDINGS_TASK:
            artifacts.check_embedding_dir(release.files)
        else:
            artifacts.check_base_dir(release.files)

    def is_active(self, name: str, version: str) -> bool:
        with self._lock:
            current = [self.base, self.embedding, *self.adapters.values()]
        return any(r is not None and (r.name, r.version) == (name, version) for r in current)

    def activate(self, release: LMRelease) -> None:
        """Load or attach a checked release and make it serve; ArtifactError when it does not load or attach."""
        self.check(release)
        if release.kind == "adapter":
            self._activate_adapter(release)
        elif release.task == artifacts.EMBEDDINGS_TASK:
            from agent.lm.embeddings import Embedder  # noqa: PLC0415

            embedder = Embedder(release.files)
            with self._lock:
                self.embedding, self.embedder = release, embedder
        else:
            self._activate_base(release)
        self._save()

    def _activate_base(self, release: LMRelease) -> None:
        if self.base is not None and self.base.manifest_sha256 == release.manifest_sha256:
            return
        from agent.lm.engine import Engine  # noqa: PLC0415

        engine = Engine(release.files, max_batch=self.settings.max_batch, window_s=self.settings.batch_window_ms / 1000)
        with self._lock:
            old_base, old_engine = self.base, self.engine
            dropped = list(self.adapters.values())
            self.base, self.engine, self.adapters = release, engine, {}
            self._engines[release.manifest_sha256] = engine
            retire = [old_base.manifest_sha256] if old_base else []
            retire += [a.manifest_sha256 for a in dropped]
        for adapter in dropped:
            self.record(
                {
                    "type": "deactivation",
                    "release": adapter.describe(),
                    "reason": f"its base was replaced by {release.name} {release.version}",
                }
            )
        for digest in retire:
            self._collect(digest)
        del old_engine

    def _activate_adapter(self, release: LMRelease) -> None:
        with self._lock:
            engine = self.engine
            if release.manifest_sha256 in self._attached:
                engine = None  # attached already (a re-activation): only the name moves
            current = self.adapters.get(release.name)
        if engine is not None:
            engine.attach(release.engine_name, release.files, succeeds=current.engine_name if current else None)
            with self._lock:
                self._attached[release.manifest_sha256] = (engine, release)
        with self._lock:
            previous = self.adapters.get(release.name)
            self.adapters[release.name] = release
        if previous is not None and previous.manifest_sha256 != release.manifest_sha256:
            self._collect(previous.manifest_sha256)

    def retain(self, wanted: set[tuple[str, str]]) -> None:
        """Stop serving adapters the desired state no longer names (each detached after its last request)."""
        with self._lock:
            gone = [a for a in self.adapters.values() if (a.name, a.version) not in wanted]
            for adapter in gone:
                del self.adapters[adapter.name]
        for adapter in gone:
            self.record({"type": "deactivation", "release": adapter.describe(), "reason": "no longer desired"})
            self._collect(adapter.manifest_sha256)
        if gone:
            self._save()

    def _collect(self, digest: str) -> None:
        """Detach an adapter (or close an engine) that nothing serves and no request holds."""
        with self._lock:
            if self._leases[digest] > 0 or self._serving(digest):
                return
            attached = self._attached.pop(digest, None)
            engine = self._engines.pop(digest, None) if digest != getattr(self.base, "manifest_sha256", "") else None
        if attached is not None:
            owner, release = attached
            threading.Thread(target=self._detach, args=(owner, release), daemon=True).start()
        if engine is not None:
            threading.Thread(target=engine.close, daemon=True).start()

    def _detach(self, engine: Any, release: LMRelease) -> None:
        try:
            engine.detach(release.engine_name)
        except Exception as exc:  # the engine was closed with its base: nothing left to detach
            self.record({"type": "lm.note", "release": release.brief(), "reason": f"detach: {exc}"})
            return
        self.record({"type": "lm.detached", "release": release.brief()})

    def _serving(self, digest: str) -> bool:
        return (self.base is not None and self.base.manifest_sha256 == digest) or any(
            a.manifest_sha256 == digest for a in self.adapters.values()
        )

    # -- requests ---------------------------------------------------------------------------------

    def acquire(self, model: str) -> Lease:
        """A lease on what `model` names (the base or an adapter); APIError 404 when nothing is."""
        with self._lock:
            base, engine = self.base, self.engine
            adapter = self.adapters.get(model)
            if base is None or (adapter is None and model != base.name):
                if self.embedding is not None and model == self.embedding.name:
                    raise APIError(400, f"{model} is an embedding model: use /v1/embeddings", param="model")
                raise APIError(
                    404, f"the model {model!r} does not exist at this site", param="model", code="model_not_found"
                )
            self._leases[base.manifest_sha256] += 1
            if adapter is not None:
                self._leases[adapter.manifest_sha256] += 1
        return Lease(base, engine, adapter)

    def release(self, lease: Lease) -> None:
        digests = [lease.base.manifest_sha256] + ([lease.adapter.manifest_sha256] if lease.adapter else [])
        with self._lock:
            for digest in digests:
                self._leases[digest] -= 1
                if self._leases[digest] <= 0:
                    del self._leases[digest]
        for digest in digests:
            self._collect(digest)

    def embedding_model(self, model: str) -> tuple[LMRelease, Any]:
        with self._lock:
            embedding, embedder = self.embedding, self.embedder
        if embedding is None or embedding.name != model:
            raise APIError(
                404, f"the embedding model {model!r} does not exist at this site", param="model", code="model_not_found"
            )
        return embedding, embedder

    def models(self) -> list[tuple[LMRelease, str | None]]:
        """What `/v1/models` lists: the base, its adapters (with their parent), the embedding model."""
        with self._lock:
            out: list[tuple[LMRelease, str | None]] = [(self.base, None)] if self.base else []
            out += [(a, self.base.name if self.base else None) for a in self.adapters.values()]
            if self.embedding is not None:
                out.append((self.embedding, None))
        return out

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "base": self.base.describe() if self.base else None,
                "adapters": {n: a.describe() for n, a in self.adapters.items()},
                "embedding": self.embedding.describe() if self.embedding else None,
                "in_flight": dict(self._leases),
                "attached": sorted(self._attached),
            }

    # -- persistence ----------------------------------------------------------------------------------

    def _save(self) -> None:
        with self._lock:
            releases = [r for r in (self.base, self.embedding, *self.adapters.values()) if r is not None]
        state = {"releases": [{"directory": str(r.directory), **r.describe()} for r in releases]}
        write_atomically(self.state_file, json.dumps(state, indent=2).encode())

    def start(self, verify: Verifier) -> None:
        """Reload what `lm.json` says was active, bases first; what no longer verifies or loads is audited and
        left out."""
        if not self.state_file.exists():
            return
        try:
            entries = json.loads(self.state_file.read_text()).get("releases", [])
        except (OSError, ValueError) as exc:
            self.record({"type": "activation.failed", "reason": f"lm.json is unreadable: {exc}"})
            return
        entries.sort(key=lambda e: e.get("kind") == "adapter")
        for entry in entries:
            try:
                release = self.load(Path(entry["directory"]), verify)
                self.activate(release)
            except (ArtifactError, OSError, KeyError, ValueError) as exc:
                self.record({"type": "activation.failed", "release": entry, "reason": str(exc)})
                continue
            except Exception as exc:  # a RefusedError from verification, a model that no longer loads
                self.record(
                    {"type": "activation.failed", "release": entry, "reason": f"{exc.__class__.__name__}: {exc}"}
                )
                continue
            self.record({"type": "activation", "release": release.describe(), "reason": "restart"})
        self._save()

    @staticmethod
    def load(directory: Path, verify: Verifier) -> LMRelease:
        digest, manifest, approvers = verify(directory)
        return LMRelease(
            name=manifest["name"],
            version=manifest["version"],
            kind=manifest["kind"],
            directory=directory,
            manifest_sha256=digest,
            card=manifest.get("metadata", {}),
            approvers=tuple(approvers),
        )

    def close(self) -> None:
        with self._lock:
            engines = list(self._engines.values())
        for engine in engines:
            engine.close()


def create(
    state_file: Path, raw_settings: dict[str, Any], record: Callable[[dict[str, Any]], Any]
) -> LanguageModels | None:
    """The site's language-model runtime, or None when the lm extra is not installed (transformers releases
    are then refused, saying so)."""
    from agent.lm import runtime  # noqa: PLC0415

    if not runtime.available():
        return None
    return LanguageModels(state_file, Settings.parse(raw_settings), record)
