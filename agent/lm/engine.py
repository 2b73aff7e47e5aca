"""The decoding engine: one frozen base model, LoRA adapters attached by digest, requests batched.

- **Load once.** `Engine(directory)` loads a checked base model directory (safetensors only, no
  remote code, offline) in float32 and freezes it. It is never reloaded for an adapter.
- **Adapters** are attached with PEFT under a name derived from their manifest digest, and only
  kept if they attach to every module they name: every key of `adapter_model.safetensors` lands in
  a LoRA layer and every LoRA layer gets its weights, and each entry of `target_modules` matched
  at least one module of the base. `detach` removes one. Both run on the engine's thread between
  two batches, so no forward pass ever sees an adapter half attached.
- **Batching.** Requests queue; the engine thread waits, at most a short collection window
  (`window_s`, from the oldest waiting request), for as many sequences as its last batch had (the
  clients it just answered tend to come back together), takes up to `max_batch` of them, and
  decodes them together: one prefill of the left-padded prompts, then one forward pass per token
  for the whole batch, rows of different adapters side by side (PEFT's mixed-adapter batches,
  `adapter_names`; a batch of one adapter takes PEFT's plain path), rows that finish leaving the
  batch (their KV-cache rows are dropped). A request's sequences (its candidates) always travel
  in one batch.
- **Per-row decoding**: each row has its own temperature, top-p, seed (a `torch.Generator`),
  stop strings and token budget, so a batch mixes requests freely and a seeded request draws the
  same tokens whatever else is in its batch (up to float rounding of differently shaped batches).
  Each row reports the mean log-probability of its tokens (the `best` strategy's tie-break).

The engine thread is the only one that touches the model; torch's intra-op threads parallelise
each forward pass (`agent.lm.runtime`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import inspect
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.lm import artifacts, runtime
from agent.lm.errors import ArtifactError, LMError

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class Sequence:
    """One sequence to generate (one candidate of one request)."""

    prompt_ids: list[int]
    adapter: str | None
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None  # streamed deltas, called on the engine thread


@dataclass
class Generated:
    text: str
    tokens: int
    finish_reason: str  # "stop" or "length"
    mean_logprob: float
    seed: int


@dataclass
class _Job:
    sequences: list[Sequence]
    future: concurrent.futures.Future[list[Generated]]
    arrived: float = field(default_factory=time.monotonic)


class Engine:
    """A base model and its attached adapters, decoding batches on one thread."""

    def __init__(self, directory: Path, *, max_batch: int = 16, window_s: float = 0.02) -> None:
        artifacts.check_base_dir(directory)
        self.threads = runtime.configure()
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        self._torch = torch
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                directory, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"base model: transformers cannot load it: {exc}") from exc
        model.eval()
        # transformers 5.x renamed the KV cache argument and output `past_key_values` to `cache`.
        self._cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model.requires_grad_(False)
        self.model = model
        self.peft: Any = None
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(i) for i in [*ids, self.tokenizer.eos_token_id] if i is not None}
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids))
        self.max_batch = max_batch
        self.window_s = window_s
        self.adapters: set[str] = set()
        self._pending: collections.deque[_Job] = collections.deque()
        self._controls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0
        self.batched_rows = 0
        self.pauses: collections.deque[float] = collections.deque(maxlen=256)
        self._active: str | None = None  # the PEFT model's active adapter (set for single-adapter batches)
        self._last_rows = 1
        self._thread = threading.Thread(target=self._loop, name="lm-engine", daemon=True)
        self._thread.start()

    # -- the public side ----------------------------------------------------------------------

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the model's chat template, with the assistant's turn opened."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, sequences: list[Sequence]) -> concurrent.futures.Future[list[Generated]]:
        """Queue sequences that must be decoded in one batch; the future holds their results in order."""
        if not sequences or len(sequences) > self.max_batch:
            raise LMError(f"a request draws 1 to {self.max_batch} sequences at once, not {len(sequences)}")
        job = _Job(sequences, concurrent.futures.Future())
        with self._cond:
            if self._closed:
                raise LMError("the engine is closed")
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def generate(self, sequences: list[Sequence]) -> list[Generated]:
        return self.submit(sequences).result()

    def attach(self, name: str, directory: Path) -> None:
        """Attach a LoRA adapter under `name` (between batches); ArtifactError when it does not fit."""
        # What can be read without the model is read here, on the caller's thread: decoding stands still only
        # while PEFT adds the adapter's layers and loads its weights.
        config = artifacts.check_adapter_dir(directory)
        import peft  # noqa: F401, PLC0415 - imported here, not on the engine thread
        from safetensors import safe_open  # noqa: PLC0415

        try:
            with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
                in_file = set(handle.keys())
        except Exception as exc:  # OSError, or safetensors' own SafetensorError
            raise ArtifactError(f"adapter: adapter_model.safetensors is not readable: {exc}") from exc
        self._call(lambda: self._attach(name, directory, config, in_file))

    def detach(self, name: str) -> None:
        self._call(lambda: self._detach(name))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        for job in self._pending:
            job.future.set_exception(LMError("the engine was closed"))

    def _call(self, fn: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise LMError("the engine is closed")
            self._controls.append((fn, future))
            self._cond.notify()
        return future.result()

    # -- adapters (engine thread) ------------------------------------------------------------------

    def _attach(self, name: str, directory: Path, config: dict[str, Any], in_file: set[str]) -> None:
        from peft import PeftModel, get_peft_model_state_dict  # noqa: PLC0415

        if name in self.adapters:
            return
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(directory), adapter_name=name, is_trainable=False)
            else:
                self.peft.load_adapter(str(directory), adapter_name=name, is_trainable=False)
        except (ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
            self._forget(name)
            raise ArtifactError(f"adapter: does not attach to this base: {_first_line(exc)}") from exc
        try:
            attached = set(get_peft_model_state_dict(self.peft, adapter_name=name).keys())
            problem = _attach_problem(config, in_file, attached, self._lora_modules(name))
        except Exception as exc:
            self._forget(name)
            raise ArtifactError(f"adapter: cannot check how it attached: {exc}") from exc
        if problem:
            self._forget(name)
            raise ArtifactError(f"adapter: {problem}")
        self.peft.eval()
        self.adapters.add(name)
        self._active = None

    def _lora_modules(self, name: str) -> list[str]:
        return [
            module_name
            for module_name, module in self.peft.base_model.model.named_modules()
            if name in getattr(module, "lora_A", {})
        ]

    def _forget(self, name: str) -> None:
        if self.peft is not None and name in self.peft.peft_config:
            self.peft.delete_adapter(name)
        self.adapters.discard(name)
        self._active = None  # PEFT picks another active adapter when it deletes the active one

    def _detach(self, name: str) -> None:
        self._forget(name)

    # -- the loop (engine thread) ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._controls and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                controls = list(self._controls)
                self._controls.clear()
                jobs: list[_Job] = []
                if not controls:
                    # Wait, at most the window, for as many rows as the last batch had: under steady load the
                    # clients it answered come back together, and a batch started on the first of them would
                    # leave the others waiting for its end. A lone caller is not kept waiting.
                    deadline = self._pending[0].arrived + self.window_s
                    expect = min(self.max_batch, max(1, self._last_rows))
                    while self._rows() < expect and not self._closed:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    rows = 0
                    while self._pending and (not jobs or rows + len(self._pending[0].sequences) <= self.max_batch):
                        job = self._pending.popleft()
                        rows += len(job.sequences)
                        jobs.append(job)
            for fn, future in controls:
                paused = time.perf_counter()
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
                finally:  # how long decoding stood still for an attach or a detach
                    self.pauses.append(time.perf_counter() - paused)
            if jobs:
                self._run(jobs)

    def _rows(self) -> int:
        return sum(len(job.sequences) for job in self._pending)

    def _run(self, jobs: list[_Job]) -> None:
        rows = [s for job in jobs for s in job.sequences]
        self._last_rows = len(rows)
        try:
            results = self._decode(rows)
        except BaseException as exc:
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.batches += 1
        self.batched_rows += len(rows)
        start = 0
        for job in jobs:
            job.future.set_result(results[start : start + len(job.sequences)])
            start += len(job.sequences)

    def _decode(self, rows: list[Sequence]) -> list[Generated]:
        torch = self._torch
        count = len(rows)
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((count, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((count, width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            attention[i, width - len(row.prompt_ids) :] = 1
        # 52 bits: a seed goes into JSON (the audit entry), whose safe integers end at 2**53.
        seeds = [row.seed if row.seed is not None else secrets.randbits(52) for row in rows]
        generators = [
            torch.Generator().manual_seed(seed) if row.temperature > 0 else None
            for row, seed in zip(rows, seeds, strict=True)
        ]
        states = [_RowState(row) for row in rows]
        # With no adapter attached the base runs alone (LoRA layers left by detached adapters do nothing).
        mixed = self.peft is not None and bool(self.adapters)
        model = self.peft if mixed else self.model
        names = [row.adapter or BASE_ADAPTER for row in rows]
        unknown = {n for n in names if n != BASE_ADAPTER} - self.adapters
        plain = contextlib.nullcontext()
        if mixed and set(names) == {BASE_ADAPTER}:  # the base alone: LoRA layers switched off, no mixed path
            plain = self.peft.disable_adapter()
            mixed = False
        elif mixed and len(set(names)) == 1 and not unknown:
            # One adapter for the whole batch: PEFT's plain path (the active adapter), cheaper than its
            # mixed-batch path, which splits every LoRA layer's input by adapter.
            if self._active != names[0]:
                self.peft.set_adapter(names[0])
                self._active = names[0]
            mixed = False
            model = self.peft
        if unknown:
            raise LMError(f"adapter {sorted(unknown)[0]} is not attached")
        extra: dict[str, Any] = {"adapter_names": names} if mixed else {}
        active = list(range(count))
        with torch.inference_mode(), plain:
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            out = model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
            cache = out[self._cache_key]
            logits = out.logits[:, -1, :]
            while True:
                chosen = self._choose(logits, [rows[i] for i in active], [generators[i] for i in active])
                tokens, logprobs = chosen
                keep: list[int] = []
                for position, index in enumerate(active):
                    if not states[index].step(int(tokens[position]), float(logprobs[position]), self):
                        keep.append(position)
                if not keep:
                    break
                if len(keep) < len(active):
                    selected = torch.tensor(keep, dtype=torch.long)
                    cache.batch_select_indices(selected)
                    attention = attention[selected]
                    tokens = tokens[selected]
                    active = [active[p] for p in keep]
                    if extra:
                        extra = {"adapter_names": [names[i] for i in active]}
                attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
                positions = attention.sum(-1, keepdim=True) - 1
                out = model(
                    input_ids=tokens.unsqueeze(-1),
                    attention_mask=attention,
                    position_ids=positions,
                    **{self._cache_key: cache},
                    use_cache=True,
                    **extra,
                )
                cache = out[self._cache_key]
                logits = out.logits[:, -1, :]
        return [state.result(seed) for state, seed in zip(states, seeds, strict=True)]

    def _choose(self, logits: Any, rows: list[Sequence], generators: list[Any]) -> tuple[Any, Any]:
        """The next token of each row (greedy at temperature 0, else sampled with its own generator) and its
        log-probability under the model."""
        torch = self._torch
        logits = logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / row.temperature, dim=-1)
            if row.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(-1) - ordered > row.top_p
                ordered[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, ordered)
            tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
        return tokens, logp.gather(1, tokens.unsqueeze(-1)).squeeze(-1)


class _RowState:
    """What one row has generated so far; decides when it ends and streams what it may."""

    def __init__(self, row: Sequence) -> None:
        self.row = row
        self.ids: list[int] = []
        self.logprob = 0.0
        self.text = ""
        self.sent = 0
        self.finish = ""
        self.hold = max((len(s) for s in row.stop), default=0)

    def step(self, token: int, logprob: float, engine: Engine) -> bool:
        """Take one token; True when the row has ended."""
        if token in engine.eos_ids:
            self.finish = "stop"
            self._flush(final=True)
            return True
        self.ids.append(token)
        self.logprob += logprob
        self.text = engine.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.row.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self.finish = "stop"
                self._flush(final=True)
                return True
        if len(self.ids) >= self.row.max_new_tokens:
            self.finish = "length"
            self._flush(final=True)
            return True
        self._flush(final=False)
        return False

    def _flush(self, *, final: bool) -> None:
        if self.row.on_text is None:
            return
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                end = self.text.rfind("\ufffd")
            if self.hold:  # a stop string may be starting: hold back what could be its beginning
                end = min(end, max(self.sent, len(self.text) - self.hold + 1))
        if end > self.sent:
            self.row.on_text(self.text[self.sent : end])
            self.sent = end

    def result(self, seed: int) -> Generated:
        mean = self.logprob / len(self.ids) if self.ids else 0.0
        return Generated(self.text, len(self.ids), self.finish or "length", mean, seed)


def _attach_problem(config: dict[str, Any], in_file: set[str], attached: set[str], modules: list[str]) -> str:
    """Why an adapter did not attach to every module it names, or "" when it did."""
    if not modules:
        return "attached to no module of the base model"
    stray = sorted(in_file - attached)
    if stray:
        return f"{len(stray)} weight(s) fit no module of the base model, e.g. {stray[0]}"
    missing = sorted(attached - in_file)
    if missing:
        return f"{len(missing)} LoRA weight(s) are missing from adapter_model.safetensors, e.g. {missing[0]}"
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unmatched = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in modules)]
        if unmatched:
            return f"target module(s) {', '.join(map(repr, unmatched))} match no module of the base model"
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__
