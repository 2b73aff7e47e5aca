"""The site configuration: a configured path that does not exist stops the agent at start, naming key and path."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError
from tests.conftest import run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[data]\nlocal = "site-data"\n', "data.local = '{base}/site-data': no such file or directory"),
        ('[policy]\nlocal = "policy-local"\n', "policy.local = '{base}/policy-local': no such file or directory"),
        (
            '[datasets.transactions]\nkind = "csv"\npath = "/srv/site-data/tx.csv"\n',
            "datasets.transactions.path = '/srv/site-data/tx.csv': no such file or directory",
        ),
        ('[controller]\nca_cert = "ca.pem"\n', "controller.ca_cert = '{base}/ca.pem': no such file or directory"),
        ('[approvers]\nalice = "alice.pub.pem"\n', "approvers.alice = '{base}/alice.pub.pem': no such file"),
        ('[server]\ntls_cert = "."\ntls_key = "."\n', "server.tls_cert = '{base}' is not a file"),
    ],
)
def test_a_configured_path_that_does_not_exist_is_named_with_its_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    assert message.format(base=tmp_path) in str(caught.value)


def test_paths_that_exist_load_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "site-data").mkdir()
    (tmp_path / "site-data" / "tx.csv").write_text("amount,label\n1,0\n")
    (tmp_path / "alice.pub.pem").write_text("key")
    site = config.load(
        write(
            tmp_path,
            '[data]\nlocal = "site-data"\n[approvers]\nalice = "alice.pub.pem"\n'
            '[datasets.tx]\nkind = "csv"\npath = "site-data/tx.csv"\n',
        )
    )
    assert site.local_data == tmp_path / "site-data" and site.datasets["tx"].path == str(tmp_path / "site-data/tx.csv")


def test_agent_run_stops_at_start_naming_the_missing_path(tmp_path: Path) -> None:
    done = run_cli(
        "agent",
        "run",
        "--data",
        str(tmp_path / "data"),
        "--config",
        str(write(tmp_path, '[data]\nlocal = "nowhere"\n')),
    )
    assert done.returncode == 1
    assert f"cannot start: data.local = '{tmp_path}/nowhere': no such file or directory".encode() in done.stderr
