"""Federated fine-tuning for Sitewarden on Flower 1.42.

Layout:

- `federation.superlink`: `Federation`, a supervisor for one `flower-superlink` (TLS from our CA,
  `--enable-supernode-auth`, SQLite state in `superlink.db`, no runtime dependency installation, all
  APIs on one port on 127.0.0.1) and its `flower-supernode`s; it writes the `flwr` CLI's
  `FLWR_HOME/config.toml` connection, registers and unregisters SuperNodes, starts and stops runs
  (`flwr run <app> <connection> --stream`), and stops every process tree it started. The controller
  (`controller.federation`) uses it for its SuperLink; `supernode_argv`/`flower_env` are what an agent
  (`agent.federation`) starts its SuperNode with.
- `federation.gateway`: the Fleet gateway, an HTTPS reverse proxy that serves the sites the SuperLink's
  Fleet API and nothing else (an allow-list of its methods, matched on the raw path; Flower's Control
  API stays reachable from the controller only), with bounded bodies and concurrency, and counts the
  bytes that pass.
- `federation.fab`: Flower App Bundles, built and inspected; a Flower App is a release of kind `app`.
  `federation.run_fab` starts a run of exactly a given FAB (what `flwr run` does for a directory).
- `federation.site`, `federation.runner`, `federation.terms`: a site's SuperNode for a job, in process
  isolation, with the site's own runner, which runs only the approved FAB; and the terms the site
  accepted, which reach its ClientApp in the node config.
- `federation.keys`: SuperNode key pairs in the formats Flower reads (OpenSSH EC private key for
  `flower-supernode`, OpenSSH public key line for `flwr supernode register`).
- `federation.datasource`: a site's training data (CSV, Parquet, a read-only SQLite query) and its SHA-256.
- `federation.model_family`: the tabular logistic-regression family (scaler + linear classifier) to and
  from ONNX; `federation.privacy`: epsilon of the Gaussian mechanism over rounds (RDP accounting).
- `federation/app/`: the Flower App itself, a separate project with its own `pyproject.toml`
  (`[tool.flwr.app]`) and package `sitewarden_fedapp`. It is not imported as `federation.app`: Flower
  ships it to the SuperLink/SuperNodes as a FAB and imports it from there.

Everything runs with `FLWR_HOME` under a directory we own, `FLWR_TELEMETRY_ENABLED=0` and
`FLWR_DISABLE_UPDATE_CHECK=1`.
"""

from pathlib import Path

APP_DIR = Path(__file__).parent / "app"
