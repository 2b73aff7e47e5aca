"""What the language-model tests share: tiny models built once per test session (seconds, no download).

`tiny_models` holds a tiny Llama base and its tokenizer, a LoRA adapter trained on it for a few steps
(through `agent.lm.train`, the path of `sitewarden lm train-adapter`), a second adapter version, a
base of another shape with an adapter of its own, and a tiny embedding model. Under pytest-xdist the
first worker to need them builds them and the others wait for it (a file lock in the session's
shared temporary directory): the models are read-only to the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from tests.agent.lm import tiny


@dataclass(frozen=True)
class TinyModels:
    base: Path
    router_v1: Path  # trained for a few steps; its card is beside it (router-1.card.json)
    router_v2: Path  # another version of the same adapter (random LoRA weights)
    other_base: Path  # another architecture size: its adapters do not fit `base`
    other_adapter: Path
    embedding: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> TinyModels:
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root = shared / "tiny-models"
    with FileLock(str(shared / "tiny-models.lock")):
        if not (root / "done").exists():
            _build(root)
            (root / "done").write_text("")
    return TinyModels(
        base=root / "chat",
        router_v1=root / "router-1",
        router_v2=root / "router-2",
        other_base=root / "other",
        other_adapter=root / "other-adapter",
        embedding=root / "embed",
    )


def _build(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    base = tiny.build_base(root / "chat")
    tiny.train_adapter(base, root / "router-1", steps=4, seed=0)
    tiny.lora_adapter(base, root / "router-2", seed=1)
    other_base = tiny.build_base(root / "other", seed=3, layers=1, hidden=48)
    tiny.lora_adapter(other_base, root / "other-adapter", seed=2)
    tiny.build_embedding(root / "embed", base)
