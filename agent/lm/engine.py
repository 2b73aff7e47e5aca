"""The decoding engine: one frozen base model, LoRA adapters attached by digest, requests batched.

- **Load once.** `Engine(directory)` loads a checked base model directory (safetensors only, no
  remote code, offline) in float32 and freezes it. It is never reloaded for an adapter.
- **Adapters** are attached with PEFT into slots (PEFT adapters under names of the engine's own;
  rows name an adapter by its manifest digest), and only kept if they attach to every module they
  name: every key of `adapter_model.safetensors` lands in a LoRA layer and every LoRA layer gets
  its weights, and each entry of `target_modules` matched at least one module of the base. When
  an adapter is first attached a spare slot of its shape is added, and `detach` frees a slot
  rather than removing its layers: the next version of an adapter (a rollout) is attached by
  copying its weights into a free slot of the same configuration, in a few milliseconds, where
  adding layers to the model stands decoding still for a fifth of a second (vLLM's LoRA slots,
  `max_loras`, work the same way). Attach and detach run on the engine's thread between two
  forward passes, so no pass ever sees an adapter half attached; an adapter is not detached while
  rows decode on it. The next version of an adapter gets its predecessor's cached prefixes (below),
  prefilled beside decoding before it serves, and its weights stacked for the batched LoRA path.
- **Continuous batching.** Requests queue; rows join the running batch between two forward
  passes (vLLM's and TGI's continuous batching): their left-padded prompts are prefilled in one
  pass, their KV caches are left-padded to the batch's length and stacked onto it, and from the
  next pass on they decode with it, one forward pass per token for every row, rows of different
  adapters side by side (PEFT's mixed-adapter batches, `adapter_names`; rows of one adapter take
  PEFT's plain path). A row that ends leaves at once (its KV-cache rows are dropped, and columns no
  row attends to any more are trimmed) and a request is answered as soon as its own rows have
  ended, not when the batch does. A request's sequences (its candidates) always join together.
  A batch started from idle first waits, at most a short collection window (`window_s`, from the
  oldest waiting request or the end of the last batch, whichever is later), for as many rows as
  the last batch had at its peak: the clients it answered tend to come back together, and one
  prefill for all of them is cheaper than one each. A model whose cache is not a plain growing
  one (sliding windows) decodes in static batches: new rows wait for the batch to end.
- **Prefix caching.** Prompts of one task share a long opening (the system prompt, the chat
  template's start of the user's turn). The engine learns the prefixes, in whole 8-token blocks,
  that different recent prompts have in common, keeps their keys and values per adapter slot (one
  pass over the prefix alone, or cut from a lone row's whole prefill), and prefills joining rows that start with one
  from the rest of their prompt only, on top of the stacked cached prefix. A slot's entries die
  when it gets another adapter. A prompt repeated word for word is not made a prefix of its own.
- **LoRA deltas** are added by the engine's own batched path (`_MixedLoRA`, as S-LoRA and Punica
  do) on PEFT's layers switched off: rows of one adapter or of several decode with the same few
  kernels per layer, so a hot swap, during which old and new versions decode side by side, costs
  little more per token than one adapter. PEFT's own paths remain for LoRA variants it does not
  cover (DoRA, LoRA bias).
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
import copy
import inspect
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.lm import artifacts, runtime
from agent.lm.errors import ArtifactError, LMError

log = logging.getLogger("sitewarden.agent.lm.engine")

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
PREFIX_BLOCK = 8  # prefixes are shared in whole blocks of tokens (vLLM's automatic prefix caching does too)
PREFIX_MIN = 16  # shorter common prefixes are not worth a cache entry
PREFIX_ENTRIES = 32  # (adapter, prefix) key and value caches kept, least recently used dropped
WARM_PREFIXES = 2  # a new version of an adapter gets the keys and values of its predecessor's latest prefixes
WARM_WAIT_S = 10.0  # how long an attach waits for the side prefill of its predecessor's prefixes
PAUSES = frozenset({"attach", "warm", "detach"})  # the trace's kinds of pass during which decoding stands still
PASSES_KEPT = 16384  # the engine's trace: a few minutes of decoding under load


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


@dataclass(frozen=True)
class Pass:
    """One stretch of work on the engine thread, in its trace (`Engine.passes`)."""

    kind: str  # "join" (a prefill, with any prefix pass it needs), "step", or a pause: "attach", "warm", "detach";
    # "beside": a new version's prefix prefilled on the side thread while decoding went on (not a pause)
    started: float  # time.perf_counter()
    seconds: float
    rows: int = 0  # the rows it carried
    adapters: int = 0  # how many different adapters (the base counts as one) those rows run on
    built_s: float = 0.0  # of `seconds`, how long the batched LoRA path took to stack a new set of adapters
    lora_s: float = 0.0  # of `seconds`, how long it took to add the rows' LoRA deltas (its masks and hooks)
    prefix_s: float = 0.0  # of `seconds`, how long passes over a prefix alone took (to cache it for an adapter)
    tokens: int = 0  # the tokens a join prefilled (rows times its width)
    uncached_tokens: int = 0  # of them, those of a known shared prefix no cache entry held for the rows' adapter
    width: int = 0  # a step's: the positions its rows attended over (the longest row's, the others left-padded)


@dataclass
class _Warm:
    """What a newly attached version gets beside decoding, before it serves (`Engine._warm_beside`): the
    batched LoRA path's stacks for it alone and for it beside its predecessor, and its predecessor's
    prefixes prefilled under it."""

    name: str
    slot: str
    generation: int
    prefixes: list[tuple[int, ...]]
    mixer: _MixedLoRA  # the batched path the stacks are made for (dropped if the engine made another meanwhile)
    generations: dict[str, int]  # the slots' generations when it was planned (its stacks' keys)
    mixes: list[tuple[str, ...]]  # the sets of slots to stack
    stacks: dict[tuple[str, ...], tuple[int, dict[int, tuple[Any, Any]]]] = field(default_factory=dict)


@dataclass
class _Slot:
    """A LoRA adapter in the PEFT model: its configuration's signature, and which adapter it holds."""

    id: str
    signature: str
    holds: str | None = None  # the adapter name, or None when the slot is free
    generation: int = 0  # bumped whenever what it holds changes (prefix caches are keyed by it)
    params: dict[str, Any] | None = None  # its parameters by the keys PEFT saves them under


