"""`flwr run` for an exact app package: start a run of the FAB in a file, byte for byte.

`flwr run <app dir>` builds a FAB from a directory every time. A job runs the app release its sites
approved, whose FAB SHA-256 they check before running anything, so the controller must send that
release's very bytes: this does what `flwr run` does (Flower 1.42's `flwr.cli.run.run`: StartRun on
the Control API of the SuperLink connection in FLWR_HOME, then optionally streams the run's logs),
with the FAB read from a file instead of built.

    python -m federation.run_fab APP.fab CONNECTION [--run-config 'k=v ...'] [--stream]

It prints `Successfully started run <id>` as `flwr run` does.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m federation.run_fab", description=__doc__.split("\n\n")[0])
    parser.add_argument("fab", type=Path, help="the app package (.fab) to run")
    parser.add_argument("connection", help="the SuperLink connection in FLWR_HOME/config.toml")
    parser.add_argument("--run-config", action="append", default=None, help="run config overrides, k=v ...")
    parser.add_argument("--stream", action="store_true", help="stream the run's logs until it ends")
    args = parser.parse_args(argv)

    from flwr.cli.flower_config import read_superlink_connection  # noqa: PLC0415 - slow imports after parsing
    from flwr.cli.log import start_stream  # noqa: PLC0415
    from flwr.cli.utils import init_http_client_from_connection  # noqa: PLC0415
    from flwr.common.config import parse_config_args  # noqa: PLC0415
    from flwr.common.serde import fab_to_proto, user_config_to_proto  # noqa: PLC0415
    from flwr.proto.control_pb2 import StartRunRequest  # noqa: PLC0415
    from flwr.supercore.fab import Fab  # noqa: PLC0415

    content = args.fab.read_bytes()
    connection = read_superlink_connection(args.connection)
    client = init_http_client_from_connection(connection)
    try:
        request = StartRunRequest(
            fab=fab_to_proto(Fab(hashlib.sha256(content).hexdigest(), content, {})),
            override_config=user_config_to_proto(parse_config_args(args.run_config)),
            federation=connection.federation or "",
            app_spec="",
        )
        answer = client.StartRun(request)
        if not answer.HasField("run_id"):
            print("Failed to start run", file=sys.stderr)
            return 1
        print(f"Successfully started run {answer.run_id}", flush=True)
        if args.stream:
            start_stream(answer.run_id, client)
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
