"""Benchmark figures for the agent's inference path (`agent/serve.py`): what app-key auth, OIP validation, the guard
decision and the durable audit append cost on top of serving the same ONNX model, the demo fraud scorer
(`sitewarden.fraud_model`, one row of 8 FP32 features per request).

Four ways of serving the same `model.onnx` on this machine:

1. bare: `agent.onnx_model.OnnxModel(path).infer` in this process, one row per call, one thread;
2. wrapper: the least a web service around that session does: FastAPI + uvicorn in its own process, configured as
   `sitewarden agent run` configures uvicorn (its defaults: uvloop, httptools, one process; plain HTTP on
   loopback), the model run in anyio's default thread pool (what FastAPI prescribes for a blocking call: a `def`
   endpoint, or `run_in_threadpool`); OIP v2 JSON in and out; no auth, no validation beyond decoding, no decision,
   no audit. The issue's targets are against this server;
2b. inline wrapper: the same, but the model run on the event loop, as the agent runs models this quick (it moves
   a model to the thread pool once its calls take a millisecond of CPU). On 2 cores the thread hop is about half
   the wrapper's cost per request, so this is the leanest way to serve the model over HTTP in Python; its ratio
   is printed without a target;
3. agent: a real `sitewarden agent run` process, enrolled at a real controller (`sitewarden controller serve`, TLS,
   SQLite), its release pushed and approved with the CLI and rolled out through the API, serving
   `POST /v2/models/<name>/infer` with an app key, purpose and data class, the bank policy pack's decision (its
   per-app rate limits lifted for the load; decisions memoised per identical input, see agent/guard.py), and the
   site audit log in its default durable mode (a response leaves once its entry is on disk).

The load generator is a process of its own (on 2 cores it would otherwise take the servers' CPU): asyncio on uvloop
with N keep-alive HTTP/1.1 connections, each sending pre-encoded requests back to back (closed loop) and reading
each response by its Content-Length; it spends a few tens of microseconds per request, so the server, not the
client, is the limit. Wrappers and agent get the same bytes: 512 one-row requests of seeded rows, in rotation, with
`purpose` and `data_class` in the OIP parameters and the app key header. The three servers run side by side and are
measured in alternating rounds (3, or 1 with `--quick`), each round a warm-up then a fixed-duration run at
concurrency 1 and then 32; each figure is from the round with the median throughput, so that a burst of other work
on the machine spoils at most one round. The agent's audit log must grow by exactly the number of inference
requests it answered. Last, with the servers stopped, `InferenceService.handle` (the agent's request core, minus
HTTP) runs in this process on the agent's data dir with each step timed, next to the wrapper's request core: where
the agent's extra time goes.

It prints a table with the targets marked PASS or MISS and ends with one JSON line of the figures. Run it from the
repository root with `.venv/bin/python bench/inference_bench.py [--quick]`; `--quick` uses one round of 3 s runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import _common
import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from rich.console import Console
from rich.table import Table
from starlette.concurrency import run_in_threadpool

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `tests` is not installed; it holds the controller and agent launchers
from agent import config as site_config  # noqa: E402
from agent import oip  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from agent.identity import DataDir  # noqa: E402
from agent.onnx_model import OnnxModel  # noqa: E402
from agent.serve import DATA_CLASS_HEADER, PURPOSE_HEADER, Call, InferenceService  # noqa: E402
from sitewarden import approval  # noqa: E402
from sitewarden.fraud_model import build_release, sample_features  # noqa: E402
from tests.agent_harness import BANK_PACK, POLICY, AgentProcess, enroll_agent, push_policy, wait_for  # noqa: E402
from tests.controller_server import free_port, sitewarden, start_controller  # noqa: E402
from tests.tls import make_pki  # noqa: E402

DEFAULT_WORKDIR = REPO / "bench" / ".tmp"
MODEL = "fraud-scorer"
VERSION = "1.0.0"
APP = "fraud-app"  # the app `enroll_agent` creates a key for
LABELS = {"fleet": "inference-bench"}
SEED = 20250601
REQUESTS = 512  # distinct pre-encoded requests, sent in rotation
CHECK_EVERY = 64  # every so many responses per connection, the body is parsed and checked
LOADGEN_DEADLINE_S = 600
BUSY_LOAD = 0.5

TARGET_RATIO_32 = 0.7
TARGET_P50_EXTRA_MS = 1.0

stderr = Console(stderr=True, log_path=False)


@dataclass(frozen=True)
class Workload:
    warmup_s: float
    run_s: float
    rounds: int
    in_process_calls: int
    concurrency: tuple[int, ...] = (1, 32)


FULL = Workload(warmup_s=2.0, run_s=10.0, rounds=3, in_process_calls=20_000)
QUICK = Workload(warmup_s=1.0, run_s=3.0, rounds=1, in_process_calls=4_000)


@dataclass(frozen=True)
class Run:
    """One server at one concurrency in one round: the requests completed in the fixed-duration window."""

    server: str
    concurrency: int
    seconds: float
    latency_ms: list[float]
    statuses: dict[str, int]
    answered: int  # every response: warm-up and the requests in flight at the end included
    bad_bodies: int  # sampled 200 bodies that were not a well-formed answer
    server_cpu: float  # share of one core in the window
    loadgen_cpu: float
    others_cpu: float  # share of one core that every other process on the machine used in the window (noise)

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")

    @property
    def p50(self) -> float:
        return percentile(self.latency_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latency_ms, 99)

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu * self.seconds * 1000 / self.ok if self.ok else math.nan


@dataclass(frozen=True)
class Series:
    """The rounds of one server at one concurrency; figures are the median-throughput round's."""

    rounds: list[Run]

    @property
    def median(self) -> Run:
        return sorted(self.rounds, key=lambda r: r.rps)[(len(self.rounds) - 1) // 2]

    @property
    def answered(self) -> int:
        return sum(r.answered for r in self.rounds)

    @property
    def rps_range(self) -> str:
        rates = [r.rps for r in self.rounds]
        return f"{min(rates):,.0f}–{max(rates):,.0f}" if len(rates) > 1 else ""


@dataclass(frozen=True)
class Timed:
    """Per-call durations (µs) of the steps of a request core run in this process, one call at a time."""

    total_us: list[float]
    steps_us: dict[str, list[float]]

    def p50(self, step: str | None = None) -> float:
        return statistics.median(self.total_us if step is None else self.steps_us[step])

    def mean(self, step: str | None = None) -> float:
        values = self.total_us if step is None else self.steps_us[step]
        return sum(values) / len(self.total_us)  # per request, also for steps run twice a request


@dataclass(frozen=True)
class Bare:
    calls: int
    seconds: float
    latency_ms: list[float]

    @property
    def p50(self) -> float:
        return percentile(self.latency_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latency_ms, 99)


@dataclass(frozen=True)
class Figures:
    workload: Workload
    bare: Bare
    wrapper: dict[int, Series]
    inline: dict[int, Series]
    agent: dict[int, Series]
    audit_added: int
    agent_handle: Timed
    wrapper_handle: Timed
    setup_s: float
    load_before: float

    @property
    def ratio_32(self) -> float:
        wrapper = self.wrapper[32].median.rps
        return self.agent[32].median.rps / wrapper if wrapper else math.nan

    @property
    def inline_ratio_32(self) -> float:
        inline = self.inline[32].median.rps
        return self.agent[32].median.rps / inline if inline else math.nan

    @property
    def p50_extra_ms(self) -> float:
        return self.agent[1].median.p50 - self.wrapper[1].median.p50

    @property
    def agent_answered(self) -> int:
        return sum(s.answered for s in self.agent.values())

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bare_p50_ms": round(self.bare.p50, 4),
            "bare_p99_ms": round(self.bare.p99, 4),
            "bare_calls_per_s": round(self.bare.calls / self.bare.seconds, 1),
            "wrapper_p50_ms": round(self.wrapper[1].median.p50, 3),
            "agent_p50_ms": round(self.agent[1].median.p50, 3),
            "agent_p50_extra_ms": round(self.p50_extra_ms, 3),
        }
        for label, series in (("wrapper", self.wrapper), ("inline_wrapper", self.inline), ("agent", self.agent)):
            for c, s in series.items():
                run = s.median
                out[f"{label}_rps_{c}"] = round(run.rps, 1)
                out[f"{label}_rps_{c}_rounds"] = [round(r.rps, 1) for r in s.rounds]
                out[f"{label}_p50_ms_{c}"] = round(run.p50, 3)
                out[f"{label}_p99_ms_{c}"] = round(run.p99, 3)
                out[f"{label}_cpu_ms_per_request_{c}"] = round(run.cpu_ms_per_request, 3)
                out[f"{label}_failed_{c}"] = sum(r.failed + r.bad_bodies for r in s.rounds)
                out[f"{label}_others_cpu_{c}"] = round(run.others_cpu, 2)
        out |= {
            "agent_ratio_32": round(self.ratio_32, 3),
            "agent_ratio_inline_32": round(self.inline_ratio_32, 3),
            "agent_audit_entries_added": self.audit_added,
            "agent_requests_answered": self.agent_answered,
            "wrapper_handle_p50_us": round(self.wrapper_handle.p50(), 1),
            "agent_handle_p50_us": round(self.agent_handle.p50(), 1),
            "agent_handle_mean_us": round(self.agent_handle.mean(), 1),
            "agent_handle_steps_mean_us": {k: round(self.agent_handle.mean(k), 1) for k in self.agent_handle.steps_us},
            "run_s": self.workload.run_s,
            "warmup_s": self.workload.warmup_s,
            "rounds": self.workload.rounds,
            "cores": os.cpu_count(),
            "loadavg_before": round(self.load_before, 2),
        }
        return out


