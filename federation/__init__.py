"""Federated fine-tuning for Sitewarden on Flower 1.42 (first increment).

Layout:

- `federation.superlink`: `Federation`, a supervisor for one `flower-superlink` (TLS from our CA,
  `--enable-supernode-auth`, SQLite state in `superlink.db`, no runtime dependency installation, all
  APIs on one port on 127.0.0.1) and its `flower-supernode`s; it writes the `flwr` CLI's
  `FLWR_HOME/config.toml` connection, registers SuperNodes (`flwr supernode register`), starts runs
  (`flwr run <app> <connection> --stream`), and stops every process tree it started.
- `federation.keys`: SuperNode key pairs in the formats Flower reads (OpenSSH EC private key for
  `flower-supernode`, OpenSSH public key line for `flwr supernode register`).
- `federation/app/`: the Flower App itself, a separate project with its own `pyproject.toml`
  (`[tool.flwr.app]`) and package `sitewarden_fedapp`: a NumPy logistic regression on each site's local
  CSV (`data-path` in the SuperNode's node config), FedAvg from `flwr.serverapp.strategy`, optional
  central DP with client-side fixed clipping; the ServerApp writes the final weights (`.npz`) and the
  per-round aggregated metrics (`.json`) to the paths given in the run config. It is not imported as
  `federation.app`: Flower ships it to the SuperLink/SuperNodes as a FAB and imports it from there.

Everything runs with `FLWR_HOME` under a directory we own, `FLWR_TELEMETRY_ENABLED=0` and
`FLWR_DISABLE_UPDATE_CHECK=1`; nothing listens beyond 127.0.0.1.
"""

from pathlib import Path

APP_DIR = Path(__file__).parent / "app"
