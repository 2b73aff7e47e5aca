"""`sitewarden lm import-gguf`: a GGUF file turned into a base model directory (safetensors only).

transformers reads GGUF through the `gguf` package and dequantises the tensors (Q4_1, Q8_0, ...)
into float32; the model and its tokenizer (with the chat template the GGUF file carries) are
written as a transformers directory, checked like any base release (`artifacts.check_base_dir`).
The card, written beside the directory as `<out>.card.json`, records the source file's name and
SHA-256, the architecture, the parameter count and the licence and name the GGUF metadata states.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.lm import artifacts, runtime
from agent.lm.errors import LMError


class ImportError_(LMError):
    """The GGUF file cannot be imported; the message says why."""


def _metadata(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader  # noqa: PLC0415

    reader = GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key in ("general.name", "general.license", "general.architecture", "general.size_label", "general.file_type"):
        field = reader.fields.get(key)
        if field is None or not field.data:
            continue
        part = field.parts[field.data[0]]
        out[key] = (
            bytes(part).decode("utf-8", "replace") if field.types and field.types[0].name == "STRING" else int(part[0])
        )
    return out


def import_gguf(file: Path, out: Path) -> dict[str, Any]:
    """Convert `file` into the base model directory `out`; returns the card (also written beside `out`)."""
    if not file.is_file():
        raise ImportError_(f"{file} is not a file")
    if out.exists() and any(out.iterdir()):
        raise ImportError_(f"{out} exists and is not empty")
    runtime.configure()
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    try:
        meta = _metadata(file)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            file.parent, gguf_file=file.name, local_files_only=True, dtype=torch.float32
        )
    except Exception as exc:  # a truncated or foreign file fails in gguf's reader in many ways
        raise ImportError_(f"transformers cannot read {file.name} as GGUF: {exc.__class__.__name__}: {exc}") from exc
    # The tensors are dequantised: what is written is a plain float32 model, not a GGUF-quantised one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    artifacts.check_base_dir(out)
    card: dict[str, Any] = {
        "description": f"{meta.get('general.name', file.stem)}, imported from GGUF and dequantised to float32",
        "task": "chat",
        "architecture": model.config.architectures[0] if model.config.architectures else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "source": {"file": file.name, "sha256": artifacts.sha256_file(file), "gguf": meta},
    }
    if meta.get("general.license"):
        card["licence"] = {"apache-2.0": "Apache-2.0", "mit": "MIT"}.get(
            str(meta["general.license"]).lower(), meta["general.license"]
        )
    out.with_name(out.name + ".card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card
