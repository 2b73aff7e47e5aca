"""`sitewarden lm train-adapter`: a LoRA adapter trained with PEFT on the CPU, with its model card.

The data set is a JSONL file of chat examples in the OpenAI fine-tuning form, one per line:
`{"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", "content": ...}]}`.
The last message is the answer the adapter learns: the loss is taken on its tokens only (the
prompt, rendered with the base's chat template, is context). A seeded split holds out a share
of the examples; after training the adapter answers them greedily and the card records the
exact-match accuracy and the held-out loss.

The adapter directory holds `adapter_config.json` and `adapter_model.safetensors` only. The
card, written beside it as `<out>.card.json` (the file `sitewarden release push --metadata`
takes), carries the base (name, version and manifest digest, when given, and the SHA-256 of the
base directory's files), the data set's SHA-256, the hyperparameters, the training loss and the
held-out evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.lm import artifacts, runtime
from agent.lm.errors import LMError

DEFAULT_TARGETS = ("q_proj", "v_proj")


class TrainingError(LMError):
    """The data set or the options cannot be trained on; the message names what is wrong."""


@dataclass(frozen=True)
class Hyperparameters:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    learning_rate: float = 2e-3
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    max_length: int = 384
    held_out: float = 0.2
    seed: int = 0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS


@dataclass
class Example:
    prompt: list[int]
    answer: list[int]
    answer_text: str
    messages: list[dict[str, str]] = field(repr=False)


def read_examples(path: Path) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file; TrainingError names the first bad line."""
    conversations = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise TrainingError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise TrainingError(f"{path}:{number}: not JSON: {exc}") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or len(messages) < 2:
            raise TrainingError(f"{path}:{number}: needs a messages list of at least two messages")
        for message in messages:
            if (
                not isinstance(message, dict)
                or message.get("role") not in ("system", "user", "assistant")
                or not isinstance(message.get("content"), str)
            ):
                raise TrainingError(f"{path}:{number}: each message needs a role (system, user, assistant) and content")
        if messages[-1]["role"] != "assistant":
            raise TrainingError(f"{path}:{number}: the last message must be the assistant's answer")
        conversations.append(messages)
    if len(conversations) < 2:
        raise TrainingError(f"{path}: needs at least two examples (one to train on, one held out)")
    return conversations


def base_files_sha256(directory: Path) -> str:
    """SHA-256 over the sorted paths and SHA-256 digests of a directory's files (its content, not its release)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(directory)}\0{artifacts.sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _encode(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> Example:
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise TrainingError("the chat template does not render the answer after the prompt; cannot train on it")
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    prompt = prompt[-max(1, max_length - len(answer)) :]
    return Example(list(prompt), list(answer[:max_length]), messages[-1]["content"].strip(), messages)


def train(
    base: Path,
    data: Path,
    out: Path,
    params: Hyperparameters = Hyperparameters(),
    *,
    base_release: artifacts.BaseRef | None = None,
    metadata: dict[str, Any] | None = None,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and write the adapter and its card; returns the card."""
    artifacts.check_base_dir(base)
    if out.exists() and any(out.iterdir()):
        raise TrainingError(f"{out} exists and is not empty")
    conversations = read_examples(data)
    runtime.configure()
    import torch  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    started = time.monotonic()
    random.seed(params.seed)
    torch.manual_seed(params.seed)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, use_safetensors=True, dtype=torch.float32)
    examples = [_encode(tokenizer, m, params.max_length) for m in conversations]
    order = list(range(len(examples)))
    random.Random(params.seed).shuffle(order)  # noqa: S311 - a seeded split, not a secret
    held = max(1, round(len(examples) * params.held_out))
    evaluation = [examples[i] for i in order[:held]]
    training = [examples[i] for i in order[held:]]
    if not training:
        raise TrainingError("nothing left to train on after the held-out split")
    config = LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=list(params.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise TrainingError(f"the target modules do not fit this base: {exc}") from exc
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps_per_epoch = math.ceil(len(training) / params.batch_size)
    steps = params.max_steps or max(1, math.ceil(steps_per_epoch * params.epochs))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=params.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5) * (1 - s / (steps + 1)))
    peft_model.train()
    rng = random.Random(params.seed + 1)  # noqa: S311 - seeded batch order
    batch_order: list[int] = []
    losses: list[float] = []
    for step in range(steps):
        if len(batch_order) < params.batch_size:
            refill = list(range(len(training)))
            rng.shuffle(refill)
            batch_order.extend(refill)
        batch = [training[i] for i in batch_order[: params.batch_size]]
        del batch_order[: params.batch_size]
        ids, mask, labels = _collate(torch, batch, pad)
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss))
        if progress is not None:
            progress("train", step + 1, steps, {"loss": losses[-1]})
    peft_model.eval()
    accuracy, eval_loss = evaluate(peft_model, tokenizer, evaluation, pad, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's hub card template; the release card is ours
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base_release.name if base_release else base.name
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    card: dict[str, Any] = {
        "description": f"LoRA adapter trained with PEFT on {data.name}",
        "base_files_sha256": base_files_sha256(base),
        "training": {
            "data_sha256": artifacts.sha256_file(data),
            "examples": len(training),
            "held_out_examples": len(evaluation),
            "hyperparameters": {**asdict(params), "target_modules": list(params.target_modules), "steps": steps},
            "final_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4),
            "seconds": round(time.monotonic() - started, 1),
            "threads": torch.get_num_threads(),
        },
        "evaluation": {"accuracy": round(accuracy, 4), "held_out_loss": round(eval_loss, 4)},
    }
    if base_release is not None:
        card["base"] = base_release.to_json()
    card.update(metadata or {})
    out.with_name(out.name + ".card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card


def _collate(torch: Any, batch: list[Example], pad: int) -> tuple[Any, Any, Any]:
    width = max(len(e.prompt) + len(e.answer) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, example in enumerate(batch):
        sequence = example.prompt + example.answer
        ids[i, : len(sequence)] = torch.tensor(sequence)
        mask[i, : len(sequence)] = 1
        labels[i, len(example.prompt) : len(sequence)] = torch.tensor(example.answer)
    return ids, mask, labels


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    pad: int,
    *,
    batch_size: int = 16,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
) -> tuple[float, float]:
    """Exact-match accuracy of greedy answers on `examples`, and their mean loss."""
    import torch  # noqa: PLC0415

    correct = 0
    losses = []
    budget = max(len(e.answer) for e in examples) + 4
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            ids, mask, labels = _collate(torch, batch, pad)
            losses.append(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss))
            width = max(len(e.prompt) for e in batch)
            prompt = torch.full((len(batch), width), pad, dtype=torch.long)
            prompt_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, example in enumerate(batch):
                prompt[i, width - len(example.prompt) :] = torch.tensor(example.prompt)
                prompt_mask[i, width - len(example.prompt) :] = 1
            out = model.generate(
                input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=budget, do_sample=False, pad_token_id=pad
            )
            for i, example in enumerate(batch):
                text = tokenizer.decode(out[i, width:], skip_special_tokens=True).strip()
                correct += text == example.answer_text
            if progress is not None:
                progress("evaluate", min(start + batch_size, len(examples)), len(examples), {})
    return correct / len(examples), sum(losses) / len(losses)
