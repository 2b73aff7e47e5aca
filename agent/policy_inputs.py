"""The input documents the agent gives each decision point (policies/schemas/<point>.input.schema.json)."""

from __future__ import annotations

from typing import Any

from agent.guard import SUPPORTED_RUNTIMES


def inference_input(
    site: dict[str, str],
    *,
    app: str,
    purpose: str,
    data_class: str,
    model: dict[str, Any],
    batch: int,
    inputs: list[str],
    binding: dict[str, list[str]],
) -> dict[str, Any]:
    """`model` is `ActiveRelease.policy_input`; `binding` is the app's `AppBinding.to_json()`, what the
    site's configuration lets its keys state (the agent has checked the request against it already)."""
    return {
        "site": site,
        "caller": {"app": app, "binding": binding},
        "purpose": purpose,
        "data_class": data_class,
        "model": model,
        "request": {"batch": batch, "inputs": inputs},
    }


def chat_input(
    site: dict[str, str],
    *,
    app: str,
    purpose: str,
    data_class: str,
    model: dict[str, Any],
    adapter: dict[str, Any] | None,
    n: int,
    max_tokens: int,
    binding: dict[str, list[str]],
) -> dict[str, Any]:
    """A language-model request: `model` is the base, `adapter` the adapter it names (both
    `agent.lm.site.LMRelease.policy_input`); `n` sequences to draw, `max_tokens` each, as asked."""
    value = inference_input(
        site,
        app=app,
        purpose=purpose,
        data_class=data_class,
        model=model,
        batch=1,
        inputs=["messages"],
        binding=binding,
    )
    value["request"].update({"n": n, "max_tokens": max_tokens})
    if adapter is not None:
        value["adapter"] = adapter
    return value


def accept_input(
    site: dict[str, str],
    *,
    name: str,
    version: str,
    kind: str,
    runtime: str,
    digest: str,
    card: dict[str, Any],
    approvers: list[str],
) -> dict[str, Any]:
    """For a release whose files the agent verified against its manifest, and whose approvals it verified."""
    return {
        "site": site,
        "artifact": {
            "name": name,
            "version": version,
            "kind": kind,
            "runtime": runtime,
            "digest": digest,
            "card": card,
        },
        "approvals": [{"approver": a, "valid": True} for a in approvers],
        "checks": {"files_complete": True, "runtime_supported": runtime in SUPPORTED_RUNTIMES},
    }


def federation_input(site: dict[str, str], job: dict[str, Any]) -> dict[str, Any]:
    """`job` as the desired state describes it (the federated fine-tuning issue fills it)."""
    return {"site": site, "job": job}
