"""Programs from Debian packages that some tests need (listed in .ci/debian-packages).

`.ci/system-deps` installs them before the suite runs when it runs as root. Elsewhere a test
whose programs are missing skips, unless SITEWARDEN_REQUIRE_SYSTEM=1 (as in CI) makes it fail.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require(*programs: str) -> None:
    """Skip (or, under SITEWARDEN_REQUIRE_SYSTEM=1, fail) unless every program is on PATH."""
    missing = [p for p in programs if shutil.which(p) is None]
    if not missing:
        return
    message = f"needs {', '.join(missing)} (Debian packages in .ci/debian-packages; .ci/system-deps installs them)"
    if os.environ.get("SITEWARDEN_REQUIRE_SYSTEM") == "1":
        pytest.fail(message)
    pytest.skip(message)
