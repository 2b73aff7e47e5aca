"""Trust anchors live where the agent never writes: a configuration that puts them in its data dir is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config import load
from agent.daemon import check_trust_paths
from agent.errors import ConfigError
from agent.identity import DataDir


@pytest.mark.parametrize(
    ("section", "inside"),
    [
        ('[approvers]\nalice = "{data}/keys/alice.pub.pem"\n', "approvers.alice"),
        ('[approvers]\nalice = "{data}/releases/fraud-scorer/1.0.0/files/model.onnx"\n', "approvers.alice"),
        ('[controller]\nca_cert = "{data}/tuf/ca.pem"\n', "controller.ca_cert"),
        ('[policy]\nlocal = "{data}/releases/bank-policy"\n', "policy.local"),
    ],
)
def test_a_trust_anchor_inside_the_data_dir_is_refused(tmp_path: Path, section: str, inside: str) -> None:
    data = DataDir(tmp_path / "data")
    config = tmp_path / "site.toml"
    config.write_text(section.format(data=data.root))
    anchor = Path(section.format(data=data.root).split('"')[1])  # it exists: only where it lies is wrong
    if inside == "policy.local":
        anchor.mkdir(parents=True)
    else:
        anchor.parent.mkdir(parents=True)
        anchor.write_text("")
    with pytest.raises(ConfigError, match=re.escape(inside)) as refused:
        check_trust_paths(data, load(config, env={}), config)
    assert "which the agent writes" in str(refused.value)


def test_the_configuration_itself_and_links_into_the_data_dir_are_refused(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    (data.root / "keys").mkdir(parents=True)
    inside = data.root / "site.toml"
    inside.write_text("")
    with pytest.raises(ConfigError, match="the site configuration"):
        check_trust_paths(data, load(inside, env={}), inside)
    (tmp_path / "approvers").symlink_to(data.root / "keys")  # a link that leads into the data dir
    (data.root / "keys" / "alice.pub.pem").write_text("")
    config = tmp_path / "site.toml"
    config.write_text(f'[approvers]\nalice = "{tmp_path}/approvers/alice.pub.pem"\n')
    with pytest.raises(ConfigError, match=r"approvers\.alice"):
        check_trust_paths(data, load(config, env={}), config)


def test_trust_anchors_outside_the_data_dir_are_fine(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    config = tmp_path / "site.toml"
    config.write_text(f'[approvers]\nalice = "{tmp_path}/approvers/alice.pub.pem"\n[controller]\nca_cert = "ca.pem"\n')
    (tmp_path / "approvers").mkdir()
    (tmp_path / "approvers" / "alice.pub.pem").write_text("")
    (tmp_path / "ca.pem").write_text("")
    check_trust_paths(data, load(config, env={}), config)
