"""App keys and their bindings, without a running agent: the keys file's generations and lock, exact
reload on replacement, and the site configuration's `[apps.<name>]` tables."""

from __future__ import annotations

import concurrent.futures
import json
import os
from pathlib import Path

import pytest

from agent import apps, config
from agent.apps import AppBinding, AppKeys, OutsideBinding
from agent.errors import ConfigError


def test_concurrent_changes_are_all_kept_each_under_its_own_generation(tmp_path: Path) -> None:
    path = tmp_path / "apps.json"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda i: apps.create(path, f"app-{i}"), range(24)))
    stored = json.loads(path.read_text())
    assert stored["generation"] == 24 and len(stored["keys"]) == 24
    assert sorted(g for _, g in made) == list(range(1, 25))
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_replaced_keys_file_is_read_again_even_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "apps.json"
    key, _ = apps.create(path, "teller")
    keys = AppKeys(path)
    assert keys.app_for(key) == "teller"
    before = path.stat()
    assert apps.revoke(path, "teller") == (1, 2)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert keys.app_for(key) is None
    keys.close()


def test_unknown_malformed_and_forged_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "apps.json"
    key, _ = apps.create(path, "teller")
    keys = AppKeys(path)
    prefix, key_id, secret = key.split("_", 2)
    for wrong in ("", "swa", "swa_x_y", f"{prefix}_{key_id}_{secret}x", f"swt_{key_id}_{secret}"):
        assert keys.app_for(wrong) is None, wrong
    keys.close()


def test_the_audit_events_name_keys_by_id_and_never_their_secret(tmp_path: Path) -> None:
    path = tmp_path / "apps.json"
    key, _ = apps.create(path, "teller")
    apps.create(path, "other")
    apps.revoke(path, "teller")
    keys = AppKeys(path, {"teller": AppBinding(("service",), ("internal",))})
    generation, events = keys.unaudited(1)
    assert generation == 3
    assert [(e["type"], e["app"], e["generation"]) for e in events] == [
        ("app_key.created", "other", 2),
        ("app_key.revoked", "teller", 3),
    ]
    _, everything = keys.unaudited(0)
    created = next(e for e in everything if e["type"] == "app_key.created" and e["app"] == "teller")
    assert created["binding"] == {"purposes": ["service"], "data_classes": ["internal"]}
    assert key.split("_", 2)[2] not in json.dumps(everything)
    keys.close()


def test_a_claim_is_checked_against_the_apps_binding() -> None:
    binding = AppBinding(("fraud", "aml"), ("confidential",))
    apps.check_binding("scoring", binding, "aml", "confidential")
    with pytest.raises(OutsideBinding, match="may not state purpose 'marketing'") as refused:
        apps.check_binding("scoring", binding, "marketing", "confidential")
    assert refused.value.status == 403
    with pytest.raises(OutsideBinding, match="may not state data class 'public'"):
        apps.check_binding("scoring", binding, "fraud", "public")
    with pytest.raises(OutsideBinding, match=r"no binding in the site configuration \(\[apps.scoring\]"):
        apps.check_binding("scoring", None, "fraud", "confidential")


def test_the_site_configuration_binds_apps_and_refuses_malformed_bindings(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[apps.scoring]\npurposes = ["fraud", "fraud"]\ndata_classes = ["confidential"]\n')
    assert config.load(site, env={}).apps == {"scoring": AppBinding(("fraud",), ("confidential",))}
    for body, error in [
        ('[apps.scoring]\npurposes = "fraud"\ndata_classes = ["x"]\n', "apps.scoring.purposes must be"),
        ('[apps.scoring]\npurposes = []\ndata_classes = ["x"]\n', "apps.scoring.purposes must be"),
        ('[apps.scoring]\npurposes = ["fraud"]\n', "apps.scoring.data_classes must be"),
        ('[apps.scoring]\npurposes = ["a"]\ndata_classes = ["b"]\nroles = ["admin"]\n', "unknown key"),
        ('[apps."bad name"]\npurposes = ["a"]\ndata_classes = ["b"]\n', "app name"),
        ('[metrics]\nlisten = "nowhere"\n', "must be host:port"),
    ]:
        site.write_text(body)
        with pytest.raises(ConfigError, match=error):
            config.load(site, env={})
    site.write_text('[metrics]\nlisten = "127.0.0.1:9464"\n')
    loaded = config.load(site, env={})
    assert (loaded.metrics_host, loaded.metrics_port) == ("127.0.0.1", 9464)
