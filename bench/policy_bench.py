"""Benchmark figures for policy decisions (`policies/engine.py`, `agent/guard.py`): what the bank pack costs.

1. In process: the `sitewarden/inference` decision of the default bank pack (`policies/packs/bank`), compiled once,
   evaluated with regopy for the demo model's card and a fraud/confidential request, one call at a time, next to a
   no-op bundle (`decision := {"allow": true, "reasons": [], "obligations": {}}`) on the same input; and the
   agent's per-request path, `PolicyGuard.inference`, which memoises a decision per identical input (decisions are
   functions of input and data), so only the first request of each (app, purpose, data class, model, batch, inputs)
   pays the evaluation.
2. Over HTTP: two real agents (each with its controller, as `bench/inference_bench.py` sets them up), one running the
   bank pack (its per-app rate limits lifted: the load comes from one app), one the no-op bundle (whose accept
   decision admits the model too), the same 512 one-row requests at 32 connections from a load-generator process,
   in alternating rounds; each figure is from the round with the median throughput. The target: the agent's infer
   throughput with the bank pack at least 0.8 of the no-op's.

Prints a table, then one JSON line with `decision_p50_us`, `decision_p99_us`, `noop_p50_us`, `infer_rps_bank`,
`infer_rps_noop`, `infer_ratio` (and a few more). Run from the repository root:
`.venv/bin/python bench/policy_bench.py [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import inference_bench as ib

from agent import policy_inputs
from agent.guard import PolicyGuard
from policies import Bundle, CompiledPolicy
from sitewarden.fraud_model import build_release
from tests.agent_harness import BANK_PACK

NOOP = 'package sitewarden.{point}\nimport rego.v1\ndecision := {{"allow": true, "reasons": [], "obligations": {{}}}}\n'
TARGET = 0.8
SITE = {"id": "00000000-0000-4000-8000-000000000000", "name": "bench-site"}


@dataclass(frozen=True)
class Workload:
    decisions: int
    cached: int
    http: ib.Workload


FULL = Workload(decisions=400, cached=100_000, http=ib.Workload(2.0, 10.0, 3, 0, (32,)))
QUICK = Workload(decisions=100, cached=20_000, http=ib.Workload(1.0, 3.0, 1, 0, (32,)))


def noop_pack(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".manifest").write_text('{"revision": "noop", "roots": ["sitewarden"]}')
    for point in ("inference", "accept"):
        (directory / f"{point}.rego").write_text(NOOP.format(point=point))
    return directory


def timings_us(call: Callable[[], Any], count: int) -> list[float]:
    call()  # warm
    out = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1e6)
    return out


def in_process(run_dir: Path, card: dict[str, Any], workload: Workload) -> dict[str, list[float]]:
    model = {
        "name": ib.MODEL,
        "version": ib.VERSION,
        "kind": "model",
        "runtime": "onnx",
        "digest": "0" * 64,
        "approvers": ["alice"],
        "card": card,
    }
    value = policy_inputs.inference_input(
        SITE,
        app=ib.APP,
        purpose="fraud",
        data_class="confidential",
        model=model,
        batch=1,
        inputs=["features"],
        binding={"purposes": ["fraud"], "data_classes": ["confidential"]},
    )
    bank = CompiledPolicy(Bundle.load(BANK_PACK))
    noop = CompiledPolicy(Bundle.load(noop_pack(run_dir / "noop-in-process")))
    decision = bank.decide("inference", value)
    if not decision.allow:
        raise RuntimeError(f"the bank pack denies the bench request: {decision.reasons}")
    guard = PolicyGuard(bank)
    key = (ib.APP, "fraud", "confidential", model["digest"], 1, ("features",))
    ib.stderr.log(f"in process: {workload.decisions} bank-pack decisions, then the no-op's and the memoised path")
    return {
        "bank": timings_us(lambda: bank.decide("inference", value), workload.decisions),
        "noop": timings_us(lambda: noop.decide("inference", value), workload.decisions * 5),
        "cached": timings_us(lambda: guard.inference(value, key=key), workload.cached),
    }


def over_http(run_dir: Path, release_dir: Path, card_path: Path, workload: Workload) -> dict[str, ib.Series]:
    bodies = ib.request_bodies(ib.REQUESTS)
    runs: dict[str, list[ib.Run]] = {"bank": [], "noop": []}
    with (
        ib.agent_world(run_dir, release_dir, card_path, name="bank-site") as bank,
        ib.agent_world(run_dir, release_dir, card_path, policy=noop_pack(run_dir / "noop"), name="noop-site") as noop,
    ):
        agents = {"bank": bank, "noop": noop}
        for number in range(1, workload.http.rounds + 1):
            for label, agent in agents.items():
                assert agent.process is not None
                ib.stderr.log(f"round {number} of {workload.http.rounds}: agent with the {label} policy")
                plan = ib.LoadPlan(
                    agent.port,
                    ib.http_requests(agent.port, agent.app_key, bodies),
                    workload.http.concurrency,
                    workload.http.warmup_s,
                    workload.http.run_s,
                    True,
                )
                runs[label].extend(ib.run_load(plan, agent.process.pid, label).values())
    return {label: ib.Series(r) for label, r in runs.items()}


def render(times: dict[str, list[float]], series: dict[str, ib.Series]) -> tuple[Table, dict[str, Any]]:
    p = ib.percentile
    bank, noop = series["bank"].median, series["noop"].median
    ratio = bank.rps / noop.rps if noop.rps else 0.0
    figures = {
        "decision_p50_us": round(p(times["bank"], 50), 1),
        "decision_p99_us": round(p(times["bank"], 99), 1),
        "noop_p50_us": round(p(times["noop"], 50), 1),
        "noop_p99_us": round(p(times["noop"], 99), 1),
        "decision_memoised_p50_us": round(p(times["cached"], 50), 2),
        "infer_rps_bank": round(bank.rps, 1),
        "infer_rps_noop": round(noop.rps, 1),
        "infer_ratio": round(ratio, 3),
        "infer_p50_ms_bank": round(bank.p50, 3),
        "infer_p50_ms_noop": round(noop.p50, 3),
        "failed_bank": bank.failed,
        "failed_noop": noop.failed,
    }
    table = Table(title="Policy decisions: the bank pack vs a no-op bundle (2 cores)")
    for column in ("measure", "bank pack", "no-op", "ratio / target"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    table.add_row(
        "inference decision in process, p50",
        f"{figures['decision_p50_us']:,.0f} µs",
        f"{figures['noop_p50_us']:,.0f} µs",
        "",
    )
    table.add_row(
        "inference decision in process, p99",
        f"{figures['decision_p99_us']:,.0f} µs",
        f"{figures['noop_p99_us']:,.0f} µs",
        "",
    )
    table.add_row(
        "memoised decision (agent, repeat input), p50", f"{figures['decision_memoised_p50_us']:.2f} µs", "", ""
    )
    table.add_row(
        "agent infer, 32 connections",
        f"{bank.rps:,.0f} req/s {series['bank'].rps_range}",
        f"{noop.rps:,.0f} req/s {series['noop'].rps_range}",
        f"{ratio:.2f}× (≥ {TARGET}) {ib.status_mark(ratio >= TARGET)}",
    )
    table.add_row(
        "agent infer p50 / p99", f"{bank.p50:.2f} / {bank.p99:.2f} ms", f"{noop.p50:.2f} / {noop.p99:.2f} ms", ""
    )
    table.add_row("non-200 answers", str(bank.failed), str(noop.failed), "")
    return table, figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer decisions; one round of 1 s warm-up + 3 s")
    args = parser.parse_args(argv)
    workload = QUICK if args.quick else FULL
    with _common.scratch_dir(ib.DEFAULT_WORKDIR, "policy-bench-") as run_dir:
        ib.stderr.log("training the fraud model (seeded) and writing its release directory")
        release_dir = run_dir / f"release-{ib.VERSION}"
        card_path = build_release(release_dir, seed=7, version_note=ib.VERSION)
        times = in_process(run_dir, json.loads(card_path.read_text()), workload)
        series = over_http(run_dir, release_dir, card_path, workload)
    table, figures = render(times, series)
    Console(width=150).print(table)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
