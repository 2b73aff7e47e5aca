"""`sitewarden lm train-adapter` and `import-gguf` as the model owner runs them: real processes, tiny models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sitewarden import lm_task
from tests.agent.lm.conftest import TinyModels
from tests.controller_server import sitewarden

DIGEST = "ab" * 32


def test_train_adapter_writes_the_adapter_and_a_card_naming_base_data_and_evaluation(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    data = lm_task.write_jsonl(tmp_path / "routing.jsonl", 20, seed=3)
    out = tmp_path / "router"
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"owner": "service-analytics", "intended_purposes": ["service"]}))
    args = ["lm", "train-adapter", "--base", str(tiny_models.base), "--data", str(data), "--out", str(out)]
    args += ["--base-release", "tiny-chat@1.0.0", "--base-digest", DIGEST, "--max-steps", "2", "--metadata", str(meta)]
    done = sitewarden(*args, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "held-out accuracy" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    card = json.loads((tmp_path / "router.card.json").read_text())
    assert card["base"] == {"name": "tiny-chat", "version": "1.0.0", "digest": DIGEST}
    assert card["training"]["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert card["training"]["hyperparameters"]["steps"] == 2 and card["training"]["held_out_examples"] == 4
    assert set(card["evaluation"]) == {"accuracy", "held_out_loss"} and card["owner"] == "service-analytics"


def test_train_adapter_refuses_bad_input_naming_it_and_writes_nothing(tmp_path: Path, tiny_models: TinyModels) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\nnot json\n'
    )
    out = tmp_path / "never"
    base = ["lm", "train-adapter", "--base", str(tiny_models.base), "--out", str(out)]
    done = sitewarden(*base, "--data", str(bad), timeout=300)
    assert done.returncode == 2 and "bad.jsonl:2: not JSON" in done.stderr
    done = sitewarden(*base, "--data", str(bad), "--base-release", "tiny-chat@1.0.0", timeout=300)
    assert done.returncode == 2 and "go together" in done.stderr
    done = sitewarden(*base, "--data", str(bad), "--base-release", "x@1", "--base-digest", "nothex", timeout=300)
    assert done.returncode == 2 and "not a SHA-256" in done.stderr
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    done = sitewarden("lm", "train-adapter", "--base", str(pickled), "--data", str(bad), "--out", str(out))
    assert done.returncode == 2 and "pickle" in done.stderr
    assert not out.exists()


def test_import_gguf_refuses_what_is_not_a_gguf_file(tmp_path: Path) -> None:
    done = sitewarden("lm", "import-gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "is not a file" in done.stderr
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    done = sitewarden("lm", "import-gguf", str(fake), "--out", str(tmp_path / "out"), timeout=300)
    assert done.returncode != 0 and "error:" in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
