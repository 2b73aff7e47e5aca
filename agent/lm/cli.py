"""`sitewarden lm ...`: the model owner's tools for language models (they run where the model is built,
not at a site): import a GGUF file as a base model, train a LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from agent.lm.errors import LMError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Language models: import, train.")


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command("import-gguf")
def import_gguf(
    file: Annotated[Path, typer.Argument(help="A GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf).")],
    out: Annotated[Path, typer.Option("--out", help="The base model directory to write (new or empty).")],
) -> None:
    """Convert a GGUF file into a transformers base model directory (float32 safetensors, tokenizer, chat
    template) and write its card to OUT.card.json. Push it with `sitewarden release push OUT --kind model
    --runtime transformers --metadata OUT.card.json`."""
    from agent.lm.gguf_import import import_gguf as convert  # noqa: PLC0415

    try:
        card = convert(file, out)
    except LMError as exc:
        _fail(str(exc), 2)
    typer.echo(f"{out}: {card['architecture']}, {card['parameters']:,} parameters; card in {out.name}.card.json")


@app.command("train-adapter")
def train_adapter(
    base: Annotated[Path, typer.Option("--base", help="The base model directory.")],
    data: Annotated[Path, typer.Option("--data", help="JSONL of chat examples ({'messages': [...]}).")],
    out: Annotated[Path, typer.Option("--out", help="The adapter directory to write (new or empty).")],
    base_release: Annotated[
        str | None, typer.Option("--base-release", help="The base's release as NAME@VERSION, for the card.")
    ] = None,
    base_digest: Annotated[
        str | None, typer.Option("--base-digest", help="SHA-256 of the base release's manifest (release.json).")
    ] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = 2e-3,
    epochs: Annotated[float, typer.Option(help="Passes over the training split.")] = 1.0,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many steps.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    held_out: Annotated[float, typer.Option("--held-out", help="Share of examples held out for evaluation.")] = 0.2,
    target: Annotated[
        list[str] | None, typer.Option("--target", help="Target module (repeat); q_proj, v_proj.")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    metadata: Annotated[
        Path | None, typer.Option("--metadata", help="JSON object merged into the card (purposes, risk tier, ...).")
    ] = None,
) -> None:
    """Train a LoRA adapter with PEFT on the CPU, evaluate it on a held-out split, and write the adapter
    directory and its card (OUT.card.json: base digest, data SHA-256, hyperparameters, evaluation)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: PLC0415

    from agent.lm import artifacts  # noqa: PLC0415
    from agent.lm import train as training  # noqa: PLC0415

    ref = None
    if (base_release is None) != (base_digest is None):
        _fail("--base-release and --base-digest go together", 2)
    if base_release is not None and base_digest is not None:
        name, sep, version = base_release.rpartition("@")
        if not sep or not name or not version:
            _fail("--base-release is NAME@VERSION", 2)
        ref = artifacts.BaseRef(name, version, base_digest)
        try:
            artifacts.adapter_base({"base": ref.to_json()})
        except LMError as exc:
            _fail(str(exc), 2)
    extra = {}
    if metadata is not None:
        try:
            extra = json.loads(metadata.read_text())
        except (OSError, ValueError) as exc:
            _fail(f"--metadata {metadata}: {exc}", 2)
        if not isinstance(extra, dict):
            _fail("--metadata must hold a JSON object", 2)
    params = training.Hyperparameters(
        rank=rank,
        alpha=alpha,
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        held_out=held_out,
        seed=seed,
        target_modules=tuple(target) if target else training.DEFAULT_TARGETS,
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int, figures: dict[str, float]) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, info="")
            info = " ".join(f"{k} {v:.3f}" for k, v in figures.items())
            bar.update(tasks[phase], completed=done, info=info)

        try:
            card = training.train(base, data, out, params, base_release=ref, metadata=extra, progress=progress)
        except LMError as exc:
            _fail(str(exc), 2)
    evaluation = card["evaluation"]
    typer.echo(
        f"{out}: held-out accuracy {evaluation['accuracy']:.3f}, loss {evaluation['held_out_loss']:.3f} "
        f"({card['training']['held_out_examples']} examples); card in {out.name}.card.json"
    )
