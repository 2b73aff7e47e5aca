"""What a language-model release holds, checked before anything of it is loaded.

- A **base model** (`kind: model`, `runtime: transformers`): a transformers directory with
  `config.json` (a causal LM architecture, no `auto_map`: no code from the release ever runs),
  weights in safetensors only, a tokenizer and a chat template.
- An **adapter** (`kind: adapter`, `runtime: transformers`): a PEFT LoRA directory,
  `adapter_config.json` and `adapter_model.safetensors`. Its model card names its base:
  `"base": {"name", "version", "digest"}`, the digest being the SHA-256 of the base release's
  manifest (`release.json`), which is what identifies a release at the site.
- An **embedding model** (`kind: model`, `runtime: transformers`, card `"task": "embeddings"`):
  a sentence-transformers directory (`modules.json`, safetensors weights) of standard modules.

Pickle-based weight files (`.bin`, `.pt`, `.pth`, `.pkl`, `.ckpt`, ...) are refused wherever
they sit in a directory: loading them runs code.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.lm.errors import ArtifactError

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".h5"})
EMBEDDINGS_TASK = "embeddings"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# sentence-transformers modules an embedding release may use: its own, never a release's code.
_EMBEDDING_MODULES = re.compile(
    r"^sentence_transformers\.(models|base\.modules|sentence_transformer\.modules)(\.\w+)+$"
)


@dataclass(frozen=True)
class BaseRef:
    """The base release an adapter was trained on: name, version and manifest digest."""

    name: str
    version: str
    digest: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "digest": self.digest}


def task(card: dict[str, Any]) -> str:
    """`embeddings` for an embedding model, else `chat` (a generative base model)."""
    return EMBEDDINGS_TASK if card.get("task") == EMBEDDINGS_TASK else "chat"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{what}: {path.name} is missing") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{what}: {path.name} is not readable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{what}: {path.name} must be a JSON object")
    return value


def _no_pickles(directory: Path, what: str) -> None:
    if not directory.is_dir():
        raise ArtifactError(f"{what}: {directory} is not a directory")
    found = sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES
    )
    if found:
        raise ArtifactError(
            f"{what}: {', '.join(found[:5])} would be loaded with pickle, which runs code: only safetensors weights"
        )


def check_base_dir(directory: Path) -> dict[str, Any]:
    """Refuse a base model directory that is not a safetensors-only causal LM with a tokenizer and chat
    template; returns its `config.json`."""
    what = "base model"
    _no_pickles(directory, what)
    config = _read_json(directory / "config.json", what)
    if "auto_map" in config:
        raise ArtifactError(f"{what}: config.json has auto_map: a release's own code is never run")
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and any(str(a).endswith("ForCausalLM") for a in architectures)):
        raise ArtifactError(f"{what}: config.json names no causal LM architecture ({architectures!r})")
    if not any(directory.glob("*.safetensors")):
        raise ArtifactError(f"{what}: no .safetensors weights")
    if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer_config.json").is_file():
        raise ArtifactError(f"{what}: no tokenizer (tokenizer.json or tokenizer_config.json)")
    template = (directory / "chat_template.jinja").is_file()
    if not template and (directory / "tokenizer_config.json").is_file():
        template = bool(_read_json(directory / "tokenizer_config.json", what).get("chat_template"))
    if not template:
        raise ArtifactError(f"{what}: no chat template (chat_template.jinja or tokenizer_config.json)")
    return config


def check_adapter_dir(directory: Path) -> dict[str, Any]:
    """Refuse a directory that is not a PEFT LoRA adapter in safetensors; returns its `adapter_config.json`."""
    what = "adapter"
    _no_pickles(directory, what)
    config = _read_json(directory / "adapter_config.json", what)
    if config.get("peft_type") != "LORA":
        raise ArtifactError(f"{what}: peft_type is {config.get('peft_type')!r}; only LORA adapters are served")
    targets = config.get("target_modules")
    if not targets or not isinstance(targets, list | str):
        raise ArtifactError(f"{what}: adapter_config.json names no target_modules")
    if not (directory / "adapter_model.safetensors").is_file():
        raise ArtifactError(f"{what}: adapter_model.safetensors is missing")
    for key in ("modules_to_save", "trainable_token_indices"):
        if config.get(key):
            raise ArtifactError(f"{what}: {key} replaces base weights; only LoRA deltas are served on a frozen base")
    return config


def check_embedding_dir(directory: Path) -> None:
    """Refuse a directory that is not a safetensors sentence-transformers model of standard modules."""
    what = "embedding model"
    _no_pickles(directory, what)
    raw = directory / "modules.json"
    try:
        modules = json.loads(raw.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{what}: modules.json is missing or not JSON: {exc}") from None
    if not isinstance(modules, list) or not modules:
        raise ArtifactError(f"{what}: modules.json lists no modules")
    for module in modules:
        kind = module.get("type", "") if isinstance(module, dict) else ""
        if not _EMBEDDING_MODULES.match(kind):
            raise ArtifactError(f"{what}: module type {kind!r} is not a sentence-transformers module")
    if not any(directory.rglob("*.safetensors")):
        raise ArtifactError(f"{what}: no .safetensors weights")
    config = directory / "config.json"
    if config.is_file() and "auto_map" in _read_json(config, what):
        raise ArtifactError(f"{what}: config.json has auto_map: a release's own code is never run")


def adapter_base(card: dict[str, Any]) -> BaseRef:
    """The base an adapter's model card names; refused when it names none or names it badly."""
    base = card.get("base")
    if not isinstance(base, dict):
        raise ArtifactError('the adapter\'s model card names no base: "base": {"name", "version", "digest"}')
    name, version, digest = base.get("name"), base.get("version"), base.get("digest")
    if not all(isinstance(v, str) and v for v in (name, version, digest)):
        raise ArtifactError("the adapter's model card must name its base's name, version and digest")
    assert isinstance(name, str) and isinstance(version, str) and isinstance(digest, str)
    if not _DIGEST.match(digest):
        raise ArtifactError(f"the adapter's base digest {digest!r} is not a SHA-256 (64 lowercase hex digits)")
    return BaseRef(name, version, digest)
