"""The process settings the language-model runtime needs before torch and transformers load.

- Nothing phones home: `HF_HUB_OFFLINE=1` (and transformers', datasets' and the hub's telemetry
  switches) are set by the runtime, so a model directory that lacks a file fails instead of
  reaching for a hub.
- Threads: torch's intra-op pool gets as many threads as the pod may use. A container's CPU limit
  is the cgroup v2 `cpu.max` quota (`200000 100000` is two CPUs), which `os.cpu_count()` does not
  see; the CPU affinity mask bounds it too. `SITEWARDEN_LM_THREADS` overrides both.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

from agent.lm.errors import NotInstalled

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_limit(cpu_max: Path = CPU_MAX) -> int:
    """CPUs this process may use: the cgroup v2 quota, the affinity mask and the machine, the least of them."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        fields = cpu_max.read_text().split()
    except OSError:
        return max(1, available)
    if len(fields) != 2 or fields[0] == "max":
        return max(1, available)
    try:
        limit = math.ceil(int(fields[0]) / int(fields[1]))
    except (ValueError, ZeroDivisionError):
        return max(1, available)
    return max(1, min(available, limit))


def threads() -> int:
    """The intra-op thread count: `SITEWARDEN_LM_THREADS`, else the pod's CPU limit."""
    override = os.environ.get("SITEWARDEN_LM_THREADS", "")
    return int(override) if override.isdigit() and int(override) > 0 else cpu_limit()


@functools.cache
def configure() -> int:
    """Set the offline switches and torch's thread count, once per process; returns the thread count."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    try:
        import torch  # noqa: PLC0415 - torch loads only when a language model is used
    except ImportError as exc:
        raise NotInstalled("the language-model runtime needs the lm extra: pip install 'sitewarden[lm]'") from exc
    count = threads()
    torch.set_num_threads(count)
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return count


def preload() -> None:
    """Import torch now, before anything loads rego-cpp (regopy), when the lm extra is installed.

    librego_shared.so carries its own allocator (snmalloc's operator new and delete): importing torch
    after it aborts the process ("double free or corruption"), whereas torch first and rego-cpp
    after work together. Processes that may run a language model call this first thing.
    """
    if available():
        import torch  # noqa: F401, PLC0415


def available() -> bool:
    """Whether the `lm` extra is installed (without importing torch)."""
    import importlib.util  # noqa: PLC0415

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))
