"""The site's own ClientApp runner: a SuperNode runs only the Flower App the site approved.

Flower 1.42's SuperNode runs whatever app package (FAB) the SuperLink names, and its only check,
`--trusted-entities`, accepts only FABs that carry Flower Hub verification records, which a
locally built FAB never has. The agent therefore starts its SuperNode with `--isolation process`
(the SuperNode then launches no ClientApp itself) and this runner next to it, in place of Flower's
`flower-superexec` + `flwr-clientapp`:

- it polls the SuperNode's Runtime API (loopback) for ClientApp tasks, as `flower-superexec` does,
  and runs each task in a process of its own (Flower's model: one process per message), forked
  from the runner, which has Flower loaded already and never loads any app code itself;
- a task pulls its input (message, context, run, FAB) like `flwr-clientapp`, then, before any
  of the FAB's code is installed or imported, compares the SHA-256 of the FAB's bytes with the
  approved app release's (`--approved-fab-sha256`, from the agent, which verified that release's
  approvals through TUF). A different FAB is refused: its reply is an error (no update leaves the
  site), the refusal is appended to the site's report spool (`--report`), which the agent audits,
  and nothing of the FAB is written or run. The approved FAB is installed into the job's own
  directory (`--apps`, never the shared FLWR_HOME) and its ClientApp runs the message; the terms
  the site accepted reach it in the SuperNode's node config (`federation.terms`).

Run as `python -m federation.runner serve ...` (the agent's `Trainer` does, through `federation.site`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

POLL_S = 0.2


def _log(text: str) -> None:
    print(f"[sitewarden runner {os.getpid()}] {text}", file=sys.stderr, flush=True)


def _runtime_client(address: str, component: str, token: str | None = None) -> Any:
    from flwr.supercore.interceptors import (  # noqa: PLC0415 - Flower loads slowly; the parser does not need it
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker  # noqa: PLC0415
    from flwr.supercore.runtime import RuntimeHttpClient  # noqa: PLC0415

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the Runtime API listens on loopback only, as with Flower's own SuperExec
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def append_report(path: str, line: dict[str, Any]) -> None:
    """One JSON line on the site's report spool (one write on an O_APPEND descriptor, then fsync)."""
    data = (json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# --- serve: the SuperExec of this SuperNode -------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: PLC0415
    from flwr.supercore.constant import TaskType  # noqa: PLC0415

    _load_task_modules()  # once, here: every forked task starts with them
    stop = threading.Event()

    def stopping(*_: object) -> None:
        stop.set()
        raise SystemExit(0)  # also out of a Runtime API call that is retrying with backoff

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopping)
    if args.supernode_pid:
        threading.Thread(target=_watch, args=(args.supernode_pid, stop), daemon=True).start()
    client = _runtime_client(args.runtime_api_address, "SuperExec")
    children: set[int] = set()
    _log(f"serving the SuperNode at {args.runtime_api_address}; approved FAB {args.approved_fab_sha256}")
    try:
        while not stop.is_set():
            children = {pid for pid in children if not _reaped(pid)}
            try:
                answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as exc:  # the SuperNode is starting or stopping; try again
                _log(f"the Runtime API did not answer: {exc.__class__.__name__}: {exc}")
                stop.wait(1.0)
                continue
            if answer.HasField("task") and answer.token:
                children.add(_fork_task(args, answer.token))
            stop.wait(POLL_S)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        client.close()
    return 0


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _watch(pid: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _log(f"the SuperNode ({pid}) exited; stopping")
            signal.raise_signal(signal.SIGTERM)
            return
        except PermissionError:
            pass
        stop.wait(0.5)


def _fork_task(args: argparse.Namespace, token: str) -> int:
    """Run one task in a child process; the runner goes on polling."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        code = run_task(args, token, parent_pid=os.getppid())
    except BaseException as exc:  # a child never returns into the runner's loop
        _log(f"the task process failed: {exc.__class__.__name__}: {exc}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _load_task_modules() -> None:
    import flwr.app  # noqa: PLC0415
    import flwr.cli.install  # noqa: PLC0415
    import flwr.clientapp.utils  # noqa: PLC0415
    import flwr.supercore.heartbeat  # noqa: PLC0415
    import flwr.supernode.runtime.run_clientapp  # noqa: F401, PLC0415


# --- task: one message, on the approved FAB only ---------------------------------------------------


def run_task(args: argparse.Namespace, token: str, *, parent_pid: int) -> int:
    from flwr.app import Error, Message  # noqa: PLC0415
    from flwr.common.constant import ErrorCode, SubStatus  # noqa: PLC0415
    from flwr.supercore.app_utils import start_parent_process_monitor  # noqa: PLC0415
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http  # noqa: PLC0415
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output  # noqa: PLC0415

    start_parent_process_monitor(parent_pid)
    client = _runtime_client(args.runtime_api_address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details, code = SubStatus.FAILED, "the ClientApp task failed", 1
    try:
        message, context, run, fab = pull_task_input(client)
        digest = hashlib.sha256(fab.content).hexdigest()
        if digest != args.approved_fab_sha256:
            details = (
                f"the SuperLink sent app package (FAB) {digest}, not the approved app release's "
                f"{args.approved_fab_sha256}: refused before any of its code ran"
            )
            _log(details)
            append_report(
                args.report,
                {
                    "event": "refused",
                    "run_id": int(message.metadata.run_id),
                    "message_type": str(message.metadata.message_type),
                    "group": str(message.metadata.group_id),
                    "fab_id": str(run.fab_id),
                    "fab_sha256": digest,
                    "reason": details,
                },
            )
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
        else:
            client_app = _load_approved(fab.content, digest, Path(args.apps), run)
            reply = client_app(message=message, context=context)
            status, details, code = SubStatus.COMPLETED, "", 0
    except Exception as exc:  # the reply is an error naming it; the task is marked failed
        details = f"{exc.__class__.__name__}: {exc}"
        _log(f"the ClientApp task failed: {details}")
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        finally:
            heartbeat.stop()
            client.close()
    return code


def _load_approved(content: bytes, digest: str, apps: Path, run: Any) -> Any:
    """Install the (approved) FAB into the job's own apps directory, once, and load its ClientApp."""
    from flwr.cli.install import install_from_fab  # noqa: PLC0415
    from flwr.clientapp.utils import get_load_client_app_fn  # noqa: PLC0415

    target = apps / digest
    if not target.is_dir():
        apps.mkdir(parents=True, exist_ok=True)
        # Installed aside, then renamed: a task that dies half way never leaves half an app behind.
        staging = Path(tempfile.mkdtemp(dir=apps, prefix=".installing-"))
        try:
            installed = install_from_fab(content, install_dir=staging, skip_prompt=True)
            with contextlib.suppress(FileExistsError, OSError):
                installed.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    load = get_load_client_app_fn(default_app_ref="", app_path=str(target), multi_app=True)
    return load(run.fab_id, run.fab_version, digest)


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m federation.runner", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    command = sub.add_parser("serve", help="take the SuperNode's ClientApp tasks and run each on the approved FAB")
    command.add_argument("--runtime-api-address", required=True, help="host:port of the SuperNode's Runtime API")
    command.add_argument("--approved-fab-sha256", required=True, help="SHA-256 of the approved app's FAB")
    command.add_argument("--report", required=True, help="the site's report spool (JSONL) for this job")
    command.add_argument("--apps", required=True, help="where the approved FAB is installed (the job's own)")
    command.add_argument("--supernode-pid", type=int, default=0, help="stop when this process exits")
    args = parser.parse_args(argv)
    digest = args.approved_fab_sha256
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        parser.error(f"--approved-fab-sha256 {digest!r} is not 64 lowercase hex digits")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
