"""`agent.federation.Trainer.consider`: how a site decides on a job the controller describes, without
a federation running. The controller is not trusted: a job without an app, with an app that does not
verify, with an id that would name files, or with DP parameters that give no finite budget is declined,
and every decline is audited; epsilon is the site's own figure; what was accepted is recorded."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.config import SiteConfig
from agent.errors import RefusedError
from agent.fab import load_app
from agent.federation import Trainer, decision_input, site_epsilon
from agent.guard import PolicyGuard
from agent.identity import DataDir, Identity
from federation import APP_DIR, fab
from federation.datasource import DataSource
from federation.privacy import epsilon
from policies import Bundle, CompiledPolicy
from sitewarden import approval
from sitewarden.desired import JobRef, ReleaseRef
from tests.agent.test_fab import app_release
from tests.agent_harness import BANK_PACK

DP = {"enabled": True, "noise_multiplier": 1.5, "clipping_norm": 0.1, "delta": 1e-5}


@pytest.fixture(scope="module")
def guard() -> PolicyGuard:
    return PolicyGuard(CompiledPolicy(Bundle.load(BANK_PACK)))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("app")
    approval.generate_approver_key(root / "alice.pem", root / "alice.pub.pem")
    return app_release(root / "release", fab.write(APP_DIR, root / "fab"), root / "alice.pem")


@pytest.fixture
def site(tmp_path: Path, release: Path) -> tuple[Trainer, list[dict[str, Any]]]:
    data = tmp_path / "data.csv"
    data.write_text("amount,hour,merchant_risk,distance_km,transactions_24h,card_age_days,foreign,online,label\n")
    data.write_text(data.read_text() + "".join(f"{i},1,0.1,2,1,30,0,1,{i % 2}\n" for i in range(20)))
    config = SiteConfig(
        approvers={"alice": release.parent / "alice.pub.pem"}, datasets={"transactions": DataSource("csv", str(data))}
    )
    identity = Identity(str(uuid.uuid4()), "bank-a", "https://127.0.0.1:1", "0" * 64, "2026-01-01T00:00:00Z", "")
    records: list[dict[str, Any]] = []
    (tmp_path / "site").mkdir()
    return Trainer(DataDir(tmp_path / "site"), config, identity, records.append), records


def ref(release: Path) -> ReleaseRef:
    manifest = json.loads((release / "release.json").read_bytes())
    [f] = manifest["files"]
    target = {"target": "releases/fedapp/0.1.0/release.json", "sha256": "0" * 64, "size": 1}
    file = {"target": f"releases/fedapp/0.1.0/files/{f['path']}", "path": f["path"], "sha256": f["sha256"]}
    return ReleaseRef.model_validate(
        {
            "name": "fedapp",
            "version": "0.1.0",
            "kind": "app",
            "runtime": "flower",
            "manifest": target,
            "files": [{**file, "size": f["size"]}],
            "approvals": [],
        }
    )


def job(release: Path | None, **changes: Any) -> JobRef:
    fields: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "name": "fraud-ft",
        "base": {"name": "fraud", "version": "1.0.0"},
        "model_family": "tabular-logreg",
        "dataset": "transactions",
        "rounds": 3,
        "min_sites": 2,
        "strategy": "FedAvg",
        "differential_privacy": {**DP, "epsilon": epsilon(1.5, 3, 1e-5)},
        "secure_aggregation": True,
        "app": ref(release) if release else None,
    }
    return JobRef.model_validate({**fields, **changes})


def staged(release: Path) -> Any:
    return lambda _ref: load_app(release, {"alice": (release.parent / "alice.pub.pem").read_bytes()})


def test_a_job_the_policy_allows_is_joined_and_what_was_accepted_is_recorded(
    site: tuple[Trainer, list[dict[str, Any]]], guard: PolicyGuard, release: Path
) -> None:
    trainer, records = site
    offered = job(release)
    answer, state = trainer.consider(offered, guard, staged(release))
    assert answer.join and answer.dataset_sha256 and answer.supernode_public_key, answer
    assert state["state"] == "pending"
    accepted = trainer.accepted(offered.id)
    assert accepted is not None and accepted.terms.rounds == 3 and accepted.terms.clipping_norm == 0.1
    assert accepted.fab_sha256 == json.loads((release / "release.json").read_bytes())["files"][0]["sha256"]
    assert [r["type"] for r in records] == ["decision", "federation.join"]
    assert records[0]["epsilon"] == pytest.approx(epsilon(1.5, 3, 1e-5))


def test_a_job_without_an_app_is_declined_and_audited(
    site: tuple[Trainer, list[dict[str, Any]]], guard: PolicyGuard
) -> None:
    trainer, records = site
    answer, state = trainer.consider(job(None), guard, lambda _ref: pytest.fail("nothing to stage"))
    assert not answer.join and "names no Flower App release" in answer.reasons[0]
    assert state["state"] == "refused"
    assert records[-1]["type"] == "federation.app.refused"


def test_an_app_that_does_not_verify_declines_the_job_before_the_policy_is_asked(
    site: tuple[Trainer, list[dict[str, Any]]], guard: PolicyGuard, release: Path
) -> None:
    trainer, records = site

    def refuse(_ref: ReleaseRef) -> Any:
        raise RefusedError("the app release has no approval by an approver this site trusts")

    offered = job(release)
    answer, _ = trainer.consider(offered, guard, refuse)
    assert not answer.join and "fedapp 0.1.0 is refused: the app release has no approval" in answer.reasons[0]
    assert [r["type"] for r in records] == ["federation.app.refused"]  # no decision: nothing to decide on
    assert trainer.accepted(offered.id) is None


def test_a_job_id_that_is_not_an_id_is_declined_before_it_names_a_file(
    site: tuple[Trainer, list[dict[str, Any]]], guard: PolicyGuard, release: Path, tmp_path: Path
) -> None:
    trainer, records = site
    # Built past the wire model's own checks: the trainer checks again before the id names a file.
    hostile = job(release).model_copy(update={"id": "../../keys/site"})
    answer, _ = trainer.consider(hostile, guard, staged(release))
    assert not answer.join and "not a canonical lowercase UUID" in answer.reasons[0]
    assert records[-1]["type"] == "federation.refused"
    assert not (tmp_path / "site" / "federation").exists()


def test_epsilon_is_the_sites_own_and_a_budget_without_noise_is_no_budget(release: Path) -> None:
    assert site_epsilon(job(release)) == pytest.approx(epsilon(1.5, 3, 1e-5))
    assert site_epsilon(job(release, differential_privacy={**DP, "noise_multiplier": 0.0})) is None
    assert site_epsilon(job(release, differential_privacy={"enabled": False})) is None
    liar = job(release, differential_privacy={**DP, "epsilon": 0.01})
    app = staged(release)(None)
    dp = decision_input({"id": "s", "name": "s"}, liar, app)["job"]["differential_privacy"]
    assert dp["epsilon"] == pytest.approx(epsilon(1.5, 3, 1e-5)) and dp["epsilon_declared"] == 0.01


def test_a_job_whose_parameters_give_no_finite_budget_is_declined(
    site: tuple[Trainer, list[dict[str, Any]]], guard: PolicyGuard, release: Path
) -> None:
    trainer, _ = site
    no_noise = job(release, differential_privacy={**DP, "noise_multiplier": 0.0, "epsilon": 1.0})
    answer, state = trainer.consider(no_noise, guard, staged(release))
    assert not answer.join and state["state"] == "refused"
    assert any("no finite differential privacy epsilon" in r for r in answer.reasons)