# -- helpers -----------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN of nothing."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process (all its threads) so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_seconds() -> float:
    """CPU seconds all processes have used so far (all cores), from /proc/stat: everything but idle and iowait."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def request_bodies(count: int) -> list[bytes]:
    """`count` one-row OIP v2 inference requests of seeded transactions, purpose and data class in parameters."""
    rows = sample_features(count, seed=SEED)
    return [
        json.dumps(
            {
                "id": f"bench-{i}",
                "inputs": [{"name": "features", "shape": [1, 8], "datatype": "FP32", "data": row.tolist()}],
                "parameters": {"purpose": "fraud", "data_class": "confidential"},
            },
            separators=(",", ":"),
        ).encode()
        for i, row in enumerate(rows)
    ]


def http_requests(port: int, app_key: str, bodies: list[bytes]) -> list[bytes]:
    """Whole HTTP/1.1 requests (keep-alive), byte for byte the same for the wrapper and the agent but the port."""
    head = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {app_key}\r\nContent-Type: application/json\r\n"
    )
    return [f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body for body in bodies]


# -- (a) bare ONNX Runtime -----------------------------------------------------------------------------------------


def measure_bare(model_path: Path, workload: Workload) -> Bare:
    """`OnnxModel.infer` on one row at a time in this thread: warm-up, then `run_s` seconds of back-to-back calls."""
    model = OnnxModel(model_path)
    rows = [{"features": row.reshape(1, 8)} for row in sample_features(REQUESTS, seed=SEED)]
    clock = time.perf_counter
    end = clock() + workload.warmup_s
    i = 0
    while clock() < end:
        model.infer(rows[i % REQUESTS])
        i += 1
    latencies: list[float] = []
    start = clock()
    end = start + workload.run_s
    i = 0
    while True:
        sent = clock()
        if sent >= end:
            break
        model.infer(rows[i % REQUESTS])
        latencies.append((clock() - sent) * 1000)
        i += 1
    return Bare(len(latencies), clock() - start, latencies)


# -- (b) the minimal wrapper ---------------------------------------------------------------------------------------

_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.float64): "FP64"}


class WrapperService:
    """The wrapper's request core: OIP v2 JSON in, the same session, OIP v2 JSON out; nothing else."""

    def __init__(self, model_path: Path) -> None:
        self.model = OnnxModel(model_path)

    def handle(self, name: str, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            request = json.loads(body)
            inputs = {t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"]) for t in request["inputs"]}
        except (ValueError, KeyError, TypeError) as exc:
            return 400, {"error": f"bad request: {exc}"}
        results = self.model.infer(inputs)
        outputs = [
            {"name": n, "shape": list(a.shape), "datatype": _DATATYPES[a.dtype], "data": a.ravel().tolist()}
            for n, a in results.items()
        ]
        answer: dict[str, Any] = {"model_name": name, "model_version": VERSION, "outputs": outputs}
        if "id" in request:
            answer["id"] = request["id"]
        if "parameters" in request:
            answer["parameters"] = request["parameters"]
        return 200, answer


def wrapper_app(model_path: Path, inline: bool) -> FastAPI:
    """FastAPI around `WrapperService`: in the thread pool (FastAPI's way for a blocking call), or `inline` on the
    event loop (as the agent runs models this quick)."""
    service = WrapperService(model_path)
    app = FastAPI()

    @app.get("/v2/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> JSONResponse:
        body = await request.body()
        if inline:
            status, answer = service.handle(name, body)
        else:
            status, answer = await run_in_threadpool(service.handle, name, body)
        return JSONResponse(answer, status_code=status)

    return app


def serve_wrapper(model_path: Path, port: int, inline: bool) -> None:
    """The wrapper process: uvicorn configured as `sitewarden agent run` configures it (plain HTTP on loopback)."""
    import uvicorn  # noqa: PLC0415

    config = uvicorn.Config(
        wrapper_app(model_path, inline),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()


@contextlib.contextmanager
def wrapper_server(model_path: Path, inline: bool) -> Iterator[tuple[int, int]]:
    """Start the wrapper in its own process; yields (port, pid); stopped on exit."""
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=serve_wrapper, args=(model_path, port, inline), name="inference-wrapper"
    )
    process.start()
    try:

        def live() -> bool:
            if not process.is_alive():
                raise RuntimeError(f"the wrapper exited with {process.exitcode}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(live, 60, "the wrapper to start")
        assert process.pid is not None
        yield port, process.pid
    finally:
        process.terminate()
        process.join(timeout=20)
        if process.is_alive():
            process.kill()
            process.join()


# -- (c) the agent --------------------------------------------------------------------------------------------------


def load_test_pack(run_dir: Path, source: Path = BANK_PACK) -> Path:
    """The bank pack with its per-app rate limits lifted: one app sending thousands of requests a second is
    what a load test does and what the pack rightly refuses (429). The rules, and their cost, are unchanged;
    the pack's unit tests, which pin the shipped limits, are left out."""
    directory = run_dir / "bank-pack-load-test"
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("*_test.rego"))
    data = json.loads((directory / "data.json").read_text())
    for limits in data["sitewarden"]["bank"]["data_class_obligations"].values():
        limits["rate_limit"] = 1_000_000_000
    (directory / "data.json").write_text(json.dumps(data))
    return directory


@contextlib.contextmanager
def agent_world(
    run_dir: Path, release_dir: Path, card: Path, policy: Path | None = None, name: str = "bench-site"
) -> Iterator[AgentProcess]:
    """A controller, the release and a policy bundle (by default the bank pack, rate limits lifted) pushed,
    approved and rolled out, one agent serving them; all stopped on exit."""
    run_dir = run_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    policy = policy or load_test_pack(run_dir)
    pki = make_pki(run_dir / "pki")
    stderr.log("starting a controller (TLS, SQLite)")
    controller = start_controller(run_dir, pki)
    agent: AgentProcess | None = None
    try:
        keys = run_dir / "approvers"
        approval.generate_approver_key(keys / "alice.pem", keys / "alice.pub.pem")
        check(
            sitewarden(
                "approver", "add", "alice", "--public-key", str(keys / "alice.pub.pem"), env=controller.cli_env()
            )
        )
        operator = controller.token("operator", "bench-operator")
        stderr.log(f"pushing and approving {MODEL} {VERSION}")
        push = ["release", "push", str(release_dir), "--name", MODEL, "--version", VERSION, "--metadata", str(card)]
        check(sitewarden(*push, env=controller.cli_env(operator)))
        approve = ["release", "approve", MODEL, VERSION, "--key", str(keys / "alice.pem")]
        approver = controller.token("approver", "alice")
        check(sitewarden(*approve, env=controller.cli_env(approver)))
        stderr.log(f"pushing and approving the policy bundle {policy.name} as {POLICY} 1.0.0")
        push_policy(controller, policy, "1.0.0", operator=operator, approver=approver, approver_key=keys / "alice.pem")
        stderr.log("enrolling and starting an agent")
        agent = enroll_agent(controller, run_dir, name, LABELS, {"alice": keys / "alice.pub.pem"})
        # The site's configuration as an operator writes it: the audit log in its default (durable) mode.
        agent.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{agent.port}"\n\n[controller]\nca_cert = "{pki.ca_cert}"\n\n'
            f'[approvers]\nalice = "{keys / "alice.pub.pem"}"\n\n'
            f'[apps.{APP}]\npurposes = ["fraud"]\ndata_classes = ["confidential"]\n'
        )
        agent.start()
        body = {
            "name": "bench",
            "releases": [{"name": MODEL, "version": VERSION}],
            "policy": {"name": POLICY, "version": "1.0.0"},
            "selector": LABELS,
        }
        with controller.client(operator) as client:
            client.post("/api/v1/rollouts", body)
        serving = agent
        wait_for(lambda: serving.active() == (MODEL, VERSION), what=f"the agent to serve {MODEL} {VERSION}")
        yield agent
        if "Traceback" in agent.log():
            stderr.print(f"[yellow]the agent logged errors:[/]\n{agent.log()[-4000:]}", markup=False)
    except BaseException:
        if agent is not None:
            stderr.print(f"agent log (last lines):\n{agent.log()[-4000:]}", markup=False)
        raise
    finally:
        if agent is not None:
            agent.stop()
        controller.stop()


def check(done: Any) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(done.args[3:6])} failed: {done.stderr or done.stdout}")


# -- the request cores in this process -----------------------------------------------------------------------------


@contextlib.contextmanager
def timed_steps(targets: dict[str, tuple[Any, str]]) -> Iterator[dict[str, list[float]]]:
    """Wrap `getattr(obj, name)` for each step with a timer (µs per call) for the duration; restored on exit."""
    steps: dict[str, list[float]] = {label: [] for label in targets}
    clock = time.perf_counter

    def timer(function: Callable[..., Any], durations: list[float]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return function(*args, **kwargs)
            finally:
                durations.append((clock() - started) * 1e6)

        return timed

    originals = []
    try:
        for label, (obj, name) in targets.items():
            original = getattr(obj, name)
            originals.append((obj, name, original, name in vars(obj)))
            setattr(obj, name, timer(original, steps[label]))
        yield steps
    finally:
        for obj, name, original, own in reversed(originals):
            if own:
                setattr(obj, name, original)
            else:
                delattr(obj, name)  # the wrapper shadowed a method of the class


def time_calls(call: Callable[[int], None], calls: int, steps: dict[str, list[float]]) -> Timed:
    clock = time.perf_counter
    for i in range(min(1000, calls)):
        call(i)
    for durations in steps.values():
        durations.clear()
    total = []
    for i in range(calls):
        started = clock()
        call(i)
        total.append((clock() - started) * 1e6)
    return Timed(total, {k: list(v) for k, v in steps.items()})


def agent_core(agent_process: AgentProcess, bodies: list[bytes], calls: int) -> Timed:
    """`InferenceService.handle` on the stopped agent's data dir, one call at a time, each step timed."""
    agent = Agent(DataDir(agent_process.data), site_config.load(agent_process.config))
    loop = asyncio.new_event_loop()
    try:
        release = agent.syncer.start()
        if release is None or (release.name, release.version) != (MODEL, VERSION):
            raise RuntimeError(f"the agent's data dir does not hold {MODEL} {VERSION} active")
        service = InferenceService(agent)
        headers = {PURPOSE_HEADER: "", DATA_CLASS_HEADER: ""}
        # Instance attributes shadow the methods for the duration (and are deleted afterwards).
        targets = {
            "HMAC digests (input, output)": (agent.audit, "digest"),
            "oip.parse_request (pydantic)": (oip, "parse_request"),
            "oip.decode_inputs": (oip, "decode_inputs"),
            "policy decision (memoised)": (agent.guard, "remembered"),
            "OnnxModel.infer": (release.model, "infer"),
            "oip.encode_outputs": (oip, "encode_outputs"),
            "audit entry: RFC 8785 JSON": (agent.audit, "entry"),
            "audit append: O_DSYNC write": (agent.audit.log, "append_many"),
        }

        def call(i: int) -> None:
            reply = loop.run_until_complete(service.handle(Call(MODEL, None, bodies[i % len(bodies)], APP, headers)))
            if reply.status != 200:
                raise RuntimeError(f"InferenceService.handle answered {reply.status}")

        with timed_steps(targets) as steps:
            return time_calls(call, calls, steps)
    finally:
        agent.audit.close()
        loop.close()


def wrapper_core(model_path: Path, bodies: list[bytes], calls: int) -> Timed:
    service = WrapperService(model_path)
    with timed_steps({"OnnxModel.infer": (service.model, "infer")}) as steps:
        return time_calls(lambda i: service.handle(MODEL, bodies[i % len(bodies)]), calls, steps)


# -- the load generator --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    port: int
    requests: list[bytes]
    concurrency: tuple[int, ...]
    warmup_s: float
    run_s: float
    audited: bool  # the server answers `parameters.audit_index` (the agent)


def generate_load(plan: LoadPlan, conn: Connection) -> None:
    """The load generator process: one phase per concurrency; marks each window's start and end, then the results."""
    import uvloop  # noqa: PLC0415

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = [runner.run(_phase(plan, c, conn)) for c in plan.concurrency]
        conn.send(("done", results))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        conn.close()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """Send one request on a keep-alive connection; (status, body) of its response, read by Content-Length."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    if length is None:
        raise RuntimeError(f"a response without Content-Length: {head[:200]!r}")
    return status, await reader.readexactly(length)


def _well_formed(body: bytes, audited: bool) -> bool:
    try:
        answer = json.loads(body)
        names = [o["name"] for o in answer["outputs"]]
        cited = isinstance(answer["parameters"].get("audit_index"), int)
    except (ValueError, KeyError, TypeError):
        return False
    return names == ["label", "probabilities"] and answer["model_version"] == VERSION and (cited or not audited)


async def _phase(plan: LoadPlan, concurrency: int, conn: Connection) -> dict[str, Any]:
    clock = time.perf_counter
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    answered = 0
    bad = 0
    start = clock() + plan.warmup_s
    end = start + plan.run_s
    n = len(plan.requests)
    cpu = [0.0, 0.0]

    async def worker(index: int) -> None:
        nonlocal answered, bad
        reader, writer = await asyncio.open_connection("127.0.0.1", plan.port)
        try:
            k = index
            sent_here = 0
            while (sent := clock()) < end:
                status, body = await _exchange(reader, writer, plan.requests[k % n])
                done = clock()
                answered += 1
                if status == 200 and sent_here % CHECK_EVERY == 0 and not _well_formed(body, plan.audited):
                    bad += 1
                sent_here += 1
                if start <= done < end:
                    statuses[str(status)] += 1
                    if status == 200 and sent >= start:
                        latencies.append((done - sent) * 1000)
                k += concurrency
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def marks() -> None:
        await asyncio.sleep(max(0.0, start - clock()))
        cpu[0] = own_cpu_seconds()
        conn.send(("start", concurrency))
        await asyncio.sleep(max(0.0, end - clock()))
        cpu[1] = own_cpu_seconds()
        conn.send(("stop", concurrency))

    await asyncio.gather(marks(), *(worker(i) for i in range(concurrency)))
    return {
        "concurrency": concurrency,
        "latency_ms": latencies,
        "statuses": dict(statuses),
        "answered": answered,
        "bad_bodies": bad,
        "loadgen_cpu": (cpu[1] - cpu[0]) / plan.run_s,
    }


def run_load(plan: LoadPlan, server_pid: int, label: str) -> dict[int, Run]:
    """Run the load generator process against one server; one `Run` per concurrency."""
    spawn = multiprocessing.get_context("spawn")
    receiver, sender = spawn.Pipe(duplex=False)
    process = spawn.Process(target=generate_load, args=(plan, sender), name=f"loadgen-{label}")
    process.start()
    sender.close()
    marks: dict[tuple[str, int], tuple[float, float, float]] = {}  # (server CPU, all CPU, this process's CPU)
    results: list[dict[str, Any]] | None = None
    deadline = time.monotonic() + LOADGEN_DEADLINE_S
    try:
        while results is None:
            if not receiver.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"the load generator for {label} did not finish within {LOADGEN_DEADLINE_S} s")
            kind, value = receiver.recv()
            if kind in ("start", "stop"):
                marks[(kind, value)] = (cpu_seconds(server_pid), system_busy_seconds(), own_cpu_seconds())
            elif kind == "error":
                raise RuntimeError(f"the load generator for {label} failed: {value}")
            else:
                results = value
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
        receiver.close()
    runs = {}
    for r in results:
        c = r["concurrency"]
        server, busy, own = (b - a for a, b in zip(marks[("start", c)], marks[("stop", c)], strict=True))
        others = busy - server - own - r["loadgen_cpu"] * plan.run_s
        runs[c] = Run(
            label,
            c,
            plan.run_s,
            latency_ms=r["latency_ms"],
            statuses=r["statuses"],
            answered=r["answered"],
            bad_bodies=r["bad_bodies"],
            server_cpu=server / plan.run_s,
            loadgen_cpu=r["loadgen_cpu"],
            others_cpu=max(0.0, others / plan.run_s),
        )
        stderr.log(
            f"  {label}, {c} connection(s): {runs[c].rps:,.0f} req/s, p50 {runs[c].p50:.2f} ms, "
            f"p99 {runs[c].p99:.2f} ms, statuses {r['statuses']}, other processes {runs[c].others_cpu:.0%} of a core"
        )
    return runs


# -- running -----------------------------------------------------------------------------------------------------


def measure(run_dir: Path, workload: Workload) -> Figures:
    load_before = os.getloadavg()[0]
    if load_before > BUSY_LOAD:
        stderr.log(f"[yellow]the machine is busy (load average {load_before:.2f}): figures will be low[/]")
    stderr.log("training the fraud model (seeded) and writing its release directory")
    release_dir = run_dir / f"release-{VERSION}"
    card = build_release(release_dir, seed=7, version_note=VERSION)
    model_path = release_dir / "model.onnx"
    bodies = request_bodies(REQUESTS)

    stderr.log(f"bare ONNX Runtime: one row per call, {workload.run_s:g} s")
    bare = measure_bare(model_path, workload)
    stderr.log(f"  p50 {bare.p50 * 1000:.1f} µs, {bare.calls / bare.seconds:,.0f} calls/s")

    started = time.monotonic()
    runs: dict[str, dict[int, list[Run]]] = {"wrapper": {}, "inline wrapper": {}, "agent": {}}
    with (
        agent_world(run_dir, release_dir, card) as agent,
        wrapper_server(model_path, inline=False) as (wrapper_port, wrapper_pid),
        wrapper_server(model_path, inline=True) as (inline_port, inline_pid),
    ):
        setup_s = time.monotonic() - started
        assert agent.process is not None
        plans = {
            "wrapper": (wrapper_port, "none", wrapper_pid, False),
            "inline wrapper": (inline_port, "none", inline_pid, False),
            "agent": (agent.port, agent.app_key, agent.process.pid, True),
        }
        before = agent.status()["audit"]["size"]
        for number in range(1, workload.rounds + 1):
            for label, (port, key, pid, audited) in plans.items():
                stderr.log(f"round {number} of {workload.rounds}: {label}")
                requests = http_requests(port, key, bodies)
                plan = LoadPlan(port, requests, workload.concurrency, workload.warmup_s, workload.run_s, audited)
                for c, run in run_load(plan, pid, label).items():
                    runs[label].setdefault(c, []).append(run)
        added = agent.status()["audit"]["size"] - before
    stderr.log(f"request cores in this process: {workload.in_process_calls:,} calls each")
    agent_handle = agent_core(agent, bodies, workload.in_process_calls)
    wrapper_handle = wrapper_core(model_path, bodies, workload.in_process_calls)
    return Figures(
        workload,
        bare,
        {c: Series(r) for c, r in runs["wrapper"].items()},
        {c: Series(r) for c, r in runs["inline wrapper"].items()},
        {c: Series(r) for c, r in runs["agent"].items()},
        added,
        agent_handle,
        wrapper_handle,
        setup_s,
        load_before,
    )


def status_mark(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def render(figures: Figures) -> Table:
    w = figures.workload
    table = Table(
        title=f"Sitewarden agent inference vs the same ONNX model bare and in a minimal FastAPI wrapper "
        f"({os.cpu_count()} cores, load average {figures.load_before:.2f} at start)"
    )
    table.add_column("Measure")
    for column in ("p50", "p99", "req/s", "req/s, rounds", "server CPU", "others' CPU"):
        table.add_column(column, justify="right")
    table.add_column("Target", justify="right")
    table.add_column("", justify="center")
    b = figures.bare
    table.add_row(
        "bare OnnxModel.infer, 1 row, 1 thread",
        f"{b.p50 * 1000:.1f} µs",
        f"{b.p99 * 1000:.1f} µs",
        f"{b.calls / b.seconds:,.0f}",
    )
    servers = (
        ("wrapper (FastAPI, model in thread pool; no auth/decision/audit)", figures.wrapper),
        ("inline wrapper (model on the event loop)", figures.inline),
        ("agent", figures.agent),
    )
    for label, series in servers:
        table.add_section()
        for c, s in series.items():
            r = s.median
            target, mark = "", ""
            if label == "agent" and c == 1:
                target = f"p50 ≤ wrapper + {TARGET_P50_EXTRA_MS:g} ms"
                mark = status_mark(figures.p50_extra_ms <= TARGET_P50_EXTRA_MS)
            table.add_row(
                f"{label}, {c} connection{'s' if c > 1 else ''}",
                f"{r.p50:.2f} ms",
                f"{r.p99:.2f} ms",
                f"{r.rps:,.0f}",
                s.rps_range,
                f"{r.server_cpu:.0%}, {r.cpu_ms_per_request:.2f} ms/req",
                f"{r.others_cpu:.0%}",
                target,
                mark,
            )
            failed = sum(x.failed for x in s.rounds)
            bad = sum(x.bad_bodies for x in s.rounds)
            if failed or bad:
                table.add_row(f"  [red]answers other than 200 / malformed sampled bodies: {failed} / {bad}[/]")
    table.add_section()
    table.add_row(
        "agent / wrapper throughput, 32 connections",
        "",
        "",
        f"{figures.ratio_32:.2f}x",
        "",
        "",
        "",
        f"≥ {TARGET_RATIO_32:g}x",
        status_mark(figures.ratio_32 >= TARGET_RATIO_32),
    )
    table.add_row(
        "agent / inline wrapper throughput, 32 connections (no target)", "", "", f"{figures.inline_ratio_32:.2f}x"
    )
    table.add_row("agent p50 − wrapper p50, 1 connection", f"{figures.p50_extra_ms:+.2f} ms")
    table.add_row(
        "audit entries added / inference requests answered",
        f"{figures.audit_added:,}",
        f"{figures.agent_answered:,}",
        "",
        "",
        "",
        "",
        "equal",
        status_mark(figures.audit_added == figures.agent_answered),
    )
    every = (*figures.wrapper.values(), *figures.inline.values(), *figures.agent.values())
    loadgen = max(r.loadgen_cpu for s in every for r in s.rounds)
    table.caption = (
        f"{w.rounds} alternating round(s) of {w.warmup_s:g} s warm-up + {w.run_s:g} s per server and concurrency; "
        "each row is the round with the median req/s. One-row OIP v2 JSON requests over keep-alive HTTP/1.1 on "
        f"loopback from one load generator process (uvloop, closed loop; at most {loadgen:.0%} of a core). "
        "Server CPU: share of one core in the window, and per request; others' CPU: what every other process on "
        "the machine used meanwhile (noise). Agent: app key, guard, durable audit append. "
        f"Setup (controller, push, approve, enroll, rollout, wrapper): {figures.setup_s:.1f} s."
    )
    return table


def render_core(figures: Figures) -> Table:
    """Where the agent's extra time goes: its request core step by step, in this process, next to the wrapper's."""
    a, wr = figures.agent_handle, figures.wrapper_handle
    table = Table(title="Request cores in process, one call at a time (no HTTP, no thread pool)")
    table.add_column("Step")
    table.add_column("p50", justify="right")
    table.add_column("mean per request", justify="right")
    table.add_row("wrapper: WrapperService.handle()", f"{wr.p50():.0f} µs", f"{wr.mean():.0f} µs")
    table.add_section()
    table.add_row("agent: InferenceService.handle()", f"{a.p50():.0f} µs", f"{a.mean():.0f} µs")
    for step in a.steps_us:
        table.add_row(f"  {step}", f"{a.p50(step):.0f} µs", f"{a.mean(step):.0f} µs")
    rest = a.mean() - sum(a.mean(step) for step in a.steps_us)
    table.add_row("  the rest (event, response model, output bytes)", "", f"{rest:.0f} µs")
    table.add_section()
    outside_agent = figures.agent[1].median.p50 * 1000 - a.p50()
    outside_wrapper = figures.wrapper[1].median.p50 * 1000 - wr.p50()
    for name, outside in (
        ("outside the core, 1 connection (HTTP p50 − core p50): wrapper", outside_wrapper),
        ("  agent (app key, body, metrics, thread pool, HTTP)", outside_agent),
    ):
        # A negative difference means the core ran under more outside load than the HTTP runs did.
        table.add_row(name, f"{outside:.0f} µs" if outside > 0 else "n/a (other load)")
    table.caption = (
        "Each step is timed by a wrapper around its call. Every agent call ends with a blocking O_DSYNC write, so "
        "the next one starts on cold caches: OnnxModel.infer, for one, takes about 3x its bare time here."
    )
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return _common.parse_args(
        __doc__,
        argv,
        quick="one round of 1 s warm-up + 3 s runs",
        workdir_help="directory for the controller's and the agent's data dirs",
        default=DEFAULT_WORKDIR,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workload = QUICK if args.quick else FULL
    with _common.scratch_dir(args.workdir, "inference-bench-") as run_dir:
        figures = measure(run_dir, workload)
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # rich assumes 80 columns when piped; the table needs more
    console.print(render(figures))
    console.print(render_core(figures))
    print(json.dumps(figures.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