# What an adapter_config.json may change without changing the layers its weights go in (provenance,
# initialisation and training-only settings); any other difference needs a slot of its own.
_SIGNATURE_IGNORES = frozenset(
    {
        "base_model_name_or_path", "revision", "inference_mode", "init_lora_weights", "lora_dropout",
        "peft_version", "auto_mapping", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    }
)  # fmt: skip


def _signature(config: dict[str, Any]) -> str:
    """Adapters with one signature have layers of the same shapes in the same modules, with the same scaling."""
    kept = {k: v for k, v in config.items() if k not in _SIGNATURE_IGNORES}
    if isinstance(kept.get("target_modules"), list):
        kept["target_modules"] = sorted(kept["target_modules"])
    return json.dumps(kept, sort_keys=True, default=str)


@dataclass
class _Job:
    sequences: list[Sequence]
    future: concurrent.futures.Future[list[Generated]]
    arrived: float = field(default_factory=time.monotonic)
    results: list[Generated | None] = field(default_factory=list)
    left: int = 0  # rows still decoding


class Engine:
    """A base model and its attached adapters, decoding batches on one thread."""

    def __init__(self, directory: Path, *, max_batch: int = 16, window_s: float = 0.05) -> None:
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
        # A second tree of the base's modules sharing every weight and buffer (nothing is copied but the
        # modules themselves), made before PEFT wraps the first: a new adapter version's cached prefixes are
        # computed with it beside decoding (`_prefix_beside`), which never touches the engine's modules.
        self._warmer = copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})
        # One thread at the lowest CPU priority does it: it takes the cores' idle time, not the decoding's.
        self._beside = concurrent.futures.ThreadPoolExecutor(1, "lm-warm", initializer=_aside)
        self.prefixes_warmed_beside = 0
        self.peft: Any = None
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(i) for i in [*ids, self.tokenizer.eos_token_id] if i is not None}
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids))
        self.max_batch = max_batch
        self.window_s = window_s
        self.adapters: set[str] = set()  # the names (digests) of the adapters attached
        self._slots: dict[str, _Slot] = {}  # PEFT's adapters, by their PEFT names
        self._slot_of: dict[str, str] = {}  # adapter name -> the slot that holds it
        self._deleted = 0  # slots deleted so far (a slot's PEFT name is never reused)
        self._batch: _Batch | None = None  # the running batch (engine thread)
        self._prefixes = _Prefixes()
        self._prefix_kv: collections.OrderedDict[tuple[str, int, tuple[int, ...]], list[tuple[Any, Any]]] = (
            collections.OrderedDict()
        )
        self._prefix_ok: bool | None = None  # whether this model's cache lets rows reuse a cached prefix
        self.prefix_tokens_reused = 0
        self._mixer: _MixedLoRA | None = None  # batched LoRA for rows of different adapters (made when first needed)
        self._pending: collections.deque[_Job] = collections.deque()
        self._controls: collections.deque[tuple[str, Callable[[], Any], concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0
        self.batched_rows = 0
        # What the engine thread did, pass by pass: how long a swap stood decoding still, and what else it cost.
        self.passes: collections.deque[Pass] = collections.deque(maxlen=PASSES_KEPT)
        self._prefix_s = 0.0  # prefix passes' time since the last pass was traced
        self._prefilled = (0, 0)  # the last join's tokens and uncached prefix tokens
        self._active: str | None = None  # the PEFT model's active adapter (set for single-adapter batches)
        self._wanted = 1  # rows wanted when the last batch ended: its peak and those queued meanwhile
        self._ended = 0.0  # when the last batch ended (time.monotonic)
        self._peak = 0  # the most rows the running batch has had
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

    def attach(self, name: str, directory: Path, succeeds: str | None = None) -> None:
        """Attach a LoRA adapter under `name` (between batches); ArtifactError when it does not fit.

        `succeeds` names the adapter it replaces (the previous version of a rollout): the prefixes that one's
        prompts shared are prefilled for the new one before this returns (waiting at most WARM_WAIT_S), so
        that its first requests start from the cached system prompt as the old version's did. They are
        computed beside decoding, on a thread of the lowest CPU priority, by a second tree of the base's
        modules that shares its weights (`_warmer`), with the new adapter's deltas added as the batched LoRA
        path adds them: a prefill is a few hundred milliseconds of both cores here. The batched path's stacks
        of the new version, alone and beside the one it replaces, are made there too (5 ms each here), so
        that decoding stands still only to copy the weights in (about a millisecond) and to store the
        results. LoRA variants the batched path does not cover are prefilled by the engine itself."""
        # What can be read without the model is read beforehand, on the side thread of the lowest priority (a few
        # milliseconds of CPU that a thread of normal priority would take from a decoding pass): decoding
        # stands still only while the weights are copied in (or PEFT adds the adapter's layers).
        config, tensors = self._beside.submit(self._read_adapter, directory).result()
        warm = self._call("attach", lambda: self._attach(name, directory, config, tensors, succeeds))
        if warm is not None:  # beside decoding; the engine only stores what was computed
            self._warm_beside(warm)

    @staticmethod
    def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """An adapter directory's checked configuration and its weights (on `_beside`'s thread)."""
        config = artifacts.check_adapter_dir(directory)
        import peft  # noqa: F401, PLC0415 - imported here, not on the engine thread
        from safetensors.torch import load_file  # noqa: PLC0415

        try:
            return config, load_file(str(directory / "adapter_model.safetensors"))
        except Exception as exc:  # OSError, or safetensors' own SafetensorError
            raise ArtifactError(f"adapter: adapter_model.safetensors is not readable: {exc}") from exc

    def _warm_beside(self, warm: _Warm) -> None:
        """Stack the new version's LoRA weights and prefill the warm's prefixes on the side thread, waiting at
        most WARM_WAIT_S, and hand the results to the engine thread without waiting for it: it stores them
        before it takes another request (controls come first in its loop), so the new version's first rows
        find them. On cores that never idle the side thread gets no time, and the new version then serves at
        once, its first rows stacking and prefilling themselves (what is computed later is dropped)."""
        stacked = self._beside.submit(self._stack_beside, warm)
        futures = [(prefix, self._beside.submit(self._prefix_beside, warm, prefix)) for prefix in warm.prefixes]
        done, late = concurrent.futures.wait([stacked, *(f for _, f in futures)], timeout=WARM_WAIT_S)
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed:  # the engine changed its layers meanwhile (another adapter's own slot): nothing is kept
            log.warning("adapter %s: not warmed beside decoding: %s", warm.name[:12], _first_line(failed[0]))
            return
        computed = [(prefix, f.result()) for prefix, f in futures if f in done]
        if late:
            log.warning(
                "adapter %s: %d cached prefix(es) not computed beside decoding within %.0f s (the cores never "
                "idled); its first requests prefill them",
                warm.name[:12],
                len(late),
                WARM_WAIT_S,
            )
            for future in late:
                future.cancel()
        stacks = warm.stacks if stacked in done else {}  # what the side thread stacks later is not kept
        kept = self._post("warm", lambda: self._keep_warmed(warm, stacks, computed))
        kept.add_done_callback(
            lambda f: f.exception() and log.warning("adapter %s: warm-up not kept: %s", warm.name[:12], f.exception())
        )

    def detach(self, name: str) -> None:
        self._call("detach", lambda: self._detach(name))

    @property
    def pauses(self) -> list[float]:
        """How long decoding stood still for each attach, warm-up and detach in the trace, in seconds."""
        return [p.seconds for p in list(self.passes) if p.kind in PAUSES]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._beside.shutdown(wait=False, cancel_futures=True)
        for job in self._pending:
            job.future.set_exception(LMError("the engine was closed"))

    def _call(self, kind: str, fn: Callable[[], Any]) -> Any:
        return self._post(kind, fn).result()

    def _post(self, kind: str, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Have the engine thread run `fn` between two passes, before it takes another request."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise LMError("the engine is closed")
            self._controls.append((kind, fn, future))
            self._cond.notify()
        return future

    # -- adapters (engine thread) ------------------------------------------------------------------

    def _attach(
        self, name: str, directory: Path, config: dict[str, Any], tensors: dict[str, Any], succeeds: str | None
    ) -> _Warm | None:
        if name in self.adapters:
            return None
        signature = _signature(config)
        free = next((slot for slot in self._slots.values() if slot.holds is None and slot.signature == signature), None)
        if free is not None:
            self._fill(free, name, tensors)
            return self._warm(name, succeeds)
        slot = _Slot(f"slot{len(self._slots) + self._deleted}", signature)
        self._inject(slot, directory, config, set(tensors))
        self._slots[slot.id] = slot
        slot.holds = name
        self._slot_of[name] = slot.id
        self.adapters.add(name)
        if not any(other.holds is None and other.signature == signature for other in self._slots.values()):
            # A spare slot of the same shape, so that the next version of this adapter (a rollout) is attached
            # by copying its weights in, while requests flow, instead of by adding layers to the model.
            spare = _Slot(f"slot{len(self._slots) + self._deleted}", signature)
            try:
                self.peft.add_adapter(spare.id, copy.deepcopy(self.peft.peft_config[slot.id]))
            except (ValueError, RuntimeError, KeyError, TypeError) as exc:
                self._delete(spare.id)
                log.warning(
                    "no spare adapter slot (the next version is attached by adding layers): %s", _first_line(exc)
                )
            else:
                self._slots[spare.id] = spare
            self.peft.eval()
        self._active = None
        return self._warm(name, succeeds)

    def _inject(self, slot: _Slot, directory: Path, config: dict[str, Any], in_file: set[str]) -> None:
        """Add a LoRA adapter's layers to the model with PEFT under the slot's name, and check how it attached."""
        from peft import PeftModel, get_peft_model_state_dict  # noqa: PLC0415

        self._unmix()  # new LoRA layers: the batched path is made again, with its hooks on every one of them
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(
                    self.model, str(directory), adapter_name=slot.id, is_trainable=False
                )
            else:
                self.peft.load_adapter(str(directory), adapter_name=slot.id, is_trainable=False)
        except (ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
            self._delete(slot.id)
            raise ArtifactError(f"adapter: does not attach to this base: {_first_line(exc)}") from exc
        try:
            attached = set(get_peft_model_state_dict(self.peft, adapter_name=slot.id).keys())
            problem = _attach_problem(config, in_file, attached, self._lora_modules(slot.id))
        except Exception as exc:
            self._delete(slot.id)
            raise ArtifactError(f"adapter: cannot check how it attached: {exc}") from exc
        if problem:
            self._delete(slot.id)
            raise ArtifactError(f"adapter: {problem}")
        self.peft.eval()

    def _fill(self, slot: _Slot, name: str, tensors: dict[str, Any]) -> None:
        """Copy an adapter's weights into a free slot of the same configuration (no layer is added)."""
        params = self._slot_params(slot)
        stray = sorted(set(tensors) - set(params))
        if stray:
            raise ArtifactError(
                f"adapter: does not attach to this base: {len(stray)} weight(s) fit no module of the base model, "
                f"e.g. {stray[0]}"
            )
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise ArtifactError(
                f"adapter: does not attach to this base: {len(missing)} LoRA weight(s) of its modules are missing "
                f"from adapter_model.safetensors, e.g. {missing[0]}"
            )
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(params[key].shape):
                raise ArtifactError(
                    f"adapter: does not attach to this base: {key} has shape {tuple(tensor.shape)}, "
                    f"the base's module takes {tuple(params[key].shape)}"
                )
        with self._torch.no_grad():
            for key, tensor in tensors.items():
                params[key].copy_(tensor)
        slot.generation += 1
        slot.holds = name
        self._slot_of[name] = slot.id
        self.adapters.add(name)

    def _warm(self, name: str, succeeds: str | None) -> _Warm | None:
        """What adapter `name` gets before it serves when it succeeds another: the batched LoRA path's stacks
        for it, alone and beside its predecessor, and the prefixes most recently cached for the predecessor
        (at most WARM_PREFIXES), all made beside decoding; None without a predecessor, or when the batched
        path does not cover the adapter (the prefixes are prefilled here then)."""
        old = self._slot_of.get(succeeds or "")
        if old is None:
            return None
        generation = self._generation(old)
        latest = [prefix for slot, gen, prefix in reversed(self._prefix_kv) if (slot, gen) == (old, generation)]
        latest = latest[:WARM_PREFIXES] if self._prefix_ok else []
        new = self._slot_of[name]
        mixer = self._batched()
        if not mixer.serves((new,)):
            for prefix in latest:
                self._compute_prefix((new, self._generation(new), prefix))
            return None
        mixes = [(new,), *([tuple(sorted((old, new)))] if mixer.serves((old,)) else [])]
        generations = {slot: self._generation(slot) for slot in (old, new)}
        return _Warm(name, new, generations[new], latest, mixer, generations, mixes)

    def _stack_beside(self, warm: _Warm) -> None:
        """The batched path's stacks of the warm's mixes (on `_beside`'s thread: the slots' weights are not
        written while they hold these adapters, and the engine only reads them)."""
        warm.stacks = {mix: warm.mixer.build(mix) for mix in warm.mixes}

    def _prefix_beside(self, warm: _Warm, prefix: tuple[int, ...]) -> list[tuple[Any, Any]]:
        """The keys and values of `prefix` under the warm's adapter, computed by the base's second module
        tree, with the adapter's deltas added by hooks as the batched path adds them (on `_beside`'s thread,
        after `_stack_beside`)."""
        torch = self._torch
        started = time.perf_counter()
        _rank, stacks = warm.stacks[(warm.slot,)]

        def add_delta(stack: tuple[Any, Any]) -> Callable[[Any, tuple[Any, ...], Any], Any]:
            a, b = stack
            return lambda _module, args, output: output + torch.matmul(torch.matmul(args[0], a), b)

        adapted = [layer for layer in warm.mixer.layers if warm.slot in layer.lora_A]
        handles = [
            self._warmer.get_submodule(warm.mixer.names[id(layer)]).register_forward_hook(add_delta(stacks[id(layer)]))
            for layer in adapted
        ]
        try:
            with torch.inference_mode():
                ids = torch.tensor([prefix], dtype=torch.long)
                out = self._warmer(input_ids=ids, use_cache=True, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        layers = _layers(out[self._cache_key]) or []
        self.passes.append(Pass("beside", started, time.perf_counter() - started, tokens=len(prefix)))
        return [(layer.keys, layer.values) for layer in layers]

    def _keep_warmed(
        self,
        warm: _Warm,
        stacks: dict[tuple[str, ...], tuple[int, dict[int, tuple[Any, Any]]]],
        computed: list[tuple[tuple[int, ...], list[tuple[Any, Any]]]],
    ) -> None:
        """Store what was made beside decoding, unless the slot got another adapter meanwhile (and the stacks
        only if the batched path and every slot they stack are still the ones they were made for)."""
        if self._slot_of.get(warm.name) != warm.slot or self._generation(warm.slot) != warm.generation:
            return
        if self._mixer is warm.mixer and all(self._generation(s) == g for s, g in warm.generations.items()):
            for mix, built in stacks.items():
                warm.mixer.offer((mix, tuple(warm.generations[s] for s in mix)), built)
        for prefix, layers in computed:
            if layers:
                self._store_prefix((warm.slot, warm.generation, prefix), layers)
                self.prefixes_warmed_beside += 1

    def _slot_params(self, slot: _Slot) -> dict[str, Any]:
        """The slot's LoRA parameters, by the keys PEFT saves them under (`...q_proj.lora_A.weight`)."""
        if slot.params is None:
            marker = f".{slot.id}."
            slot.params = {name.replace(marker, "."): p for name, p in self.peft.named_parameters() if marker in name}
        return slot.params

    def _unmix(self) -> None:
        if self._mixer is not None:
            self._mixer.close()
            self._mixer = None

    def _lora_modules(self, name: str) -> list[str]:
        return [
            module_name
            for module_name, module in self.peft.base_model.model.named_modules()
            if name in getattr(module, "lora_A", {})
        ]

    def _delete(self, slot_id: str) -> None:
        self._unmix()
        if self.peft is not None and slot_id in self.peft.peft_config:
            self.peft.delete_adapter(slot_id)
            self._deleted += 1
        self._slots.pop(slot_id, None)
        self._active = None  # PEFT picks another active adapter when it deletes the active one

    def _detach(self, name: str) -> None:
        slot_id = self._slot_of.get(name)
        if slot_id is not None and self._batch is not None and any(r.name == slot_id for r in self._batch.rows):
            raise LMError(f"adapter {name} has rows decoding; it is detached after they end")
        self.adapters.discard(name)
        self._slot_of.pop(name, None)
        slot = self._slots.get(slot_id or "")
        if slot is None:
            return
        slot.holds = None  # free for the next adapter of its shape; one free slot per shape is kept
        slot.generation += 1
        if sum(1 for other in self._slots.values() if other.holds is None and other.signature == slot.signature) > 1:
            self._delete(slot.id)

    # -- the loop (engine thread) ------------------------------------------------------------------

    def _loop(self) -> None:
        _own_threads(self._torch, self.threads)
        batch: _Batch | None = None
        while True:
            with self._cond:
                while not self._pending and not self._controls and not self._closed and batch is None:
                    self._cond.wait()
                if self._closed:
                    break
                controls = list(self._controls)
                self._controls.clear()
                jobs: list[_Job] = []
                if not controls:
                    if batch is None:
                        self._collect()
                    rows = batch.size if batch is not None else 0
                    open_to = batch is None or batch.joinable  # a cache that cannot take rows: static batches
                    while open_to and self._pending and rows + len(self._pending[0].sequences) <= self.max_batch:
                        job = self._pending.popleft()
                        rows += len(job.sequences)
                        jobs.append(job)
            for kind, fn, future in controls:  # between two forward passes: no pass sees an adapter half attached
                paused = time.perf_counter()
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
                finally:  # how long decoding stood still for an attach or a detach (stacking adapters included)
                    self.passes.append(Pass(kind, paused, time.perf_counter() - paused))
                    if self._mixer is not None:
                        self._mixer.take_built_s()
                        self._mixer.take_lora_s()
                    self._prefix_s = 0.0
            try:
                if jobs:
                    started = time.perf_counter()
                    batch = self._batch = self._join(batch, jobs)
                    self._traced("join", started, [s.adapter for job in jobs for s in job.sequences])
                if batch is not None:
                    self._peak = max(self._peak, batch.size)
                    started = time.perf_counter()
                    names, width = [r.name for r in batch.rows], batch.attention.shape[1] + 1
                    batch = self._batch = self._step(batch)
                    self._traced("step", started, names, width)
            except BaseException as exc:
                for job in {id(j): j for j in [*jobs, *(batch.jobs() if batch is not None else [])]}.values():
                    if not job.future.done():
                        job.future.set_exception(exc)
                batch = self._batch = None
            if batch is None and self._peak:
                with self._cond:
                    self._wanted = self._peak + self._rows()
                    self._ended = time.monotonic()
                    self._peak = 0
        if batch is not None:
            for job in batch.jobs():
                if not job.future.done():
                    job.future.set_exception(LMError("the engine was closed"))

    def _traced(self, kind: str, started: float, rows: list[str | None], width: int = 0) -> None:
        """Add a forward pass to the trace; `rows` name each row's adapter (its slot, or its adapter name), and
        a step's `width` is the positions its rows attended over (their KV cache, left-padded)."""
        names = set(rows)
        built = self._mixer.take_built_s() if self._mixer is not None else 0.0
        lora = self._mixer.take_lora_s() if self._mixer is not None else 0.0
        tokens, uncached = self._prefilled if kind == "join" else (0, 0)
        seconds = time.perf_counter() - started
        self.passes.append(
            Pass(kind, started, seconds, len(rows), len(names), built, lora, self._prefix_s, tokens, uncached, width)
        )
        self._prefix_s, self._prefilled = 0.0, (0, 0)

    def _collect(self) -> None:
        """Before a batch starts from idle: wait, at most the window, for as many rows as were wanted when the
        last batch ended (its peak and those that queued meanwhile). Under steady load the clients it answered
        come back together; a batch started on the first of them would run its first tokens for one row
        while the others queue. The window runs from the later of the oldest arrival and the end of the last
        batch. A lone caller is not kept waiting. Called with the lock held."""
        deadline = max(self._pending[0].arrived, self._ended) + self.window_s
        expect = min(self.max_batch, max(1, self._wanted))
        while self._rows() < expect and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)

    def _rows(self) -> int:
        return sum(len(job.sequences) for job in self._pending)

    def _join(self, batch: _Batch | None, jobs: list[_Job]) -> _Batch | None:
        """Prefill the jobs' prompts (one forward pass), draw their first tokens and merge the rows that go on
        into the running batch. A job naming an adapter that is not attached fails alone."""
        torch = self._torch
        joining: list[_Row] = []
        for job in jobs:
            names = {s.adapter for s in job.sequences if s.adapter is not None}
            unknown = sorted(names - self.adapters)
            if unknown:
                job.future.set_exception(LMError(f"adapter {unknown[0]} is not attached"))
                continue
            job.results = [None] * len(job.sequences)
            job.left = len(job.sequences)
            joining += [
                _Row(job, i, seq, torch, self._slot_of[seq.adapter] if seq.adapter else BASE_ADAPTER)
                for i, seq in enumerate(job.sequences)
            ]
        if not joining:
            return batch
        count = len(joining)
        names = [r.name for r in joining]
        prompts = [r.sequence.prompt_ids for r in joining]
        prefix = self._prefixes.shared(prompts)
        past = self._prefix_cache(prefix, names) if prefix else None
        cached = len(prefix) if past is not None else 0
        width = max(len(p) for p in prompts) - cached
        self._prefilled = (count * width, count * len(prefix) if prefix and past is None else 0)
        input_ids = torch.full((count, width), self.pad_id, dtype=torch.long)
        # The mask covers the cached prefix and the new tokens: a row's own padding sits between the two.
        attention = torch.zeros((count, cached + width), dtype=torch.long)
        attention[:, :cached] = 1
        for i, ids in enumerate(prompts):
            rest = ids[cached:]
            input_ids[i, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            attention[i, cached + width - len(rest) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, cached:]
        model, context, extra = self._model_for(names)
        with torch.inference_mode(), context:
            out = model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **({self._cache_key: past} if past is not None else {}),
                **extra,
            )
        self.prefix_tokens_reused += cached * count
        if self._prefix_ok is None:  # prefixes are reused only where rows can be stacked onto cached ones
            self._prefix_ok = _layers(out[self._cache_key]) is not None
        if self._prefix_ok:
            if prefix and past is None:  # keep the prefix's keys and values this full prefill computed
                self._keep_prefix(prefix, names, prompts, width, out[self._cache_key])
            self._prefixes.learn(prompts)
        self.batches += 1
        self.batched_rows += count
        fresh = _Batch(joining, out[self._cache_key], attention, torch.zeros(count, dtype=torch.long))
        fresh = self._advance(fresh, out.logits[:, -1, :])
        if fresh is None:
            return batch
        if batch is None:
            return fresh
        return batch.merge(fresh, torch)

    def _prefix_cache(self, prefix: tuple[int, ...], names: list[str]) -> Any:
        """A KV cache holding `prefix` for each row (rows of different adapters get their adapter's keys and
        values), from the prefix cache, or computed now by one pass over the prefix alone for an adapter
        several joining rows need it for; None when prefixes cannot be reused with this model or a lone row's
        adapter has no entry yet (the rows are then prefilled whole, and the entry cut from that pass)."""
        if not self._prefix_ok:
            return None
        torch = self._torch
        from transformers.cache_utils import DynamicCache  # noqa: PLC0415

        keys = [(name, self._generation(name), prefix) for name in names]
        missing = collections.Counter(key for key in keys if key not in self._prefix_kv)
        for key, rows in missing.items():
            if rows > 1:  # one pass over the prefix alone is cheaper than prefilling it in each of its rows
                self._compute_prefix(key)
        if any(key not in self._prefix_kv for key in keys):
            return None  # a lone row of an adapter without the entry: its whole prefill keeps it
        per_row = []
        for key in keys:
            self._prefix_kv.move_to_end(key)
            per_row.append(self._prefix_kv[key])
        stacked = [
            (torch.cat([row[i][0] for row in per_row]), torch.cat([row[i][1] for row in per_row]))
            for i in range(len(per_row[0]))
        ]
        return DynamicCache(ddp_cache_data=stacked)

    def _compute_prefix(self, key: tuple[str, int, tuple[int, ...]]) -> None:
        torch = self._torch
        name, _generation, prefix = key
        model, context, extra = self._model_for([name])
        started = time.perf_counter()
        with torch.inference_mode(), context:
            out = model(input_ids=torch.tensor([prefix], dtype=torch.long), use_cache=True, logits_to_keep=1, **extra)
        self._prefix_s += time.perf_counter() - started
        layers = _layers(out[self._cache_key])
        if layers is not None:
            self._store_prefix(key, [(layer.keys, layer.values) for layer in layers])

    def _store_prefix(self, key: tuple[str, int, tuple[int, ...]], layers: list[tuple[Any, Any]]) -> None:
        self._prefix_kv[key] = layers
        while len(self._prefix_kv) > PREFIX_ENTRIES:
            self._prefix_kv.popitem(last=False)

    def _keep_prefix(
        self, prefix: tuple[int, ...], names: list[str], prompts: list[list[int]], width: int, cache: Any
    ) -> None:
        """Cut each adapter's keys and values of `prefix` out of a whole prefill of left-padded prompts that
        all start with it (positions count from each prompt's first token, so they are the prefix's own)."""
        layers = _layers(cache)
        if layers is None:
            return
        size = len(prefix)
        for i, name in enumerate(names):
            key = (name, self._generation(name), prefix)
            if key in self._prefix_kv:
                continue
            start = width - len(prompts[i])
            self._store_prefix(
                key,
                [
                    (
                        layer.keys[i : i + 1, :, start : start + size].clone(),
                        layer.values[i : i + 1, :, start : start + size].clone(),
                    )
                    for layer in layers
                ],
            )

    def _generation(self, name: str) -> int:
        """How many adapters the slot has held: cached keys and values of an adapter die with its slot's turn."""
        slot = self._slots.get(name)
        return slot.generation if slot is not None else 0

    def _step(self, batch: _Batch) -> _Batch | None:
        """One forward pass for every row of the batch: its next token."""
        torch = self._torch
        attention = torch.cat([batch.attention, batch.attention.new_ones((batch.size, 1))], dim=1)
        positions = attention.sum(-1, keepdim=True) - 1
        model, context, extra = self._model_for([r.name for r in batch.rows])
        with torch.inference_mode(), context:
            out = model(
                input_ids=batch.tokens.unsqueeze(-1),
                attention_mask=attention,
                position_ids=positions,
                **{self._cache_key: batch.cache},
                use_cache=True,
                **extra,
            )
        batch.cache = out[self._cache_key]
        batch.attention = attention
        return self._advance(batch, out.logits[:, -1, :])

    def _advance(self, batch: _Batch, logits: Any) -> _Batch | None:
        """Choose each row's next token; rows that end leave the batch (their KV-cache rows are dropped) and a
        job whose rows have all ended gets its results. None when no row goes on."""
        torch = self._torch
        with torch.inference_mode():
            tokens, logprobs = self._choose(logits, [r.sequence for r in batch.rows], [r.generator for r in batch.rows])
        keep: list[int] = []
        for position, row in enumerate(batch.rows):
            if row.state.step(int(tokens[position]), float(logprobs[position]), self):
                row.finish()
            else:
                keep.append(position)
        if not keep:
            return None
        batch.tokens = tokens
        if len(keep) < batch.size:
            batch.select(keep, torch)
        return batch

    def _batched(self) -> _MixedLoRA:
        """The batched LoRA path, made when first needed (and again after new LoRA layers, see `_unmix`)."""
        if self._mixer is None:
            self._mixer = _MixedLoRA(self.peft, self._torch)
        return self._mixer

    def _model_for(self, names: list[str]) -> tuple[Any, Any, dict[str, Any]]:
        """The module to call for rows of these adapters, a context to call it in, and its extra arguments."""
        if self.peft is None or not self.adapters:
            return self.model, contextlib.nullcontext(), {}  # LoRA layers left by detached adapters do nothing
        distinct = set(names)
        mixer = self._batched()
        if distinct == {BASE_ADAPTER}:  # the base alone: LoRA layers switched off, no mixed path
            return self.peft, mixer.switched_off(), {}
        slots = tuple(sorted(distinct))
        generations = tuple(self._generation(name) for name in slots)
        if mixer.serves(slots):  # one adapter or several: the batched path, on PEFT's layers switched off
            return self.peft, mixer.mixed(slots, generations, names), {}
        if len(distinct) == 1:
            # One adapter for every row: PEFT's plain path (the active adapter), cheaper than its mixed-batch
            # path, which splits every LoRA layer's input by adapter.
            if self._active != names[0]:
                self.peft.set_adapter(names[0])
                self._active = names[0]
            return self.peft, contextlib.nullcontext(), {}
        return self.peft, contextlib.nullcontext(), {"adapter_names": names}

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


class _MixedLoRA:
    """Rows of different adapters in one forward pass: the base runs with PEFT's LoRA layers switched off,
    and a hook on each LoRA layer adds every row's delta, x·Aᵀ·Bᵀ·scaling, at once: the adapters' Aᵀ sit
    side by side in rank blocks, each row keeps its own adapter's block (a mask) and the blocks' scaled Bᵀ
    bring it back, four kernels per layer whatever the mix, as many as one adapter's plain path. PEFT's own
    mixed path splits every layer's input by adapter and runs its kernels per adapter per layer, a fifth
    slower per token here. Plain LoRA layers only (no DoRA or other variants, no LoRA bias); anything else
    keeps PEFT's path."""

    def __init__(self, peft: Any, torch: Any) -> None:
        from peft.tuners.lora.layer import Linear, LoraLayer  # noqa: PLC0415

        self.torch = torch
        named = [(n, m) for n, m in peft.base_model.model.named_modules() if isinstance(m, LoraLayer)]
        lora_layers = [m for _, m in named]
        self.layers = [m for m in lora_layers if type(m) is Linear]
        self.names = {id(m): n for n, m in named}  # the base model's names of its LoRA layers
        self.plain = len(self.layers) == len(lora_layers) and bool(self.layers)
        self.lora_layers = lora_layers
        self.disable = peft.disable_adapter
        # PEFT's own `disable_adapter()` first surveys the whole model (`get_model_status`): 12 ms a pass
        # here, a tenth of a decoding step. Its layers read one flag, which is set on them directly when
        # they have it.
        self.flagged = all(hasattr(m, "_disable_adapters") for m in lora_layers)
        self.rows: Any = None  # per row, a mask of its adapter's rank block, for the pass under way
        self.rank = 1
        self.single = False
        self.stacks: dict[int, tuple[Any, Any]] = {}  # id(layer) -> (Aᵀ blocks, scaled Bᵀ blocks)
        self.built: collections.OrderedDict[tuple[Any, ...], tuple[int, dict[int, tuple[Any, Any]]]] = (
            collections.OrderedDict()
        )
        self.served: dict[tuple[str, ...], bool] = {}
        self.built_s = 0.0  # time spent stacking adapters since the engine last took it (`take_built_s`)
        self.lora_s = 0.0  # time spent adding deltas (masks and hooks) since the engine last took it
        self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers] if self.plain else []

    def serves(self, slots: tuple[str, ...]) -> bool:
        if slots not in self.served:
            self.served[slots] = self.plain and not any(
                slot in layer.lora_variant or (slot in layer.lora_B and layer.lora_B[slot].bias is not None)
                for layer in self.layers
                for slot in slots
            )
        return self.served[slots]

    @contextlib.contextmanager
    def mixed(self, slots: tuple[str, ...], generations: tuple[int, ...], names: list[str]) -> Any:
        torch = self.torch
        key = (slots, generations)
        if key not in self.built:  # a few sets of adapters alternate (a swap: joins of the new, steps of both)
            building = time.perf_counter()
            self.offer(key, self.build(slots))
            self.built_s += time.perf_counter() - building
        self.built.move_to_end(key)
        self.rank, self.stacks = self.built[key]
        masking = time.perf_counter()
        # Each row keeps the columns of its own adapter's rank block and zeroes the others (one adapter: no mask).
        rows = torch.zeros((len(names), 1, len(slots) * self.rank))
        for i, name in enumerate(names):
            block = slots.index(name)
            rows[i, 0, block * self.rank : (block + 1) * self.rank] = 1.0
        self.rows = rows
        self.lora_s += time.perf_counter() - masking
        self.single = len(slots) == 1
        try:
            with self.switched_off():
                yield
        finally:
            self.rows = None

    def build(self, slots: tuple[str, ...]) -> tuple[int, dict[int, tuple[Any, Any]]]:
        """The slots' stacks for every LoRA layer, and the width of one rank block. It only reads the layers,
        so a new version's stacks are made beside decoding (`Engine._stack_beside`)."""
        rank = max(
            (layer.lora_A[s].weight.shape[0] for layer in self.layers for s in slots if s in layer.lora_A), default=1
        )
        return rank, {id(layer): _lora_stack(layer, slots, self.torch, rank) for layer in self.layers}

    def offer(self, key: tuple[Any, ...], built: tuple[int, dict[int, tuple[Any, Any]]]) -> None:
        """Keep stacks for a set of slots (and their generations), the few most recent sets only."""
        if key not in self.built:
            self.built[key] = built
            while len(self.built) > 4:
                self.built.popitem(last=False)

    def take_built_s(self) -> float:
        built, self.built_s = self.built_s, 0.0
        return built

    def take_lora_s(self) -> float:
        """The time spent adding deltas since the last call: what a pass of several adapters does more than a
        pass of one is all in it (a mask, and rank blocks side by side), the base's layers run alike."""
        spent, self.lora_s = self.lora_s, 0.0
        return spent

    @contextlib.contextmanager
    def switched_off(self) -> Any:
        """PEFT's LoRA layers off (each returns its base layer's output) for one pass."""
        if not self.flagged:
            with self.disable():
                yield
            return
        for layer in self.lora_layers:
            layer._disable_adapters = True  # the flag PEFT's `enable_adapters` sets
        try:
            yield
        finally:
            for layer in self.lora_layers:
                layer._disable_adapters = False

    def _hook(self, layer: Any, args: tuple[Any, ...], output: Any) -> Any:
        if self.rows is None:
            return None
        began = time.perf_counter()
        a, b = self.stacks[id(layer)]
        torch = self.torch
        low = torch.matmul(args[0], a)
        output = output + torch.matmul(low if self.single else low * self.rows, b)
        self.lora_s += time.perf_counter() - began
        return output

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class _Prefixes:
    """Prompt prefixes worth caching: the common prefixes (in whole blocks) of recent prompts, such as a
    task's system prompt and the chat template's opening of the user's turn."""

    def __init__(self, recent: int = 16, kept: int = 8) -> None:
        self.recent: collections.deque[tuple[int, ...]] = collections.deque(maxlen=recent)
        self.known: collections.OrderedDict[tuple[int, ...], None] = collections.OrderedDict()
        self.kept = kept

    def shared(self, prompts: list[list[int]]) -> tuple[int, ...]:
        """The longest known prefix that every prompt starts with and goes on after, or ()."""
        best: tuple[int, ...] = ()
        for prefix in self.known:
            size = len(prefix)
            if size > len(best) and all(len(p) > size and tuple(p[:size]) == prefix for p in prompts):
                best = prefix
        if best:
            self.known.move_to_end(best)
        return best

    def learn(self, prompts: list[list[int]]) -> None:
        """Remember the prompts, and the longest prefix each shares with a different recent one. A prompt
        repeated word for word (a retry, a benchmark's loop) does not make itself a prefix: what is cached is
        what different requests have in common."""
        for prompt in map(tuple, prompts):
            longest = 0
            for other in self.recent:
                if other != prompt:
                    longest = max(longest, _common(prompt, other))
            size = min(longest, len(prompt) - 1) // PREFIX_BLOCK * PREFIX_BLOCK
            if size >= PREFIX_MIN:
                self.known[prompt[:size]] = None
                self.known.move_to_end(prompt[:size])
                while len(self.known) > self.kept:
                    self.known.popitem(last=False)
            self.recent.append(prompt)


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    size = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        size += 1
    return size


class _Row:
    """One sequence in the running batch: its job, its own generator, what it has generated so far."""

    def __init__(self, job: _Job, index: int, sequence: Sequence, torch: Any, name: str) -> None:
        self.job = job
        self.index = index
        self.sequence = sequence
        self.name = name  # the PEFT adapter (slot) it runs on, or BASE_ADAPTER
        # 52 bits: a seed goes into JSON (the audit entry), whose safe integers end at 2**53.
        self.seed = sequence.seed if sequence.seed is not None else secrets.randbits(52)
        self.generator = torch.Generator().manual_seed(self.seed) if sequence.temperature > 0 else None
        self.state = _RowState(sequence)

    def finish(self) -> None:
        self.job.results[self.index] = self.state.result(self.seed)
        self.job.left -= 1
        if self.job.left == 0 and not self.job.future.done():
            self.job.future.set_result(list(self.job.results))  # type: ignore[arg-type] - every row has ended


class _Batch:
    """The rows decoding together: their KV cache, attention mask (left-padded) and next input tokens."""

    def __init__(self, rows: list[_Row], cache: Any, attention: Any, tokens: Any) -> None:
        self.rows = rows
        self.cache = cache
        self.attention = attention
        self.tokens = tokens
        self.joinable = _layers(cache) is not None

    @property
    def size(self) -> int:
        return len(self.rows)

    def jobs(self) -> list[_Job]:
        return list({id(r.job): r.job for r in self.rows}.values())

    def select(self, keep: list[int], torch: Any) -> None:
        """Keep these rows; drop the leading columns no row attends to any more."""
        selected = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(selected)
        self.attention = self.attention[selected]
        self.tokens = self.tokens[selected]
        self.rows = [self.rows[p] for p in keep]
        used = self.attention.any(0)
        if not bool(used[0]) and self.joinable:
            first = int(used.nonzero()[0])
            self.attention = self.attention[:, first:]
            for layer in _layers(self.cache) or []:
                layer.keys = layer.keys[:, :, first:, :]
                layer.values = layer.values[:, :, first:, :]

    def merge(self, other: _Batch, torch: Any) -> _Batch:
        """Rows that have just been prefilled join this batch: both left-padded to one length, then stacked."""
        length = max(self.attention.shape[1], other.attention.shape[1])
        mine, theirs = _layers(self.cache), _layers(other.cache)
        if mine is None or theirs is None or len(mine) != len(theirs):
            raise LMError("this model's KV cache cannot take rows that join a running batch")
        pads = (length - self.attention.shape[1], length - other.attention.shape[1])
        for a, b in zip(mine, theirs, strict=True):
            a.keys = torch.cat([_left_pad(a.keys, pads[0], torch), _left_pad(b.keys, pads[1], torch)], dim=0)
            a.values = torch.cat([_left_pad(a.values, pads[0], torch), _left_pad(b.values, pads[1], torch)], dim=0)
        self.attention = torch.cat(
            [
                torch.nn.functional.pad(self.attention, (pads[0], 0)),
                torch.nn.functional.pad(other.attention, (pads[1], 0)),
            ],
            dim=0,
        )
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.rows += other.rows
        return self


def _aside() -> None:
    """Make the calling thread one that works beside decoding: one intra-op thread, the lowest CPU priority.

    One thread: each thread that runs torch's parallel ops gets its own OpenMP team, and once libgomp manages
    more threads than there are cores it stops its idle workers spinning, so that every small kernel of the
    engine's passes then waits for a woken thread. A side prefill with torch's two threads left decoding a
    fifth slower for the rest of the process (SmolLM2-135M, 8 clients: 51-54 tokens/s before a rollout,
    41 after; the LoRA hooks of a step 2 ms before, 13 ms after)."""
    import torch  # noqa: PLC0415

    _own_threads(torch, 1)
    _lowest_priority()


def _own_threads(torch: Any, count: int) -> None:
    """Give the calling thread `count` intra-op threads for good. torch keeps one count per thread, which a
    thread takes from the process's default at its first parallel op, and `set_num_threads` sets both its own
    and that default: so the first op comes first here (a later one would take whatever default another
    thread left), then the count."""
    torch.get_num_threads()
    torch.set_num_threads(count)


def _lowest_priority() -> None:
    """Give the calling thread, and the threads it starts, the lowest CPU priority: on Linux a nice value and
    a scheduling policy belong to a thread, and new threads inherit them."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    # SCHED_IDLE on top: a decoding thread that wakes takes the core from it at once, where a nice-19 thread
    # may keep it for the rest of its time slice while decoding's OpenMP team waits at a parallel op. Passes
    # overlapping a side prefill ran 7-12 % slower at nice 19, -3 to +7 % under SCHED_IDLE (lm bench, rounds).
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _lora_stack(layer: Any, slots: tuple[str, ...], torch: Any, rank: int | None = None) -> tuple[Any, Any]:
    """A LoRA layer's adapters side by side: Aᵀ as (in, slots * rank) and scaled Bᵀ as (slots * rank, out),
    each adapter in its own rank block (zero-padded to `rank`, by default the largest of theirs; zeros for
    the base and for adapters that leave this layer alone)."""
    if rank is None:
        rank = max((layer.lora_A[s].weight.shape[0] for s in slots if s in layer.lora_A), default=1)
    a = torch.zeros((layer.in_features, len(slots) * rank))
    b = torch.zeros((len(slots) * rank, layer.out_features))
    for i, slot in enumerate(slots):
        if slot in layer.lora_A:
            weight_a, weight_b = layer.lora_A[slot].weight, layer.lora_B[slot].weight  # (r, in), (out, r)
            r = weight_a.shape[0]
            a[:, i * rank : i * rank + r] = weight_a.T
            b[i * rank : i * rank + r, :] = weight_b.T * layer.scaling[slot]
    return a, b


def _layers(cache: Any) -> list[Any] | None:
    """The cache's layers when every one is a plain growing layer (keys and values of shape batch, heads,
    length, dim) that rows can be selected from, trimmed and stacked; None for any other kind (sliding
    windows, quantised or static caches)."""
    from transformers.cache_utils import DynamicLayer  # noqa: PLC0415

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    return list(layers)


def _left_pad(tensor: Any, count: int, torch: Any) -> Any:
    return torch.nn.functional.pad(tensor, (0, 0, count, 0)) if count else tensor


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
